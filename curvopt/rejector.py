"""SampleRejector: which candidates to keep, from their quadratic models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .inputs import Batch, Forward, Inputs
from .quadratic import Level, QuadraticModel
from .settings import DEFAULTS, Rule, check
from .tracker import CurvatureTracker

__all__ = ["RULES", "SampleRejector", "Selection", "symmetric", "theorem"]


def theorem(m_h: Tensor, m_f: Tensor, delta_h: float, delta_f: float) -> Tensor:
    """Theorem 5.1 of Melo, Abate, Gal (ICLR 2026, https://arxiv.org/abs/2510.00819): keep a
    candidate with ``m_H ≥ δ_H`` and ``m_F ≤ δ_F`` (with ``δ_H = 0`` a zero-gradient token is
    kept)."""
    return (m_h >= delta_h) & (m_f <= delta_f)


def symmetric(m_h: Tensor, m_f: Tensor, delta_h: float, delta_f: float) -> Tensor:
    """The rule of the paper's experiments (Melo et al., https://arxiv.org/abs/2510.00819):
    keep a candidate with ``|m_H| < δ_H`` and ``m_F < δ_F`` (there δ_H = 1e-2, δ_F = 1e-4)."""
    return (m_h.abs() < delta_h) & (m_f < delta_f)


# The acceptance rules by name: (m_H, m_F, δ_H, δ_F) ↦ bool acceptance.
RULES: dict[Rule, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "theorem": theorem,
    "symmetric": symmetric,
}


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

    Rules, for a candidate with m_H = objective_shift and m_F = policy_shift (:data:`RULES`):

    - ``"theorem"``: keep iff ``m_H ≥ delta_h`` and ``m_F ≤ delta_f`` (Theorem 5.1 of Melo et al.,
      ICLR 2026, https://arxiv.org/abs/2510.00819; with ``delta_h = 0`` a zero-gradient token is
      kept).
    - ``"symmetric"``: keep iff ``|m_H| < delta_h`` and ``m_F < delta_f`` (the paper's experiments:
      ``delta_h = 1e-2, delta_f = 1e-4``).

    ``levels`` are applied in order, each re-evaluated on the survivors of the previous one (the
    paper's sequential masking); a rejected sequence or batch removes all its tokens. With
    ``levels=()`` nothing is modelled or rejected: ``select`` validates the inputs and keeps the
    mask (for ``CAPO(..., max_policy_shift=...)``, the curvature-aware step alone).
    """

    def __init__(
        self,
        rule: Rule = DEFAULTS.rule,
        delta_h: float = DEFAULTS.delta_h,
        delta_f: float = DEFAULTS.delta_f,
        levels: Sequence[Level] = DEFAULTS.levels,
    ) -> None:
        self.rule: Rule = check("rule", rule)
        self.delta_h: float = check("delta_h", delta_h)
        self.delta_f: float = check("delta_f", delta_f)
        self.levels: tuple[Level, ...] = check("levels", levels)

    def accept(self, qm: QuadraticModel) -> Tensor:
        """Bool acceptance of each candidate of ``qm`` (False where there is no candidate)."""
        ok = RULES[self.rule](qm.objective_shift, qm.policy_shift, self.delta_h, self.delta_f)
        return ok & qm.candidates

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
        inputs = Inputs(hidden, actions, advantages, mask, logits, forward)
        return self.apply(tracker, tracker.prepare_inputs(inputs))

    @torch.no_grad()
    def apply(self, tracker: CurvatureTracker, batch: Batch) -> Selection:
        """:meth:`select` on a batch the tracker has prepared."""
        keep = batch.mask.clone()
        selection = Selection(keep)
        for level in self.levels:
            qm = tracker.evaluate(batch, level, keep)
            accepted = self.accept(qm)
            selection.models.append((qm, accepted))
            keep &= accepted.unsqueeze(1) if level == "sequence" else accepted
        return selection
