"""What the wrapped optimizer would do with a gradient: per-parameter step models.

A candidate subset S has objective f_S and ascent gradient G = ∇f_S. The optimizer sees the loss
gradient ``q = -G`` (a maximizing optimizer sees ``+f_S`` as its loss and flips the sign itself, so
the step is the same). A *step model* maps ``q`` to the parameter change Δ the optimizer would make
from its current state, without touching that state. Every model here is elementwise in the
parameter, so it can be restricted to a set of rows (the output rows of a linear head):
``step(q, rows)`` reads its state at ``rows`` (an integer tensor of any shape ``[..., K]``) and
returns Δ of the shape of ``q`` (``rows.shape + param.shape[1:]``).

- :class:`AffineStep`: ``Δ = drift + coef ⊙ q`` (SGD in every variant).
- :class:`FrozenAdamStep`: Adam with a fixed preconditioner, saturating like Adam.
- :class:`SignStep`: ``Δ = drift + scale · sign(q)`` (Adam's first step with ε → 0).
- :class:`AdamStep`: Adam/AdamW's exact step with the candidate's own prospective moments.

:func:`optimizer_steps` builds them from a real ``torch.optim`` optimizer; :class:`ShadowAdam` keeps
its own Adam moments for optimizers whose state cannot be read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AdamStep",
    "AffineStep",
    "FrozenAdamStep",
    "ShadowAdam",
    "SignStep",
    "StepModel",
    "optimizer_steps",
    "unwrap_optimizer",
]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _rows(t: Tensor | None, rows: Tensor | slice | None) -> Tensor | None:
    if t is None or rows is None:
        return t
    return t[rows]


@dataclass
class AffineStep:
    """Δ = drift + coef ⊙ q. ``coef`` is a float or a tensor of the parameter's shape."""

    drift: Tensor | None
    coef: float | Tensor

    def __call__(self, q: Tensor, rows: Tensor | slice | None = None) -> Tensor:
        coef = _rows(self.coef, rows) if isinstance(self.coef, Tensor) else self.coef
        out = q * coef
        drift = _rows(self.drift, rows)
        return out if drift is None else out + drift


@dataclass
class FrozenAdamStep:
    """Adam's step with a fixed preconditioner, saturated as Adam saturates.

    Elementwise ``Δ = drift + x / √(1 + (x / limit)²)`` with ``x = coef ⊙ q``: linear (the frozen
    preconditioner) while the candidate's own gradient is small against Adam's second moment, and
    tending to ``±limit`` — Adam's normalised step, lr/(1-β1^k)·(1-β1)·√((1-β2^k)/(1-β2)) — when it
    dominates. With the second moment held at ``v₀`` this is exactly Adam's share of the
    candidate, since ``(x / limit)² = (1-β2) q² / (β2 v₀)`` (ε aside).
    """

    drift: Tensor | None
    coef: Tensor
    limit: float

    def __call__(self, q: Tensor, rows: Tensor | slice | None = None) -> Tensor:
        x = q * _rows(self.coef, rows)
        out = x / torch.sqrt(1 + (x / self.limit).square())
        drift = _rows(self.drift, rows)
        return out if drift is None else out + drift


@dataclass
class SignStep:
    """Δ = drift + scale · sign(q): Adam's first step, −lr·q/(|q|+ε), in the limit ε → 0."""

    drift: Tensor | None
    scale: float

    def __call__(self, q: Tensor, rows: Tensor | slice | None = None) -> Tensor:
        out = torch.sign(q) * self.scale
        drift = _rows(self.drift, rows)
        return out if drift is None else out + drift


@dataclass
class AdamStep:
    """Adam/AdamW's exact step on loss gradient q with prospective moments (torch.optim.Adam).

    With k = step + 1, q̃ = q + λ·p (L2 decay, ``decoupled=False``)::

        m' = β1·m + (1-β1)·q̃        v' = β2·v + (1-β2)·q̃²     (v' ← max(v_max, v'): amsgrad)
        Δ  = -lr/(1-β1^k) · m' / (√v' / √(1-β2^k) + ε)  − [decoupled] lr·λ·p
    """

    param: Tensor
    exp_avg: Tensor | None
    exp_avg_sq: Tensor | None
    max_exp_avg_sq: Tensor | None
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    step: int

    def __call__(self, q: Tensor, rows: Tensor | slice | None = None) -> Tensor:
        p = _rows(self.param, rows)
        if self.weight_decay and not self.decoupled:
            q = q + self.weight_decay * p
        m = q * (1 - self.beta1)
        v = q * q * (1 - self.beta2)
        if self.exp_avg is not None:
            m = m + self.beta1 * _rows(self.exp_avg, rows)
            v = v + self.beta2 * _rows(self.exp_avg_sq, rows)
        if self.max_exp_avg_sq is not None:
            v = torch.maximum(v, _rows(self.max_exp_avg_sq, rows))
        k = self.step + 1
        step_size = self.lr / (1 - self.beta1**k)
        denom = v.sqrt() / math.sqrt(1 - self.beta2**k) + self.eps
        delta = m / denom * (-step_size)
        if self.weight_decay and self.decoupled:
            delta = delta - (self.lr * self.weight_decay) * p
        return delta


StepModel = AffineStep | FrozenAdamStep | SignStep | AdamStep


def _float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _sgd_step(p: Tensor, group: dict, state: dict, dtype: torch.dtype) -> AffineStep:
    # torch.optim.SGD: d = q + λp; buf' = d (first step) or μ·buf + (1-τ)·d;
    # d ← d + μ·buf' (nesterov) or buf'; Δ = -lr·d.  Hence Δ = -lr·(a·(q + λp) + e·buf).
    lr, mu, tau = _float(group["lr"]), group["momentum"], group["dampening"]
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
    drift = None
    if wd:
        drift = p.detach().to(dtype) * (-lr * a * wd)
    if e and buf is not None:
        b = buf.detach().to(dtype) * (-lr * e)
        drift = b if drift is None else drift + b
    return AffineStep(drift, -lr * a)


def _adam_hyper(group: dict) -> tuple[float, float, float, float, float, bool]:
    beta1, beta2 = (_float(b) for b in group["betas"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    return _float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], decoupled


def _adam_step(
    p: Tensor,
    group: dict,
    state: dict,
    dtype: torch.dtype,
    frozen: bool,
) -> StepModel:
    lr, beta1, beta2, eps, wd, decoupled = _adam_hyper(group)
    step = int(_float(state["step"])) if "step" in state else 0
    has_state = step > 0 and "exp_avg" in state
    amsgrad = bool(group.get("amsgrad", False))

    def read(key: str) -> Tensor | None:
        t = state.get(key) if has_state else None
        return None if t is None else t.detach().to(dtype)

    param = p.detach().to(dtype)
    if not frozen:
        return AdamStep(
            param=param,
            exp_avg=read("exp_avg"),
            exp_avg_sq=read("exp_avg_sq"),
            max_exp_avg_sq=read("max_exp_avg_sq") if amsgrad else None,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=wd,
            decoupled=decoupled,
            step=step,
        )
    return frozen_adam_step(
        param,
        read("exp_avg"),
        read("exp_avg_sq"),
        read("max_exp_avg_sq") if amsgrad else None,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=wd,
        decoupled=decoupled,
        step=step,
    )


def frozen_adam_step(
    param: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
) -> FrozenAdamStep | SignStep:
    """Adam's step with the second moment held at its zero-candidate value.

    The preconditioner is Adam's at step k = step + 1 with a zero candidate gradient,
    ``D = √(β2·v + (1-β2)·(λ_L2 p)²) / √(1-β2^k) + ε``; the first moment keeps the candidate's
    share (1-β1)·q exactly and the momentum and decay go to ``drift``. The candidate's share is
    saturated like Adam's (:class:`FrozenAdamStep`), so a gradient that dominates the second
    moment moves each weight by at most Adam's normalised step instead of by q/ε.

    With no state yet (the first step) Adam's step is ``−lr·q/(|q|+ε)``, returned as
    ``−lr·sign(q)`` (ε → 0; an L2 decay term is left out of the sign).
    """
    decay = -lr * weight_decay * param if (weight_decay and decoupled) else None
    if exp_avg is None or exp_avg_sq is None or step == 0:
        return SignStep(decay, -lr)
    k = step + 1
    l2 = weight_decay * param if (weight_decay and not decoupled) else None
    v = exp_avg_sq * beta2
    if l2 is not None:
        v = v + (1 - beta2) * l2 * l2
    if max_exp_avg_sq is not None:
        v = torch.maximum(v, max_exp_avg_sq)
    step_size = lr / (1 - beta1**k)
    denom = v.sqrt() / math.sqrt(1 - beta2**k) + eps
    m0 = exp_avg * beta1
    if l2 is not None:
        m0 = m0 + (1 - beta1) * l2
    drift = m0 / denom * (-step_size)
    if decay is not None:
        drift = drift + decay
    limit = step_size * (1 - beta1) * math.sqrt((1 - beta2**k) / (1 - beta2))
    return FrozenAdamStep(drift, denom.reciprocal() * (-step_size * (1 - beta1)), limit)


def _group_of(optimizer: torch.optim.Optimizer, p: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise ValueError("head parameter is not in the optimizer's param_groups")


def optimizer_steps(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    *,
    frozen: bool,
    dtype: torch.dtype,
) -> list[StepModel]:
    """Step models of ``params`` under ``optimizer``'s current state and hyperparameters.

    ``frozen=False`` gives the exact step (SGD is affine, so it is exact either way);
    ``frozen=True`` gives :func:`frozen_adam_step` for Adam/AdamW. Tensors are in ``dtype``.
    Hyperparameters are read from the param groups now, so schedulers are honoured.
    """
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"optimizer: reading the real optimizer state supports {names}; got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}. "
            "Use direction='shadow' for other optimizers."
        )
    out: list[StepModel] = []
    for p in params:
        group, state = _group_of(optimizer, p), optimizer.state.get(p, {})
        if isinstance(optimizer, torch.optim.SGD):
            out.append(_sgd_step(p, group, state, dtype))
        else:
            out.append(_adam_step(p, group, state, dtype, frozen))
    return out


class ShadowAdam:
    """Adam moments of the head kept by curvopt itself, for optimizers whose state is unreadable.

    At each real step :meth:`update` advances ``m, v`` from the head's gradient exactly as Adam
    would; :meth:`steps` returns the exact or frozen step model of that shadow Adam with the
    group's learning rate. ``betas``/``eps`` come from the param group when it has them,
    else Adam's defaults; ``weight_decay`` is treated as decoupled (AdamW-style).
    """

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.exp_avg: list[Tensor | None] = [None] * len(self.params)
        self.exp_avg_sq: list[Tensor | None] = [None] * len(self.params)
        self.step = 0

    def _hyper(self, p: Tensor) -> tuple[float, float, float, float, float]:
        group = _group_of(self.optimizer, p)
        beta1, beta2 = (_float(b) for b in group.get("betas", (0.9, 0.999)))
        return (
            _float(group["lr"]),
            beta1,
            beta2,
            float(group.get("eps", 1e-8)),
            float(group.get("weight_decay", 0.0)),
        )

    @torch.no_grad()
    def update(self) -> None:
        """Advance the moments with the head's current ``.grad`` (call once per real step)."""
        if all(p.grad is None for p in self.params):
            return
        self.step += 1
        for i, p in enumerate(self.params):
            _, beta1, beta2, _, _ = self._hyper(p)
            g = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            if self.exp_avg[i] is None:
                self.exp_avg[i] = torch.zeros_like(g)
                self.exp_avg_sq[i] = torch.zeros_like(g)
            self.exp_avg[i].mul_(beta1).add_(g, alpha=1 - beta1)
            self.exp_avg_sq[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)

    def steps(self, dtype: torch.dtype, *, frozen: bool) -> list[StepModel]:
        """Step models of the shadow Adam: exact (:class:`AdamStep`) or frozen."""
        out: list[StepModel] = []
        for i, p in enumerate(self.params):
            lr, beta1, beta2, eps, wd = self._hyper(p)
            m, v = self._moments(i, dtype)
            step = self.step if m is not None else 0
            hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, decoupled=True)
            param = p.detach().to(dtype)
            if frozen:
                out.append(frozen_adam_step(param, m, v, None, step=step, **hyper))
            else:
                out.append(AdamStep(param, m, v, None, step=step, **hyper))
        return out

    def _moments(self, i: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        m, v = self.exp_avg[i], self.exp_avg_sq[i]
        return (None if m is None else m.to(dtype)), (None if v is None else v.to(dtype))

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "exp_avg": [None if t is None else t.clone() for t in self.exp_avg],
            "exp_avg_sq": [None if t is None else t.clone() for t in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict) -> None:
        n = len(self.params)
        if len(state["exp_avg"]) != n or len(state["exp_avg_sq"]) != n:
            raise ValueError(
                f"state_dict: the shadow moments are for another head ({n} parameters expected)"
            )
        self.step = int(state["step"])
        self.exp_avg = [None if t is None else t.clone() for t in state["exp_avg"]]
        self.exp_avg_sq = [None if t is None else t.clone() for t in state["exp_avg_sq"]]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: follows ``.optimizer`` through wrappers (accelerate's
    ``AcceleratedOptimizer``, :class:`curvopt.CAPO`) down to the innermost optimizer."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer
