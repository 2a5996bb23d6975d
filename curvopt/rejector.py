"""SampleRejector: which candidates to keep, from their quadratic models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .quadratic import Level, QuadraticModel
from .tracker import LEVELS, CurvatureTracker
from .wholemodel import Forward

__all__ = ["SampleRejector", "Selection"]

Rule = Literal["theorem", "symmetric"]


@dataclass
class Selection:
    """The outcome of :meth:`SampleRejector.select`.

    Attributes:
        keep: ``[B, T]`` bool, the tokens that survive every level (⊆ mask).
        models: per level, in order, the quadratic model evaluated on the survivors of the
            previous levels and the bool acceptance of each of its candidates.
    """

    keep: Tensor
    models: list[tuple[QuadraticModel, Tensor]] = field(default_factory=list)


class SampleRejector:
    """Keeps the candidates whose predicted update is safe.

    Rules, for a candidate with m_H = objective_shift and m_F = policy_shift:

    - ``"theorem"``: keep iff ``m_H ≥ delta_h`` and ``m_F ≤ delta_f`` (Theorem 5.1 of Melo et al.,
      ICLR 2026; with ``delta_h = 0`` a zero-gradient token is kept).
    - ``"symmetric"``: keep iff ``|m_H| < delta_h`` and ``m_F < delta_f`` (the paper's experiments:
      ``delta_h = 1e-2, delta_f = 1e-4``).

    ``levels`` are applied in order, each re-evaluated on the survivors of the previous one (the
    paper's sequential masking); a rejected sequence or batch removes all its tokens. With
    ``levels=()`` nothing is modelled or rejected: ``select`` validates the inputs and keeps the
    mask (for ``CAPO(..., max_policy_shift=...)``, the curvature-aware step alone).
    """

    def __init__(
        self,
        rule: Rule = "theorem",
        delta_h: float = 0.0,
        delta_f: float = 1e-4,
        levels: Sequence[Level] = ("token",),
    ) -> None:
        if rule not in ("theorem", "symmetric"):
            raise ValueError(f"rule: expected 'theorem' or 'symmetric', got {rule!r}")
        for name, value in (("delta_h", delta_h), ("delta_f", delta_f)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value}")
        if isinstance(levels, str):
            raise TypeError(
                f"levels: expected a sequence of levels such as ('token',), got {levels!r}"
            )
        levels = tuple(levels)
        if any(lv not in LEVELS for lv in levels) or len(set(levels)) != len(levels):
            raise ValueError(
                f"levels: expected distinct levels from {LEVELS} (or none), got {levels}"
            )
        self.rule: Rule = rule
        self.delta_h = float(delta_h)
        self.delta_f = float(delta_f)
        self.levels: tuple[Level, ...] = levels

    def accept(self, qm: QuadraticModel) -> Tensor:
        """Bool acceptance of each candidate of ``qm`` (False where there is no candidate)."""
        m_h, m_f = qm.objective_shift, qm.policy_shift
        if self.rule == "theorem":
            ok = (m_h >= self.delta_h) & (m_f <= self.delta_f)
        else:
            ok = (m_h.abs() < self.delta_h) & (m_f < self.delta_f)
        return ok & qm.candidates

    @torch.no_grad()
    def select(
        self,
        tracker: CurvatureTracker,
        hidden: Tensor | None,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        logits: Tensor | None = None,
        forward: Forward | None = None,
    ) -> Selection:
        """Apply the levels in order; see :meth:`CurvatureTracker.quadratic_model` for shapes."""
        batch = tracker.prepare(hidden, actions, advantages, mask, logits, forward=forward)
        keep = batch.mask.clone()
        selection = Selection(keep)
        for level in self.levels:
            qm = tracker.evaluate(batch, level, keep)
            accepted = self.accept(qm)
            selection.models.append((qm, accepted))
            if level == "token":
                keep &= accepted
            elif level == "sequence":
                keep &= accepted.unsqueeze(1)
            else:
                keep &= accepted
        return selection
