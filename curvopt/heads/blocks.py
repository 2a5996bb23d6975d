"""One block of a linear head's rows for n tokens: the moments of every token's own candidate.

The full-vocabulary token path walks the head's rows in blocks; for each block and chunk of tokens
it needs the block's raw logits, the rules' coefficients there, and then only elementwise work
and row sums. :func:`block_stats` is that work as one function of plain tensors and numbers, so
``torch.compile`` fuses it (:mod:`curvopt.fusion`); :func:`block_stats_eager` is the same for
Adam's exact step, whose weight part is elementwise in H.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..optimizers.rules import Restricted, saturate
from ..policy import LogitTransform
from ..quadratic import action_residual, row_moments
from .rank_one import restricted_token_change

__all__ = ["bias_terms", "block_stats", "block_stats_eager", "weight_terms"]

Stats = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def weight_terms(w: Restricted, h: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """For a block of weight rows: the per-row factor g of the candidate's share (``P (h ⊙ h)``,
    ``P‖h‖²`` or ``κ‖h‖₁``), the drift's logit change ``D h`` and the saturation reach."""
    assert w.coef is not None
    g, reach = w.rule.factor(w.coef, h)
    dh = None if w.drift is None else h @ w.drift.T
    return g, dh, reach


def bias_terms(b: Restricted) -> tuple[str, float | Tensor, Tensor | None, float | None]:
    """(kind, coefficient, drift, limit) of a bias rule on a block, as plain values."""
    assert b.coef is not None
    return b.rule.kind, b.coef, b.drift, b.rule.limit


def block_stats(
    z: Tensor,
    lse: Tensor,
    coef: Tensor,
    action: Tensor,
    g: Tensor,
    dh: Tensor | None,
    reach: Tensor | None,
    kind: str,
    bias_kind: str | None,
    bias_coef: float | Tensor,
    bias_drift: Tensor | None,
    bias_limit: float | None,
    fix_at: Tensor | None,
    fix_val: Tensor | None,
    scale: float,
    softcap: float | None,
    temperature: float,
) -> Stats:
    """One block of head rows for n tokens, elementwise after the products.

    ``z [n, R]`` raw logits, ``lse [n]`` the policy's normaliser, ``coef [n]`` c_t, ``action [n]``
    the action's column in the block or −1; ``g``, ``dh``, ``reach`` from :func:`weight_terms`
    for a rule of ``kind``; the bias rule's terms; ``fix`` adds exact-step corrections at columns
    ``fix_at``; the logit transform φ by its three numbers. Returns the block's
    ``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token, u the policy logits' change.
    """
    transform = LogitTransform(scale, softcap, temperature)
    probs = torch.exp(transform(z) - lse.unsqueeze(1))
    d1, d2 = transform.derivatives(z)
    v = action_residual(probs, action)
    cv = -v * coef.unsqueeze(1)
    if not transform.identity:
        cv = cv * d1
    u = saturate(kind, cv, g, reach)
    if dh is not None:
        u = u + dh
    if bias_kind is not None:
        u = u + saturate(bias_kind, cv, bias_coef, bias_limit)
        if bias_drift is not None:
            u = u + bias_drift
    if fix_at is not None and fix_val is not None:
        u = u.scatter_add(1, fix_at, fix_val)
    r = None
    if not transform.identity:
        r = None if d2 is None else d2 * u.square()
        u = u * d1
    return row_moments(v, u, r, probs)


def block_stats_eager(
    z: Tensor,
    lse: Tensor,
    coef: Tensor,
    action: Tensor,
    h: Tensor,
    parts: Sequence[Restricted],
    fix_at: Tensor | None,
    fix_val: Tensor | None,
    transform: LogitTransform,
) -> Stats:
    """:func:`block_stats` for any rule (Adam's exact step: its weight part is elementwise in H)."""
    probs = torch.exp(transform(z) - lse.unsqueeze(1))
    d1, d2 = transform.derivatives(z)
    v = action_residual(probs, action)
    u = restricted_token_change(h, coef, v * d1, parts)
    if fix_at is not None and fix_val is not None:
        u = u.scatter_add(1, fix_at, fix_val)
    r = None if d2 is None else d2 * u.square()
    return row_moments(v, u * d1, r, probs)
