"""What a transformers model's configuration says about its policy's logits."""

from __future__ import annotations

from transformers import PreTrainedModel

__all__ = ["logit_transform"]


def logit_transform(model: PreTrainedModel) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` that TRL's fused LM head applies to ``model``'s head outputs.

    The configuration attributes trl 1.16's ``add_fused_lm_head`` reads: the soft-cap
    ``final_logit_softcapping``; the multiplier ``logit_scale``, ``output_multiplier`` or
    ``lm_head_multiplier``, else ``1 / logits_scaling`` (``logits_scaling`` itself for HyperCLOVA
    X), else 1.
    """
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            return float(scale), softcap
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return (float(scaling) if config.model_type == "hyperclovax" else 1.0 / scaling), softcap
    return 1.0, softcap
