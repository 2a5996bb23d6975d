"""Update rules: what the wrapped optimizer would do with a gradient, per parameter.

A candidate subset S has objective f_S and ascent gradient G = ∇f_S. The optimizer sees the loss
gradient ``q = -G`` (a maximizing optimizer sees ``+f_S`` as its loss and flips the sign itself, so
the step is the same). An *update rule* maps ``q`` to the parameter change Δ the optimizer would
make from its current state, without touching that state. Every rule here is elementwise in the
parameter, so it can be restricted to a set of rows (the output rows of a linear head):
``rule(q, rows)`` reads its state at ``rows`` (an integer tensor of any shape ``[..., K]``) and
returns Δ of the shape of ``q`` (``rows.shape + param.shape[1:]``).

- :class:`AffineStep`: ``Δ = coef·q + drift`` (SGD in every variant).
- :class:`FrozenAdamStep`: Adam with a fixed preconditioner, saturating like Adam.
- :class:`SignStep`: ``Δ = scale·sign(q) + drift`` (Adam's first step with ε → 0).
- :class:`AdamStep`: Adam/AdamW's exact step with the candidate's own prospective moments.

The rules hold references to the optimizer's tensors and compute only the rows they are asked
for (in the requested dtype), so nothing parameter-sized is materialised per call. Besides Δ
itself, each rule answers what a linear head needs: its response to a rank-one gradient
``cv ⊗ h`` seen through the head (:meth:`UpdateRule.rank_one`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .. import fusion
from . import adam

__all__ = [
    "AdamStep",
    "AffineStep",
    "FrozenAdamStep",
    "Restricted",
    "Rows",
    "SignStep",
    "UpdateRule",
    "adam_rule",
    "column_rows",
    "read_rows",
    "row_blocks",
    "rows_dot",
    "saturate",
]

Rows = Tensor | slice | None
Kind = Literal["affine", "sign", "frozen", "adam", "copy"]


def read_rows(t: Tensor, rows: Rows, dtype: torch.dtype) -> Tensor:
    """``t`` restricted to ``rows`` (all rows for None), converted to ``dtype``."""
    return (t if rows is None else t[rows]).to(dtype)


def rows_dot(m: Tensor, x: Tensor) -> Tensor:
    """``y[t, j] = m_t[j] · x[t]``: ``x @ mᵀ`` for rows shared by all tokens (``m [R, H]``), a
    batched product for gathered rows (``m [n, K, H]``)."""
    if m.dim() == 2:
        return x @ m.T
    return torch.bmm(m, x.unsqueeze(2)).squeeze(2)


def column_rows(rows: Rows, c0: int, c1: int) -> Rows:
    """The head rows of support columns ``c0:c1`` (``rows``: None = all, a slice, or [n, K])."""
    if rows is None:
        return slice(c0, c1)
    if isinstance(rows, slice):
        return slice(rows.start + c0, rows.start + c1)
    return rows[:, c0:c1]


def saturate(kind: str, q: Tensor, g: float | Tensor, reach: float | Tensor | None) -> Tensor:
    """A closed-form rule's share of the change for loss gradient ``q``, with coefficient ``g``:
    ``g·q`` (affine), ``g·sign(q)`` (sign), or ``x / √(1 + (x / reach)²)`` with ``x = g·q``
    (frozen Adam, saturating at ``±reach``), evaluated as ``x·reach / hypot(reach, x)`` so that
    no square overflows however large the gradient (e.g. huge advantages). Plain values, so it
    fuses into compiled callers."""
    if kind == "frozen":
        assert reach is not None
        x = q * g
        r = reach if isinstance(reach, Tensor) else x.new_full((), reach)
        return x * (r / torch.hypot(r, x))
    if kind == "sign":
        return torch.sign(q) * g
    return q * g


@dataclass
class Restricted:
    """An update rule on a set of rows, with its coefficient and drift computed there once.

    ``coef`` is the affine coefficient (:class:`AffineStep`), the sign scale
    (:class:`SignStep`), the preconditioner at the rows (:class:`FrozenAdamStep`), or None
    (:class:`AdamStep`, evaluated elementwise from its state).
    """

    rule: UpdateRule
    rows: Rows
    coef: float | Tensor | None
    drift: Tensor | None

    def __call__(self, q: Tensor) -> Tensor:
        """Δ for loss gradient ``q`` on these rows (elementwise)."""
        return self.rule.on_rows(self, q)


class UpdateRule(ABC):
    """Δ = rule(q): the change one parameter would get from loss gradient ``q``.

    ``kind`` names the closed form for fused code; ``closed_form`` is False for a rule whose
    rank-one response must be evaluated elementwise (Adam's exact step).
    """

    kind: ClassVar[Kind]
    closed_form: ClassVar[bool] = True
    dtype: torch.dtype

    @abstractmethod
    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        """Δ for loss gradient ``q`` at ``rows`` (elementwise)."""

    @abstractmethod
    def restrict(self, rows: Rows = None) -> Restricted:
        """This rule on ``rows`` (None: all rows; a slice; or an index tensor ``[..., K]``)."""

    @property
    def limit(self) -> float | None:
        """The bound of a saturating rule's share (None: it does not saturate)."""
        return None

    def full(self, q: Tensor) -> Tensor:
        """Δ of the whole parameter for loss gradient ``q`` (fused where it pays)."""
        return self(q)

    def point(self, q: Tensor, start: Tensor, scale: float, out: Tensor) -> Tensor:
        """Write ``start + scale·Δ(q)`` for the whole parameter into ``out`` and return it
        (``start``: the parameter's value, in the rule's dtype; ``out``: of its shape and dtype,
        sharing memory with nothing the rule reads). Here Δ is formed, then the sum taken into
        ``out``; rules that can, form it in one pass."""
        return torch.add(start, self.full(q), alpha=scale, out=out)

    def on_rows(self, part: Restricted, q: Tensor) -> Tensor:
        """Δ for ``q`` on ``part``'s rows, from its precomputed coefficient and drift."""
        assert part.coef is not None
        out = saturate(self.kind, q, part.coef, self.limit)
        return out if part.drift is None else out + part.drift

    def factor(self, coef: float | Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """For loss gradients ``q_t = cv_t ⊗ h_t`` (``h [n, H]``): the per-row coefficient g and
        reach of :func:`saturate` such that ``Σ_c Δ_{t,j,c} h_{t,c} = saturate(cv_tj; g_tj)``
        (the drift apart). ``coef`` is the restricted rule's."""
        raise NotImplementedError(f"{type(self).__name__} has no closed rank-one form")

    def rank_one(self, part: Restricted, h: Tensor, cv: Tensor, max_elements: int) -> Tensor:
        """``u_tj = Σ_c Δ_{t,j,c} h_{t,c}`` for loss gradients ``q_t = cv_t ⊗ h_t`` on ``part``'s
        rows (``cv [n, R]``, ``h [n, H]``), the drift apart; temporaries stay below about
        ``max_elements``."""
        assert part.coef is not None
        return saturate(self.kind, cv, *self.factor(part.coef, h))


@dataclass
class AffineStep(UpdateRule):
    """Δ = coef·q + Σ_i scale_i·tensor_i (the drift: momentum and decay terms)."""

    kind: ClassVar[Kind] = "affine"
    coef: float
    drift_terms: tuple[tuple[float, Tensor], ...]
    dtype: torch.dtype

    def drift(self, rows: Rows = None) -> Tensor | None:
        out = None
        for scale, t in self.drift_terms:
            term = read_rows(t, rows, self.dtype) * scale
            out = term if out is None else out + term
        return out

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        drift = self.drift(rows)
        return q * self.coef if drift is None else q * self.coef + drift

    def restrict(self, rows: Rows = None) -> Restricted:
        return Restricted(self, rows, self.coef, self.drift(rows))

    def factor(self, coef: float | Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        return coef * (h * h).sum(1, keepdim=True), None


@dataclass
class SignStep(UpdateRule):
    """Δ = scale·sign(q) + decay·p: Adam's first step, −lr·q/(|q|+ε), in the limit ε → 0."""

    kind: ClassVar[Kind] = "sign"
    scale: float
    decay: float
    param: Tensor
    dtype: torch.dtype

    def drift(self, rows: Rows = None) -> Tensor | None:
        return read_rows(self.param, rows, self.dtype) * self.decay if self.decay else None

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        drift = self.drift(rows)
        out = torch.sign(q) * self.scale
        return out if drift is None else out + drift

    def restrict(self, rows: Rows = None) -> Restricted:
        return Restricted(self, rows, self.scale, self.drift(rows))

    def factor(self, coef: float | Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        return coef * h.abs().sum(1, keepdim=True), None


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

    @property
    def root(self) -> float:
        """√(1-β2^k), k = step + 1: the second moment's bias correction."""
        return math.sqrt(1 - self.beta2 ** (self.step + 1))

    @property
    def l2(self) -> float:
        """The L2 coefficient (0 with decoupled decay)."""
        return 0.0 if self.decoupled else self.weight_decay

    @property
    def decay(self) -> float:
        """lr·λ of decoupled decay (0 with L2 decay)."""
        return self.lr * self.weight_decay if self.decoupled else 0.0

    def _state(self, rows: Rows) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(param, exp_avg, exp_avg_sq, max_exp_avg_sq)`` at ``rows``, in the compute dtype."""
        m, v, vmax = (
            None if t is None else read_rows(t, rows, self.dtype)
            for t in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq)
        )
        return read_rows(self.param, rows, self.dtype), m, v, vmax

    def _delta(self, q: Tensor, rows: Rows) -> tuple[Any, ...]:
        """The arguments of :func:`~curvopt.optimizers.adam.delta` for ``q`` at ``rows``."""
        return (q, *self._state(rows), self.beta1, self.beta2, self.eps, self.root,
                self.step_size, self.l2, self.decay)  # fmt: skip


@dataclass
class AdamStep(_AdamState, UpdateRule):
    """Adam/AdamW's exact step on loss gradient q with prospective moments (torch.optim.Adam):
    :func:`curvopt.optimizers.adam.delta` with the candidate's own gradient in the moments."""

    kind: ClassVar[Kind] = "adam"
    closed_form: ClassVar[bool] = False

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        return adam.delta(*self._delta(q, rows))

    def full(self, q: Tensor) -> Tensor:
        # a whole parameter, elementwise: fused when large
        return fusion.call(adam.delta, q.numel(), *self._delta(q, None))

    def point(self, q: Tensor, start: Tensor, scale: float, out: Tensor) -> Tensor:
        # θ + s·Δ in one pass; the rule reads θ from its parameter, which must be ``start``
        assert start.data_ptr() == self.param.data_ptr() and start.dtype == self.dtype
        fusion.call(adam.point, q.numel(), out, scale, *self._delta(q, None))
        return out

    def restrict(self, rows: Rows = None) -> Restricted:
        return Restricted(self, rows, None, None)

    def on_rows(self, part: Restricted, q: Tensor) -> Tensor:
        return self(q, part.rows)

    def rank_one(self, part: Restricted, h: Tensor, cv: Tensor, max_elements: int) -> Tensor:
        """:func:`curvopt.optimizers.adam.token_change` in blocks of rows: each token's own rows
        (``[n, K]``) are read inside it, fused when large; rows shared by all tokens are passed
        as views, eagerly."""
        n, width = cv.shape
        out = torch.empty_like(cv)
        state = (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq)
        hyper = (self.beta1, self.beta2, self.eps, self.root, self.step_size, self.l2, self.decay)
        for c0, c1 in row_blocks(width, max(1, max_elements // max(1, n * h.shape[1]))):
            sel = column_rows(part.rows, c0, c1)
            if isinstance(sel, Tensor):
                out[:, c0:c1] = fusion.call(
                    adam.token_change, sel.numel() * h.shape[1], *state, self.param, sel,
                    cv[:, c0:c1], h, *hyper,
                )  # fmt: skip
            else:
                m, v, vmax = (None if t is None else t[sel] for t in state)
                out[:, c0:c1] = adam.token_change(
                    m, v, vmax, self.param[sel], None, cv[:, c0:c1], h, *hyper
                )
        return out


@dataclass
class FrozenAdamStep(_AdamState, UpdateRule):
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

    kind: ClassVar[Kind] = "frozen"

    @property
    def limit(self) -> float:
        k = self.step + 1
        return self.step_size * (1 - self.beta1) * math.sqrt((1 - self.beta2**k) / (1 - self.beta2))

    def parts(self, rows: Rows = None) -> tuple[Tensor, Tensor]:
        """(coef, drift) at ``rows``, computed from the state there (nothing is cached)."""
        param, exp_avg, exp_avg_sq, vmax = self._state(rows)
        return fusion.call(
            adam.frozen_parts, param.numel(), param, exp_avg, exp_avg_sq, vmax, self.beta1,
            self.beta2, self.eps, self.root, self.step_size, self.l2, self.decay,
        )  # fmt: skip

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        return self.restrict(rows)(q)

    def restrict(self, rows: Rows = None) -> Restricted:
        return Restricted(self, rows, *self.parts(rows))

    def factor(self, coef: float | Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        assert isinstance(coef, Tensor)
        return rows_dot(coef, h * h), self.limit * h.abs().sum(1, keepdim=True)


def row_blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` blocks of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def adam_rule(
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
) -> UpdateRule:
    """The exact (:class:`AdamStep`) or frozen (:class:`FrozenAdamStep`) rule of an Adam step.

    With no state yet (the first step) Adam's step is ``−lr·q/(|q|+ε)`` whatever the state, so
    the frozen rule is :class:`SignStep` (ε → 0; an L2 decay term is left out of the sign).
    """
    state = (
        param.detach(),
        None if exp_avg is None else exp_avg.detach(),
        None if exp_avg_sq is None else exp_avg_sq.detach(),
        None if max_exp_avg_sq is None else max_exp_avg_sq.detach(),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        step,
        dtype,
    )
    if not frozen:
        return AdamStep(*state)
    if exp_avg is None or exp_avg_sq is None or step == 0:
        decay = -lr * weight_decay if (weight_decay and decoupled) else 0.0
        return SignStep(-lr, decay, param.detach(), dtype)
    return FrozenAdamStep(*state)
