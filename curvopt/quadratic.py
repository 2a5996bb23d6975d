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

(Melo, Abate, Gal, "Stabilizing Policy Gradients for Sample-Efficient Reinforcement Learning in
LLM Reasoning", ICLR 2026, https://arxiv.org/abs/2510.00819, Section 5.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "LEVELS",
    "LogitMoments",
    "Moments",
    "QuadraticModel",
    "action_residual",
    "candidate_terms",
    "row_moments",
]

Level = Literal["token", "sequence", "batch"]
Fisher = Literal["empirical", "true"]
LEVELS: tuple[Level, ...] = get_args(Level)


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


class Moments(NamedTuple):
    """Per-token sums over the logit rows of a logit change u (``[n]`` each): ``v·u``, ``uᵀFu``
    and ``v·r`` (zero, or None, for a linear head)."""

    vu: Tensor
    ufu: Tensor
    vr: Tensor | None


def action_residual(probs: Tensor, actions: Tensor, rows: Tensor | None = None) -> Tensor:
    """``v = e_a − π`` over the columns of ``probs [n, R]``: the gradient of ``log π(a)`` with
    respect to the policy's logits.

    ``rows``: the vocabulary ids of the columns, ``[n, R]`` (None: column j is id j). An action
    that is not among a token's columns (−1, or outside its top-K rows) gives ``v = −π``.
    """
    ids = torch.arange(probs.shape[1], device=probs.device) if rows is None else rows
    return (ids == actions.unsqueeze(1)).to(probs.dtype) - probs


def row_moments(
    v: Tensor, u: Tensor, r: Tensor | None, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token of ``[n, R]`` rows.

    Elementwise products and row sums only, so that ``torch.compile`` fuses it into its caller.
    """
    vu = (v * u).sum(1)
    vr = torch.zeros_like(vu) if r is None else (v * r).sum(1)
    w = probs.sum(1)
    mean = (probs * u).sum(1) / torch.where(w > 0, w, torch.ones_like(w))
    m2 = (probs * (u - mean.unsqueeze(1)).square()).sum(1)
    return vu, vr, w, mean, m2


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
        this accumulator's tokens; all of them by default)."""
        self.merge(*row_moments(v, u, r, probs), index=index)

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
        """Merge one block's statistics (from :func:`row_moments`) into tokens ``index``."""
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

    @property
    def moments(self) -> Moments:
        return Moments(self.vu, self.ufu, self.vr)


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
