"""The predicted trust region (``shift_estimate="jvp"``): the scale from the quadratic model of the
step's KL over the tracked parameters, with optional rejection of its largest-shift tokens.

After ``backward()`` the update Δθ of the tracked parameters is known from the optimizer's state
and the gradients; each token's logit change ``u_t = J_tΔθ`` gives its predicted KL
``½u_tᵀF_tu_t`` (the output layer's closed forms, or one forward-mode pass over the model). The
mean over kept tokens, ``m``, is quadratic in a learning-rate scale, so the step is taken at
``s = min(1, √(bound / m))``: TRPO's maximal step along the update for a KL bound, ``√(2δ /
ΔθᵀF̄Δθ)`` (Schulman et al., 2015, https://arxiv.org/abs/1502.05477, Appendix C).
"""

from __future__ import annotations

import math

import torch

from .. import distributed
from ..inputs import Inputs
from ..quadratic import QuadraticModel
from ..tracker import CurvatureTracker

__all__ = ["PredictedBound"]


class PredictedBound:
    """The jvp estimate of the step's KL and the scale that keeps it within ``bound``.

    Args:
        bound: the bound on the predicted mean KL per kept token.
        tracker: the tracker of the parameters the prediction covers.
        reject_frac: before scaling a step over the bound, the fraction of each micro-batch's kept
            tokens that :meth:`reject_largest` may reject (0: none).
    """

    def __init__(self, bound: float, tracker: CurvatureTracker, reject_frac: float = 0.0) -> None:
        self.bound = bound
        self.tracker = tracker
        self.reject_frac = reject_frac

    def plan(self, batches: list[Inputs]) -> tuple[list[QuadraticModel], dict[str, float]]:
        """Each micro-batch's token model of the update about to be taken (``mask`` = its kept
        tokens), the predicted mean KL over the group (``step_policy_shift``) and the scale that
        brings it to the bound (``step_scale``)."""
        tracker = self.tracker
        total = torch.zeros(2, dtype=torch.float64, device=tracker.params[0].device)
        models = []
        for b in batches:
            qm = tracker.step_model_of(b, fisher="true")
            models.append(qm)
            total += torch.stack([qm.policy_shift.sum(), b.mask.sum()]).to(total)
        shift_sum, n = distributed.all_reduce_sum(total, tracker.process_group).tolist()
        predicted = shift_sum / n if n else 0.0
        scale = min(1.0, math.sqrt(self.bound / predicted)) if predicted > 0 else 1.0
        return models, {"step_policy_shift": predicted, "step_scale": scale}

    @torch.no_grad()
    def reject_largest(self, batches: list[Inputs], models: list[QuadraticModel]) -> int:
        """Clear, in each micro-batch's kept mask (in place), up to ``reject_frac`` of its tokens
        whose predicted KL exceeds the bound, largest first; the number cleared over the group."""
        count = torch.zeros(1, dtype=torch.float64, device=self.tracker.params[0].device)
        for b, qm in zip(batches, models):
            keep = b.mask
            over = keep & (qm.policy_shift > self.bound)
            k = min(int(over.sum()), math.floor(self.reject_frac * int(keep.sum())))
            if k:
                shift = torch.where(over, qm.policy_shift, -math.inf).reshape(-1)
                idx = torch.topk(shift, k).indices
                keep[idx // keep.shape[1], idx % keep.shape[1]] = False
                count += k
        count = distributed.all_reduce_sum(count, self.tracker.process_group)
        return int(count.item())
