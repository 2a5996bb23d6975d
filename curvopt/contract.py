"""What a wrapper owes the ``torch.optim`` contract beyond sharing the inner optimizer's state.

- State-dict hooks: ``register_state_dict_pre_hook``/``post_hook`` and the ``load_state_dict``
  ones are stored by ``torch.optim.Optimizer``; a wrapper whose ``state_dict`` delegates to the
  inner optimizer runs them itself, in torch's order (:func:`state_dict`, :func:`load_state_dict`).
- ``torch.amp.GradScaler``: an optimizer with ``_step_supports_amp_scaling`` is always stepped by
  the scaler, with ``found_inf`` (and, when the gradients are still scaled, ``grad_scale``) set on
  it; it unscales the gradients itself and takes no step when ``found_inf`` is set
  (:func:`amp_step`). This is how a wrapper learns that a step was skipped (a scaler that skips
  the step never calls it); the unscaling is ``GradScaler.unscale_``'s, so the step is bit for bit
  the bare optimizer's.
- accelerate: an ``AcceleratedOptimizer`` steps its optimizer only at the end of a gradient
  accumulation window (:func:`at_step_boundary`) and reports a step its scaler skipped
  (:func:`inner_step_skipped`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "amp_step",
    "at_step_boundary",
    "inner_step_skipped",
    "load_state_dict",
    "state_dict",
    "unscale_",
]


def state_dict(optimizer: torch.optim.Optimizer, build: Callable[[], dict[str, Any]]) -> Any:
    """``build()`` wrapped in ``optimizer``'s state-dict pre- and post-hooks, as
    ``torch.optim.Optimizer.state_dict`` runs them (a post-hook may return a replacement)."""
    for pre_hook in optimizer._optimizer_state_dict_pre_hooks.values():
        pre_hook(optimizer)
    state = build()
    for post_hook in optimizer._optimizer_state_dict_post_hooks.values():
        result = post_hook(optimizer, state)
        if result is not None:
            state = result
    return state


def load_state_dict(
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    load: Callable[[dict[str, Any]], None],
) -> None:
    """``load(state)`` wrapped in ``optimizer``'s load-state-dict pre- and post-hooks, as
    ``torch.optim.Optimizer.load_state_dict`` runs them (a pre-hook may return a replacement)."""
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state)
        if result is not None:
            state = result
    load(state)
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


@torch.no_grad()
def unscale_(optimizer: torch.optim.Optimizer, grad_scale: Tensor) -> None:
    """Divide every gradient by ``grad_scale`` in place, as ``GradScaler.unscale_`` does (the
    same float32 reciprocal and kernel, so the values are bit for bit the scaler's)."""
    inv_scale = grad_scale.double().reciprocal().float()
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if grad.dtype is torch.float16:
                    p.grad = grad = grad.coalesce()
                grad = grad._values()
            by_device.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, _), grads in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device))


def amp_step(optimizer: torch.optim.Optimizer) -> bool:
    """Under a ``GradScaler`` (which set ``found_inf`` on ``optimizer`` before calling its
    ``step``): unscale the gradients if the scaler left them scaled, and return whether the step
    must be skipped (non-finite gradients). False when no scaler is stepping it."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return False
    grad_scale = getattr(optimizer, "grad_scale", None)
    if float(found_inf) > 0:
        return True
    if grad_scale is not None:
        unscale_(optimizer, grad_scale)
    return False


def at_step_boundary(optimizer: torch.optim.Optimizer) -> bool:
    """False while an accelerate-wrapped optimizer accumulates gradients (``sync_gradients``)."""
    state = getattr(optimizer, "gradient_state", None)
    return bool(getattr(state, "sync_gradients", True))


def inner_step_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step just requested of ``optimizer`` was skipped by a wrapper's gradient
    scaler (accelerate's ``AcceleratedOptimizer.step_was_skipped``)."""
    return bool(getattr(optimizer, "step_was_skipped", False))
