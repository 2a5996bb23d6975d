"""The logit change of one token's own candidate update of a linear head.

Token t's loss gradient on the weight is rank one, ``q_t = −c_t g_t h_tᵀ`` (bias: ``−c_t g_t``),
with ``c_t = w_t A_t`` and ``g_t = ∂ log π(a_t) / ∂z_t``. For an affine step ``Δ = P·q + D`` this
gives ``u_t = D h_t − c_t g_t P‖h_t‖²``; for a frozen Adam step ``x_t = −c_t g_t ⊙ (P (h_t ⊙ h_t))``
saturated as ``x / √(1 + (x / (limit·‖h_t‖₁))²)``, which equals its elementwise saturation when the
candidate-to-second-moment ratio is the same across the row and has the same limits, plus
``D h_t``; for a sign step ``u_t = D h_t + κ·sign(−c_t g_t)‖h_t‖₁``. Adam's exact step is evaluated
elementwise (:meth:`~curvopt.optimizers.rules.UpdateRule.rank_one` of each rule).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..optimizers.rules import Restricted, Rows, UpdateRule, rows_dot
from .base import CHUNK_ELEMENTS

__all__ = ["restricted_token_change", "rows_dot", "token_logit_change"]


def token_logit_change(
    h: Tensor, coef: Tensor, grad: Tensor, rules: Sequence[UpdateRule], rows: Rows
) -> Tensor:
    """Logit change ``u_t [n, R]`` of each token's own candidate update, on its support rows.

    ``rules`` is ``[weight rule, bias rule]`` (or just the weight's) and ``rows`` the support: None
    (all V rows), a slice, or ``[n, K]`` per-token rows. Shapes: ``h [n, H]``, ``coef [n]``,
    ``grad [n, R]``.
    """
    return restricted_token_change(h, coef, grad, [rule.restrict(rows) for rule in rules])


def restricted_token_change(
    h: Tensor, coef: Tensor, grad: Tensor, parts: Sequence[Restricted]
) -> Tensor:
    """:func:`token_logit_change` with the rules already restricted to the support rows."""
    w = parts[0]
    cv = grad * (-coef).unsqueeze(1)
    u = w.rule.rank_one(w, h, cv, CHUNK_ELEMENTS)
    if w.drift is not None:
        u = u.addmm_(h, w.drift.T) if w.drift.dim() == 2 else u.add_(rows_dot(w.drift, h))
    if len(parts) > 1:
        u = u.add_(parts[1](cv))
    return u
