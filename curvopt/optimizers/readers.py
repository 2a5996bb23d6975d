"""Update rules read from a real ``torch.optim`` optimizer's state and hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .copied import copy_rule
from .rules import AffineStep, UpdateRule, adam_rule
from .support import CLOSED_FORM, ELEMENTWISE, check_modelled, recognised

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "OptimizerReader",
    "RuleSource",
    "group_of",
    "loss_gradients",
    "planned_update",
    "read_rules",
    "unwrap_optimizer",
]


def as_float(x: float | Tensor) -> float:
    """A hyperparameter as a float (param groups may hold tensors)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def group_of(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
    """The param group holding ``p``."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise ValueError("head parameter is not in the optimizer's param_groups")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: follows ``.optimizer`` through wrappers (accelerate's
    ``AcceleratedOptimizer``, :class:`curvopt.CAPO`) down to the innermost optimizer."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def _sgd_rule(
    p: Tensor, group: dict[str, Any], state: dict[str, Any], dtype: torch.dtype, frozen: bool
) -> AffineStep:
    # affine, so exact whether frozen or not. torch.optim.SGD: d = q + λp; buf' = d (first
    # step) or μ·buf + (1-τ)·d; d ← d + μ·buf' (nesterov) or buf'; Δ = -lr·d.
    # Hence Δ = -lr·(a·(q + λp) + e·buf).
    lr, mu, tau = as_float(group["lr"]), group["momentum"], group["dampening"]
    wd, nesterov = group["weight_decay"], group["nesterov"]
    buf = state.get("momentum_buffer")
    if mu == 0:
        a, e = 1.0, 0.0
    elif buf is None:
        a, e = (1.0 + mu if nesterov else 1.0), 0.0
    elif nesterov:
        a, e = 1.0 + mu * (1 - tau), mu * mu
    else:
        a, e = 1.0 - tau, mu
    terms = []
    if wd:
        terms.append((-lr * a * wd, p.detach()))
    if e and buf is not None:
        terms.append((-lr * e, buf.detach()))
    return AffineStep(-lr * a, tuple(terms), dtype)


def _adam_rule(
    p: Tensor, group: dict[str, Any], state: dict[str, Any], dtype: torch.dtype, frozen: bool
) -> UpdateRule:
    beta1, beta2 = (as_float(b) for b in group["betas"])
    step = int(as_float(state["step"])) if "step" in state else 0
    has_state = step > 0 and "exp_avg" in state
    amsgrad = bool(group.get("amsgrad", False))
    return adam_rule(
        p,
        state["exp_avg"] if has_state else None,
        state["exp_avg_sq"] if has_state else None,
        state.get("max_exp_avg_sq") if (has_state and amsgrad) else None,
        frozen=frozen,
        lr=as_float(group["lr"]),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        decoupled=bool(group.get("decoupled_weight_decay", False)),
        step=step,
        dtype=dtype,
    )


Reader = Callable[[Tensor, dict[str, Any], dict[str, Any], torch.dtype, bool], UpdateRule]
# The closed forms of the optimizers curvopt reads (the elementwise ones step a copy).
READERS: dict[type[torch.optim.Optimizer], Reader] = {
    torch.optim.SGD: _sgd_rule,
    torch.optim.Adam: _adam_rule,
    torch.optim.AdamW: _adam_rule,
}
SUPPORTED_OPTIMIZERS = CLOSED_FORM + ELEMENTWISE


def read_rules(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    *,
    frozen: bool,
    dtype: torch.dtype,
) -> list[UpdateRule]:
    """Update rules of ``params`` under ``optimizer``'s current state and hyperparameters.

    ``frozen=False`` gives the exact step (SGD is affine, so it is exact either way);
    ``frozen=True`` the frozen rule for Adam/AdamW (:func:`~curvopt.optimizers.rules.adam_rule`);
    the elementwise optimizers have no frozen form: their rule is always the exact
    :class:`~curvopt.optimizers.copied.CopyStep`. The rules read the state lazily, by rows, in
    ``dtype``; hyperparameters are read from the param groups now, so schedulers are honoured.
    Raises :class:`TypeError` for an optimizer curvopt does not model
    (:mod:`~curvopt.optimizers.support`).
    """
    check_modelled(optimizer, "modelling the update")
    known = recognised(optimizer)
    assert known is not None
    out: list[UpdateRule] = []
    groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    for p in params:
        group = groups.get(id(p)) or group_of(optimizer, p)  # group_of raises the clear error
        state = optimizer.state.get(p, {})
        if known in READERS:
            out.append(READERS[known](p, group, state, dtype, frozen))
        else:
            out.append(copy_rule(known, p, group, state, dtype))
    return out


class RuleSource(Protocol):
    """Where the update rules of the tracked parameters come from: the real optimizer's state
    (:class:`OptimizerReader`) or curvopt's own moments (:class:`~.shadow.ShadowAdam`)."""

    def rules(self, dtype: torch.dtype, *, frozen: bool) -> list[UpdateRule]:
        """The exact (``frozen=False``) or frozen rules, computing in ``dtype``."""
        ...


class OptimizerReader:
    """The update rules of ``params`` read from the real optimizer's state at each call."""

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer

    def rules(self, dtype: torch.dtype, *, frozen: bool) -> list[UpdateRule]:
        return read_rules(self.optimizer, self.params, frozen=frozen, dtype=dtype)


def loss_gradients(
    rules: Sequence[UpdateRule], params: Sequence[Tensor], optimizer: torch.optim.Optimizer
) -> list[Tensor | None]:
    """The loss gradient each rule steps on: ``.grad`` in the rule's dtype, negated where the
    group maximizes (as torch does); None for a parameter without a gradient (torch optimizers
    do not step it)."""
    maximize = {
        id(p): bool(g.get("maximize", False)) for g in optimizer.param_groups for p in g["params"]
    }
    out: list[Tensor | None] = []
    for rule, p in zip(rules, params):
        if p.grad is None:
            out.append(None)
            continue
        g = p.grad.detach().to(rule.dtype)
        out.append(-g if maximize.get(id(p), False) else g)
    return out


def planned_update(
    rules: Sequence[UpdateRule], params: Sequence[Tensor], optimizer: torch.optim.Optimizer
) -> list[Tensor]:
    """Δθ the optimizer is about to take: its update rule applied to each loss gradient
    (:func:`loss_gradients`); 0 for a parameter without a gradient."""
    return [
        torch.zeros_like(p, dtype=rule.dtype) if q is None else rule.full(q)
        for rule, p, q in zip(rules, params, loss_gradients(rules, params, optimizer))
    ]
