"""The output layer CAPO's models are built on, and what needs it."""

from __future__ import annotations

from torch import nn

from .settings import CAPOSettings

__all__ = ["modelled_by", "output_embeddings", "output_layer"]


def output_embeddings(model: nn.Module | None) -> nn.Module | None:
    """``model``'s output layer, when it has one (transformers' ``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def modelled_by(settings: CAPOSettings) -> str | None:
    """What in ``settings`` models the optimizer's update of the output layer (None: nothing;
    ``track_realised`` measures the update taken, whatever the optimizer)."""
    if settings.levels:
        return f"token rejection (levels={settings.levels})"
    if settings.max_policy_shift is not None and settings.shift_estimate == "jvp":
        return "shift_estimate='jvp'"
    return None


def _needs(settings: CAPOSettings) -> str:
    if settings.levels:
        return f"token rejection (levels={settings.levels})"
    return "track_realised" if settings.track_realised else "shift_estimate='jvp'"


def output_layer(
    head: nn.Module | None, model: nn.Module | None, settings: CAPOSettings
) -> nn.Module:
    """The head the quadratic models are built on: ``head``, else the model's output layer."""
    why = _needs(settings)
    layer = head if head is not None else output_embeddings(model)
    if layer is None:
        raise TypeError(
            f"head: {why} models the output layer; pass head= (the model has no "
            "get_output_embeddings())"
        )
    if not any(p.requires_grad for p in layer.parameters()):
        raise ValueError(
            f"head: {why} models the output layer's update, but the output layer is frozen (no "
            "trainable parameter, e.g. a LoRA model). Bound the whole policy instead: "
            "CAPO(optimizer, model=model, levels=(), max_policy_shift=...) measures it with "
            "any trainable parameters"
        )
    return layer
