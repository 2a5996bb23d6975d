"""The quadratic model of a candidate update, in logit space (pure functions on tensors).

For a token t with logits z_t, policy π_t = softmax(z_t), action a_t and a parameter change Δ, let
``u_t`` be the logit change Δ causes (the directional derivative of z_t along Δ), and
``r_t`` the second directional derivative of z_t (zero for a linear head). With
``v_t = e_{a_t} − π_t`` and ``F_t = diag(π_t) − π_t π_tᵀ``::

    ⟨∇ log π(a_t), Δ⟩      = v_tᵀ u_t
    Δᵀ ∇² log π(a_t) Δ     = −u_tᵀ F_t u_t + v_tᵀ r_t
    Δᵀ s_t s_tᵀ Δ          = (v_tᵀ u_t)²             (empirical Fisher)
    Δᵀ E_π[s sᵀ] Δ         = u_tᵀ F_t u_t            (true Fisher; ≈ 2·KL(π_θ ‖ π_{θ+Δ}))

For a subset S with weights w_t and advantages A_t the paper's quantities are sums of these::

    first_order    = Σ w_t A_t v_tᵀu_t                                   = ⟨∇f_S, Δ⟩
    second_order   = ½ Σ w_t A_t [(v_tᵀu_t)² − u_tᵀF_tu_t + v_tᵀr_t]     = ½ ΔᵀĤ_SΔ
    objective_shift = first_order + second_order                          = m_H(Δ)
    policy_shift   = ½ Σ w_t (v_tᵀu_t)²   or   ½ Σ w_t u_tᵀF_tu_t         = m_F(Δ)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["LogitMoments", "QuadraticModel", "candidate_terms"]

Level = Literal["token", "sequence", "batch"]
Fisher = Literal["empirical", "true"]


@dataclass
class QuadraticModel:
    """The quadratic model of every candidate at one level.

    Shapes: level ``"token"`` → ``[B, T]``; ``"sequence"`` → ``[B]``; ``"batch"`` → ``[]``.
    Entries that are not candidates (masked-out tokens, sequences without unmasked tokens, an
    empty batch) are 0 and False in ``candidates``.

    Attributes:
        first_order: ⟨∇f_S, Δ_S⟩.
        second_order: ½ Δ_Sᵀ Ĥ_S Δ_S with Ĥ_S the REINFORCE Hessian estimate.
        policy_shift: m_F = ½ Δ_Sᵀ F̂_S Δ_S (empirical or true Fisher).
        candidates: bool, which entries are candidates.
        level: the candidate level.
    """

    first_order: Tensor
    second_order: Tensor
    policy_shift: Tensor
    candidates: Tensor
    level: Level

    @property
    def objective_shift(self) -> Tensor:
        """m_H = first_order + second_order: the predicted change of f_S."""
        return self.first_order + self.second_order


class LogitMoments:
    """Per-token sums over logit rows of a logit change u, accumulated chunk by chunk.

    Keeps, for each of n tokens, ``v·u``, ``v·r`` and the π-weighted mean and spread of u
    (merged with Chan's parallel update, so ``uᵀFu`` has no cancellation however the rows are
    chunked). Rows outside a token's support simply carry π = v = 0.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        z = torch.zeros(n, dtype=dtype, device=device)
        self.vu, self.vr = z.clone(), z.clone()
        self.weight, self.mean, self.m2 = z.clone(), z.clone(), z.clone()

    def add(
        self,
        u: Tensor,
        probs: Tensor,
        v: Tensor,
        r: Tensor | None = None,
        *,
        index: slice | None = None,
    ) -> None:
        """Add rows: ``u, probs, v, r`` of shape ``[n, rows]``, for tokens ``index`` (a slice of
        this accumulator's tokens; all of them by default). ``u`` may be overwritten."""
        self.merge(*self.block(u, probs, v, r), index=index)

    @staticmethod
    def block(
        u: Tensor, probs: Tensor, v: Tensor, r: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One block's ``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token (``u`` may be
        overwritten)."""
        vu = _dot(v, u)
        vr = torch.zeros_like(vu) if r is None else _dot(v, r)
        w = probs.sum(-1)
        safe = torch.where(w > 0, w, torch.ones_like(w))
        mean = _dot(probs, u) / safe
        m2 = _dot(probs, u.sub_(mean.unsqueeze(-1)).square_())
        return vu, vr, w, mean, m2

    def merge(
        self,
        vu: Tensor,
        vr: Tensor,
        w: Tensor,
        mean: Tensor,
        m2: Tensor,
        *,
        index: slice | None = None,
    ) -> None:
        """Merge one block's statistics (from :meth:`block`) into tokens ``index``."""
        sl = slice(None) if index is None else index
        self.vu[sl] += vu
        self.vr[sl] += vr
        weight = self.weight[sl]
        total = weight + w
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean - self.mean[sl]
        self.m2[sl] += m2 + delta.square() * weight * w / safe_total
        self.mean[sl] += delta * w / safe_total
        self.weight[sl] = total

    @property
    def ufu(self) -> Tensor:
        """uᵀFu = Σπu² − (Σπu)² (exact also when Σπ ≠ 1 through rounding)."""
        return self.m2 + self.mean.square() * self.weight * (1 - self.weight)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products ``[n]`` of ``[n, R]`` tensors, without an ``[n, R]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def candidate_terms(
    weights: Tensor,
    advantages: Tensor,
    vu: Tensor,
    ufu: Tensor,
    vr: Tensor | None,
    fisher: Fisher,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token contributions (first_order, second_order, policy_shift) to their candidate.

    All inputs are ``[n]``; sum the outputs over each candidate's tokens.
    """
    wa = weights * advantages
    curv = vu.square() - ufu
    if vr is not None:
        curv = curv + vr
    first = wa * vu
    second = 0.5 * wa * curv
    policy = 0.5 * weights * (vu.square() if fisher == "empirical" else ufu)
    return first, second, policy
