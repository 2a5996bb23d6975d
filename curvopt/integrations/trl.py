"""CAPO inside TRL's ``GRPOTrainer`` (tested with trl 1.16).

:class:`CAPOConfig` adds the CAPO settings to ``GRPOConfig`` (they parse from the command line
like every TRL option); :class:`CAPOGRPOTrainer` applies them::

    args = CAPOConfig(output_dir="out", capo_rule="symmetric", capo_delta_h=1e-2)
    trainer = CAPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data)
    trainer.train()

How it hooks into TRL, and why:

- The optimizer the trainer creates is wrapped in :class:`curvopt.CAPO` (``create_optimizer``);
  accelerate then wraps CAPO, so the step taken is CAPO's, and the LR scheduler, gradient scaler
  and checkpoints see a real ``torch.optim.Optimizer``.
- TRL's loss forward never calls ``lm_head`` (its fused log-prob path multiplies by
  ``lm_head.weight`` directly), so the hidden states are captured by a forward hook on the
  backbone, which runs once per loss forward, gradient checkpointing or not. They are sliced to
  the completion positions as TRL slices them (the state at position t predicts token t + 1).
- ``_compute_loss`` reads its token mask once, before the forward, and uses it only afterwards.
  The trainer hands TRL a copy of the inputs whose loss mask is a fresh tensor, runs the forward
  with the real attention mask, and zeroes the rejected tokens of that tensor as soon as the
  hidden states exist. Every later use (the loss numerator and normaliser, the KL term,
  sequence-level importance weights, the entropy mask and bonus, the metrics) sees only the kept
  tokens, and the inputs buffered for ``num_iterations > 1`` are never written.
- ``dapo``, ``cispo`` and ``vespo`` divide by the token count of the generation batch, counted
  before any micro-batch runs, whereas the kept count of an optimizer step is known only after
  its last micro-batch. So the accumulated gradient is multiplied by tokens / kept tokens of the
  step, both counted over all processes, before it is clipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, cast, get_args, get_origin

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from ..capo import CAPO, STEP_STATS
from ..settings import CAPOSettings, help_text, option_types

__all__ = ["CAPOConfig", "CAPOGRPOTrainer"]

# Loss types whose normaliser is the token count of the generation batch (``num_items_in_batch``).
GLOBAL_NORMALISER = ("cispo", "dapo", "vespo")
# The CAPO options set on TRL's command line, as ``capo_<name>``; the logit transform comes from
# the GRPO settings and the model, and step_reject_frac needs a closure TRL's step does not pass.
OPTIONS = (
    "rule",
    "delta_h",
    "delta_f",
    "levels",
    "top_k",
    "fisher",
    "direction",
    "track_realised",
    "max_policy_shift",
)
PREFIX = "capo_"


def _with_capo_options(cls: type) -> type:
    """Add a ``capo_<name>`` field for each of :data:`OPTIONS`, derived from
    :class:`curvopt.settings.CAPOSettings` (type, default and help), before the class's own."""
    types = option_types()
    declared = {f.name: f for f in fields(CAPOSettings)}
    own = inspect.get_annotations(cls)
    annotations: dict[str, Any] = {}
    for name in OPTIONS:
        tp, default = types[name], declared[name].default
        assert default is not MISSING
        metadata = {"help": help_text(name, PREFIX)}
        if get_origin(tp) in (tuple, list, Sequence):
            # a sequence parses as a list on the command line, of its choices' type
            tp = list[_plain(get_args(tp)[0])]  # type: ignore[misc]
            value = field(default_factory=_copy_of(default), metadata=metadata)
        else:
            value = field(default=default, metadata=metadata)
        annotations[PREFIX + name] = tp
        setattr(cls, PREFIX + name, value)
    cls.__annotations__ = {**annotations, **own}
    return cls


def _copy_of(default: Sequence[Any]) -> Any:
    """A default factory of fresh lists equal to ``default``."""
    return lambda: list(default)


def _plain(tp: Any) -> Any:
    """The type of a ``Literal``'s values (the parser's item type), else ``tp`` itself."""
    return type(get_args(tp)[0]) if get_origin(tp) is Literal else tp


@dataclass
@_with_capo_options
class CAPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the settings of :class:`curvopt.CAPO` (Melo, Abate, Gal, ICLR 2026,
    https://arxiv.org/abs/2510.00819).

    Each ``capo_<name>`` field is CAPO's argument ``<name>`` for the names in :data:`OPTIONS`,
    with the type, default and help declared in :class:`curvopt.settings.CAPOSettings`;
    ``temperature``, the logit scale and the soft-cap are taken from the GRPO settings and the
    model, so CAPO models the policy TRL optimises.
    """

    capo_allow_tied_head: bool = field(
        default=False,
        metadata={
            "help": "Allow an lm_head tied to the input embedding. CAPO then models each "
            "candidate update from the head's own gradient only; the embedding's share of the "
            "shared matrix's gradient, which also moves the head, is left out of the model. "
            "Without this flag a tied head raises an error."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # fail at parse time rather than once the model is loaded (CAPO's own checks)
        try:
            capo_settings(self)
        except (TypeError, ValueError) as error:
            raise type(error)(PREFIX + str(error)) from None


def capo_settings(args: Any) -> CAPOSettings:
    """The :class:`~curvopt.settings.CAPOSettings` of a :class:`CAPOConfig`'s ``capo_*`` fields."""
    return CAPOSettings(**{name: getattr(args, PREFIX + name) for name in OPTIONS})


@dataclass
class _LossBatch:
    """What the loss forward needs to select tokens: the loss mask TRL will read (zeroed in place
    where CAPO rejects), the real attention mask, the sampled tokens and their advantages."""

    loss_mask: Tensor
    attention_mask: Tensor
    actions: Tensor
    advantages: Tensor


class CAPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that trains only on the tokens CAPO accepts.

    Takes the arguments of ``GRPOTrainer``; ``args`` must be a :class:`CAPOConfig`. ``self.capo``
    is the :class:`curvopt.CAPO` wrapping the trainer's optimizer (``None`` until training starts).

    Supported: every ``loss_type`` of trl 1.16 (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
    vespo), ``num_iterations > 1``, gradient accumulation and checkpointing, ``beta > 0``, tool
    masks, ``temperature``, models with a logit scale or soft-cap, one process or DDP. Raises for
    DeepSpeed, FSDP and tensor-parallel loading (the head or its step is not whole on each
    process), for a head tied to the input embedding unless ``capo_allow_tied_head``, for a frozen
    head (PEFT), and for ``dapo``/``cispo``/``vespo`` with TRL's entropy bonus or MoE auxiliary
    loss (their normalisation goes through the gradient, which would rescale those terms too).

    Metrics, reduced over all processes, appended to TRL's metrics after every optimizer step (so
    averaged over the steps of a logging interval): ``capo/rejected_frac``,
    ``capo/objective_shift_mean``, ``capo/policy_shift_mean``, ``capo/skipped_frac`` (1 for a step
    CAPO skipped because it kept no token) and, with ``capo_track_realised``, on steps taken,
    ``capo/policy_shift_realised`` and ``capo/policy_shift_step_model`` (see :class:`curvopt.CAPO`).
    Evaluation computes TRL's loss on all tokens and selects nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CAPOConfig):
            raise TypeError(
                f"args: expected a CAPOConfig (it holds the CAPO settings), "
                f"got {type(self.args).__name__}"
            )
        self._check_supported()
        self.capo: CAPO | None = None
        self._capo_batch: _LossBatch | None = None
        self._capo_window_loss = 0.0

    # ------------------------------------------------------------------ set-up

    @property
    def _capo_args(self) -> CAPOConfig:
        return cast(CAPOConfig, self.args)

    @property
    def _capo(self) -> CAPO:
        assert self.capo is not None  # training has started
        return self.capo

    def _policy(self) -> PreTrainedModel:
        """The transformers model whose forward TRL patched (the base model under PEFT)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _check_supported(self) -> None:
        args = self._capo_args
        if self.is_deepspeed_enabled:
            raise ValueError(
                "CAPOGRPOTrainer does not support DeepSpeed: its engine steps the optimizer "
                "inside backward (so CAPO cannot skip a step that kept no token) and partitions "
                "the head's gradient (so even capo_direction='shadow' cannot follow it). Train "
                "with DDP (`accelerate launch --multi_gpu`, no DeepSpeed config)."
            )
        if (
            self.is_fsdp_enabled
            or self.is_fsdp_xla_enabled
            or self.is_distributed_loading_by_transformers
        ):
            raise ValueError(
                "CAPOGRPOTrainer does not support FSDP or tensor parallelism: they shard lm_head, "
                "and CAPO needs the whole head and its gradient on every process. Train with DDP "
                "(`accelerate launch --multi_gpu`, no fsdp_config)."
            )
        model = self._policy()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module) or not any(p.requires_grad for p in head.parameters()):
            raise ValueError(
                "CAPO models the update of the output layer (lm_head), which is not trained here "
                "(PEFT adapters train other layers). Train lm_head, or use GRPOTrainer."
            )
        embedding = model.get_input_embeddings()
        tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
        if tied and not args.capo_allow_tied_head:
            raise ValueError(
                "lm_head.weight is tied to the input embedding, so its gradient also holds the "
                "embedding's share, which CAPO's per-token model cannot compute. Either set "
                "capo_allow_tied_head=True to model each candidate from the head's own gradient "
                "(the embedding's share is left out), or untie the head before training: "
                "`model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())`"
                "; `model.config.tie_word_embeddings = False`."
            )
        if args.loss_type in GLOBAL_NORMALISER and (
            self._entropy_bonus_enabled or self.aux_loss_enabled
        ):
            raise ValueError(
                f"loss_type={args.loss_type!r} with an entropy bonus (entropy_coef, "
                "use_adaptive_entropy) or a MoE auxiliary loss is not supported: CAPO normalises "
                "this loss by the kept tokens by rescaling the accumulated gradient, which would "
                "rescale those terms too. Use loss_type='bnpo' (normalised per micro-batch) or "
                "turn the extra term off."
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The trainer's optimizer, wrapped in :class:`curvopt.CAPO` (once)."""
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, CAPO):
            return optimizer
        policy = self._policy()
        scale, softcap = logit_transform(policy)
        options = capo_settings(self._capo_args)
        self.capo = CAPO(
            optimizer,
            policy.get_output_embeddings(),
            **{name: getattr(options, name) for name in OPTIONS},
            temperature=self._capo_args.temperature,
            logit_scale=scale,
            softcap=softcap,
        )
        self.capo.register_step_post_hook(self._log_capo)
        self.optimizer = self.capo
        return self.capo

    # ------------------------------------------------------------------ the loss

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """TRL's loss on a copy of ``inputs`` whose loss mask CAPO narrows during the forward."""
        if not cast(nn.Module, self.model).training or self.capo is None:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        # TRL's loss mask: this very tensor, so zeroing it after the forward reaches every use
        if "tool_mask" in inputs:
            loss_mask = completion_mask * inputs["tool_mask"]
        else:
            loss_mask = completion_mask.clone()
        local = {k: v for k, v in inputs.items() if k != "tool_mask"}
        local["completion_mask"] = loss_mask
        self._capo_batch = _LossBatch(
            loss_mask=loss_mask,
            attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            actions=inputs["completion_ids"],
            advantages=inputs["advantages"],
        )
        try:
            return super()._compute_loss(model, local)
        finally:
            self._capo_batch = None

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TRL's log-probabilities; in the loss forward, also select the tokens to train on from
        the backbone's output and zero the others in the loss mask."""
        batch, self._capo_batch = self._capo_batch, None
        if batch is None:  # generation-time log-probs, the reference model, evaluation
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        captured: list[Tensor] = []

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            captured.append(hidden.detach())

        hook = self._policy().base_model.register_forward_hook(capture)
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, batch.attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            hook.remove()
        if not captured:
            raise RuntimeError(
                "CAPOGRPOTrainer: the backbone's forward hook did not run during the loss forward, "
                "so there are no hidden states to select tokens from; the model's forward is not "
                "the one TRL's fused LM head expects."
            )
        # the state at position t predicts token t + 1: the completion's states end one early
        hidden = torch.cat(captured)[:, -logits_to_keep - 1 : -1]
        capo = self._capo
        # onto the head's device, as TRL does with a split model
        hidden = hidden.to(self._policy().get_output_embeddings().weight.device)
        keep = capo.select(hidden, batch.actions, batch.advantages, batch.loss_mask.bool())
        batch.loss_mask.mul_(keep)
        return out

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """TRL's micro-batch step; at the end of a step's window, the kept-token normalisation of
        dapo/cispo/vespo (Trainer clips and steps only after this returns)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_type not in GLOBAL_NORMALISER or self.capo is None:
            return loss
        self._capo_window_loss += float(loss)
        if not self.accelerator.sync_gradients:
            return loss
        window, self._capo_window_loss = self._capo_window_loss, 0.0
        stats = self.capo.stats
        if not stats.get("kept_tokens"):  # no token kept: no policy gradient, CAPO skips the step
            return loss
        ratio = stats["tokens"] / stats["kept_tokens"]
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(ratio)
        # the logged loss is summed over the window's micro-batches: rescale that sum too
        return loss + (ratio - 1.0) * window

    def _log_capo(self, *_: Any) -> None:
        """After each optimizer step (taken or skipped): its window's statistics, already reduced
        over the processes by CAPO."""
        stats = self._capo.stats
        metrics = self._metrics["train"]
        for name in STEP_STATS:
            if name in stats:
                metrics[f"capo/{name}"].append(stats[name])
        # CAPO skips a step whose window kept no token; averaged at log time: the skipped fraction
        metrics["capo/skipped_frac"].append(float(stats["kept_tokens"] == 0))


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
