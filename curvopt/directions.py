"""What the wrapped optimizer would do with a gradient: per-parameter step models.

A candidate subset S has objective f_S and ascent gradient G = ∇f_S. The optimizer sees the loss
gradient ``q = -G`` (a maximizing optimizer sees ``+f_S`` as its loss and flips the sign itself, so
the step is the same). A *step model* maps ``q`` to the parameter change Δ the optimizer would make
from its current state, without touching that state. Every model here is elementwise in the
parameter, so it can be restricted to a set of rows (the output rows of a linear head):
``step(q, rows)`` reads its state at ``rows`` (an integer tensor of any shape ``[..., K]``) and
returns Δ of the shape of ``q`` (``rows.shape + param.shape[1:]``).

- :class:`AffineStep`: ``Δ = coef·q + drift`` (SGD in every variant).
- :class:`FrozenAdamStep`: Adam with a fixed preconditioner, saturating like Adam.
- :class:`SignStep`: ``Δ = scale·sign(q) + drift`` (Adam's first step with ε → 0).
- :class:`AdamStep`: Adam/AdamW's exact step with the candidate's own prospective moments.

The models hold references to the optimizer's tensors and compute only the rows they are asked
for (in the requested dtype), so nothing parameter-sized is materialised per call.

:func:`optimizer_steps` builds them from a real ``torch.optim`` optimizer; :class:`ShadowAdam` keeps
its own Adam moments for optimizers whose state cannot be read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels

__all__ = [
    "AdamStep",
    "AffineStep",
    "FrozenAdamStep",
    "Restricted",
    "ShadowAdam",
    "SignStep",
    "StepModel",
    "adam_delta",
    "adam_step",
    "optimizer_steps",
    "restrict",
    "unwrap_optimizer",
]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


Rows = Tensor | slice | None


def _rows(t: Tensor | None, rows: Rows, dtype: torch.dtype) -> Tensor | None:
    """``t`` restricted to ``rows`` (all rows for None), converted to ``dtype``."""
    if t is None:
        return None
    t = t if rows is None else t[rows]
    return t.to(dtype)


@dataclass
class AffineStep:
    """Δ = coef·q + Σ_i scale_i·tensor_i (the drift: momentum and decay terms)."""

    coef: float
    drift_terms: tuple[tuple[float, Tensor], ...]
    dtype: torch.dtype

    def drift(self, rows: Rows = None) -> Tensor | None:
        out = None
        for scale, t in self.drift_terms:
            term = _rows(t, rows, self.dtype) * scale
            out = term if out is None else out + term
        return out

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        drift = self.drift(rows)
        return q * self.coef if drift is None else q * self.coef + drift


@dataclass
class SignStep:
    """Δ = scale·sign(q) + decay·p: Adam's first step, −lr·q/(|q|+ε), in the limit ε → 0."""

    scale: float
    decay: float
    param: Tensor
    dtype: torch.dtype

    def drift(self, rows: Rows = None) -> Tensor | None:
        return _rows(self.param, rows, self.dtype) * self.decay if self.decay else None

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        drift = self.drift(rows)
        out = torch.sign(q) * self.scale
        return out if drift is None else out + drift


@dataclass
class _AdamState:
    """Adam's hyperparameters and its state for one parameter, read lazily by rows."""

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
    dtype: torch.dtype

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1 ** (self.step + 1))

    def _read(self, t: Tensor | None, rows: Rows) -> Tensor | None:
        return _rows(t, rows, self.dtype)


class AdamStep(_AdamState):
    """Adam/AdamW's exact step on loss gradient q with prospective moments (torch.optim.Adam).

    With k = step + 1, q̃ = q + λ·p (L2 decay, ``decoupled=False``)::

        m' = β1·m + (1-β1)·q̃        v' = β2·v + (1-β2)·q̃²     (v' ← max(v_max, v'): amsgrad)
        Δ  = -lr/(1-β1^k) · m' / (√v' / √(1-β2^k) + ε)  − [decoupled] lr·λ·p
    """

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        return adam_delta(
            q,
            self._read(self.param, rows),
            self._read(self.exp_avg, rows),
            self._read(self.exp_avg_sq, rows),
            self._read(self.max_exp_avg_sq, rows),
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.decoupled,
            self.step,
        )


def adam_delta(
    q: Tensor,
    param: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
) -> Tensor:
    """Δ of :class:`AdamStep` on state already restricted to q's rows (plain tensors and numbers,
    so that it can be fused by ``torch.compile``)."""
    if weight_decay and not decoupled:
        q = q + weight_decay * param
    m = q * (1 - beta1)
    v = q * q * (1 - beta2)
    if exp_avg is not None:
        m = m + beta1 * exp_avg
        v = v + beta2 * exp_avg_sq
    if max_exp_avg_sq is not None:
        v = torch.maximum(v, max_exp_avg_sq)
    k = step + 1
    denom = v.sqrt() / math.sqrt(1 - beta2**k) + eps
    delta = m / denom * (-lr / (1 - beta1**k))
    if weight_decay and decoupled:
        delta = delta - (lr * weight_decay) * param
    return delta


class FrozenAdamStep(_AdamState):
    """Adam's step with its second moment held at the zero-candidate value, saturating like Adam.

    With k = step + 1 and the preconditioner ``D = √(β2·v + (1-β2)·(λ_L2 p)²) / √(1-β2^k) + ε``
    (v ← max(v_max, ·) with amsgrad)::

        coef  = −lr/(1-β1^k)·(1-β1) / D
        drift = −lr/(1-β1^k)·(β1·m + (1-β1)·λ_L2 p) / D − [decoupled] lr·λ·p
        Δ     = drift + x / √(1 + (x / limit)²),   x = coef ⊙ q,
        limit = lr/(1-β1^k)·(1-β1)·√((1-β2^k)/(1-β2))

    Linear in q (the frozen preconditioner) while the candidate's gradient is small against the
    second moment, and tending to ±limit, Adam's normalised step, when it dominates: with the
    second moment at v₀, ``(x / limit)² = (1-β2) q² / (β2 v₀)``, so this is Adam's own response to
    the candidate with the momentum held apart (ε aside).
    """

    @property
    def limit(self) -> float:
        k = self.step + 1
        return self.step_size * (1 - self.beta1) * math.sqrt((1 - self.beta2**k) / (1 - self.beta2))

    def parts(self, rows: Rows = None) -> tuple[Tensor, Tensor]:
        """(coef, drift) at ``rows``, computed from the state there (nothing is cached)."""
        tensors = [self._read(t, rows) for t in (self.param, self.exp_avg, self.exp_avg_sq)]
        vmax = self._read(self.max_exp_avg_sq, rows)
        k = self.step + 1
        l2 = self.weight_decay if not self.decoupled else 0.0
        decay = self.lr * self.weight_decay if self.decoupled else 0.0
        return kernels.call(
            frozen_parts, tensors[0].numel(), *tensors, vmax, self.beta1, self.beta2,
            self.eps, math.sqrt(1 - self.beta2**k), self.step_size, l2, decay,
        )  # fmt: skip

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        coef, drift = self.parts(rows)
        x = q * coef
        return x / torch.sqrt(1 + (x / self.limit).square()) + drift


StepModel = AffineStep | FrozenAdamStep | SignStep | AdamStep


def frozen_parts(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    root: float,
    step_size: float,
    l2: float,
    decay: float,
) -> tuple[Tensor, Tensor]:
    """(coef, drift) of :class:`FrozenAdamStep` from its state on some rows (plain tensors and
    numbers, so that it can be fused): ``root = √(1-β2^k)``, ``step_size = lr/(1-β1^k)``, ``l2``
    the L2 coefficient and ``decay`` = lr·λ of decoupled decay (one of them 0)."""
    v = exp_avg_sq * beta2
    m = exp_avg * beta1
    if l2:
        v = v + (1 - beta2) * (l2 * param).square()
        m = m + (1 - beta1) * l2 * param
    if max_exp_avg_sq is not None:
        v = torch.maximum(v, max_exp_avg_sq)
    inv = 1 / (v.sqrt() / root + eps)
    drift = m * inv * (-step_size)
    if decay:
        drift = drift - decay * param
    return inv * (-step_size * (1 - beta1)), drift


@dataclass
class Restricted:
    """A step model on a set of rows, with its coefficient and drift computed there once.

    ``coef`` is the affine coefficient (:class:`AffineStep`), the sign scale
    (:class:`SignStep`), the preconditioner at the rows (:class:`FrozenAdamStep`), or None
    (:class:`AdamStep`, evaluated elementwise from its state).
    """

    step: StepModel
    rows: Rows
    coef: float | Tensor | None
    drift: Tensor | None

    def __call__(self, q: Tensor) -> Tensor:
        """Δ for loss gradient ``q`` on these rows (elementwise)."""
        if isinstance(self.step, AdamStep):
            return self.step(q, self.rows)
        if isinstance(self.step, SignStep):
            out = torch.sign(q) * self.coef
        elif isinstance(self.step, FrozenAdamStep):
            x = q * self.coef
            out = x / torch.sqrt(1 + (x / self.step.limit).square())
        else:
            out = q * self.coef
        return out if self.drift is None else out + self.drift


def restrict(step: StepModel, rows: Rows = None) -> Restricted:
    """``step`` on ``rows`` (None: all rows; a slice; or an index tensor ``[..., K]``)."""
    if isinstance(step, AdamStep):
        return Restricted(step, rows, None, None)
    if isinstance(step, FrozenAdamStep):
        return Restricted(step, rows, *step.parts(rows))
    coef = step.coef if isinstance(step, AffineStep) else step.scale
    return Restricted(step, rows, coef, step.drift(rows))


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
    terms = []
    if wd:
        terms.append((-lr * a * wd, p.detach()))
    if e and buf is not None:
        terms.append((-lr * e, buf.detach()))
    return AffineStep(-lr * a, tuple(terms), dtype)


def adam_step(
    param: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    *,
    frozen: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
    dtype: torch.dtype,
) -> StepModel:
    """The exact (:class:`AdamStep`) or frozen (:class:`FrozenAdamStep`) model of an Adam step.

    With no state yet (the first step) Adam's step is ``−lr·q/(|q|+ε)`` whatever the state, so
    the frozen model is :class:`SignStep` (ε → 0; an L2 decay term is left out of the sign).
    """
    state = dict(
        param=param.detach(),
        exp_avg=None if exp_avg is None else exp_avg.detach(),
        exp_avg_sq=None if exp_avg_sq is None else exp_avg_sq.detach(),
        max_exp_avg_sq=None if max_exp_avg_sq is None else max_exp_avg_sq.detach(),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
        step=step,
        dtype=dtype,
    )
    if not frozen:
        return AdamStep(**state)
    if exp_avg is None or exp_avg_sq is None or step == 0:
        decay = -lr * weight_decay if (weight_decay and decoupled) else 0.0
        return SignStep(-lr, decay, param.detach(), dtype)
    return FrozenAdamStep(**state)


def _adam_from_optimizer(
    p: Tensor, group: dict, state: dict, dtype: torch.dtype, frozen: bool
) -> StepModel:
    beta1, beta2 = (_float(b) for b in group["betas"])
    step = int(_float(state["step"])) if "step" in state else 0
    has_state = step > 0 and "exp_avg" in state
    amsgrad = bool(group.get("amsgrad", False))
    return adam_step(
        p,
        state["exp_avg"] if has_state else None,
        state["exp_avg_sq"] if has_state else None,
        state.get("max_exp_avg_sq") if (has_state and amsgrad) else None,
        frozen=frozen,
        lr=_float(group["lr"]),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        decoupled=bool(group.get("decoupled_weight_decay", False)),
        step=step,
        dtype=dtype,
    )


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
    ``frozen=True`` the frozen model for Adam/AdamW (:func:`adam_step`). The models read the
    state lazily, by rows, in ``dtype``; hyperparameters are read from the param groups now, so
    schedulers are honoured.
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
            out.append(_adam_from_optimizer(p, group, state, dtype, frozen))
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
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            out.append(
                adam_step(
                    p,
                    m,
                    v,
                    None,
                    frozen=frozen,
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    weight_decay=wd,
                    decoupled=True,
                    step=self.step if m is not None else 0,
                    dtype=dtype,
                )
            )
        return out

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
