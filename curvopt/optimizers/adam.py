"""Adam's update, written once, as ``torch.optim.Adam``/``AdamW`` compute it.

Adam (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980) with L2 or decoupled weight decay
(AdamW: Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101) and amsgrad. On loss
gradient q at step k = t + 1, with q̃ = q + λ·p under L2 decay::

    m' = β1·m + (1-β1)·q̃        v' = β2·v + (1-β2)·q̃²       (v' ← max(v_max, v'): amsgrad)
    Δ  = −lr/(1-β1^k) · m' / (√v' / √(1-β2^k) + ε)  − [decoupled] lr·λ·p

:func:`moments` and :func:`denominator` are the two halves; every Adam computation in curvopt
is made of them: :func:`delta` (a parameter's step, elementwise), :func:`frozen_parts` (the step
with the second moment held at its zero-candidate value), :func:`token_change` (a rank-one
gradient's step seen through a linear head) and the shadow moments. Each takes plain tensors and
numbers, so that :mod:`curvopt.fusion` can compile it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["delta", "denominator", "frozen_parts", "moments", "point", "token_change"]


def moments(
    q: Tensor | None,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    beta1: float,
    beta2: float,
) -> tuple[Tensor, Tensor]:
    """Adam's moments ``(m', v')`` after loss gradient ``q`` (None: a zero gradient, which needs
    the state); ``exp_avg``/``exp_avg_sq`` None: no state yet (the first step)."""
    if q is None:
        assert exp_avg is not None and exp_avg_sq is not None
        m, v = beta1 * exp_avg, beta2 * exp_avg_sq
    else:
        m, v = q * (1 - beta1), q * q * (1 - beta2)
        if exp_avg is not None and exp_avg_sq is not None:
            m = m + beta1 * exp_avg
            v = v + beta2 * exp_avg_sq
    if max_exp_avg_sq is not None:
        v = torch.maximum(v, max_exp_avg_sq)
    return m, v


def denominator(v: Tensor, root: float, eps: float) -> Tensor:
    """``√v / √(1-β2^k) + ε``, with ``root = √(1-β2^k)``: Adam's per-element normaliser."""
    return v.sqrt() / root + eps


def delta(
    q: Tensor,
    param: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    root: float,
    step_size: float,
    l2: float,
    decay: float,
) -> Tensor:
    """Δ of Adam's step on loss gradient ``q`` from state already restricted to q's elements.

    ``root = √(1-β2^k)``, ``step_size = lr/(1-β1^k)`` (k the step being taken), ``l2`` the L2
    coefficient and ``decay`` = lr·λ of decoupled decay (one of them 0): numbers computed once by
    the caller, so that a compiled kernel does only elementwise arithmetic per element.
    """
    if l2:
        q = q + l2 * param
    m, v = moments(q, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta2)
    out = m / denominator(v, root, eps) * (-step_size)
    if decay:
        out = out - decay * param
    return out


def point(out: Tensor, scale: float, q: Tensor, param: Tensor, *rest: Any) -> None:
    """Write ``param + scale·Δ`` into ``out``, Δ = ``delta(q, param, *rest)`` (:func:`delta`'s
    arguments after the scale): a trial point of the step in one pass (compiled, Δ is never
    written to memory and the sum is stored straight into ``out``, which must share memory with
    no other argument)."""
    out.copy_(param + delta(q, param, *rest) * scale)


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
    """``(coef, drift)`` of the frozen step ``Δ ≈ coef·q + drift``: Adam's step with the
    moments taken at a zero candidate gradient (only the L2 term ``l2·p`` enters them).

    ``root = √(1-β2^k)``, ``step_size = lr/(1-β1^k)``, ``l2`` the L2 coefficient and ``decay``
    = lr·λ of decoupled decay (one of them 0).
    """
    m, v = moments(l2 * param if l2 else None, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta2)
    inv = 1 / denominator(v, root, eps)
    drift = m * inv * (-step_size)
    if decay:
        drift = drift - decay * param
    return inv * (-step_size * (1 - beta1)), drift


def token_change(
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    param: Tensor,
    rows: Tensor | None,
    cv: Tensor,
    h: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    root: float,
    step_size: float,
    l2: float,
    decay: float,
) -> Tensor:
    """``u [n, R]``: Adam's exact step on each token's rank-one loss gradient ``q_t = cv_t ⊗ h_t``
    (``cv [n, R]``, ``h [n, H]``) on R weight rows, summed against ``h_t``::

        u_tj = Σ_c Δ_{t,j,c} h_{t,c}

    The state is read at ``rows`` (``[n, R]`` or ``[1, R]`` row ids), or is already these rows
    (``[R, H]``) with ``rows=None``. Compiled, the rows are read once, without materialising them.
    """
    dtype = h.dtype

    def read(t: Tensor) -> Tensor:
        return (t if rows is None else t[rows]).to(dtype)

    q = cv.unsqueeze(2) * h.unsqueeze(1)
    p = read(param) if (l2 or decay) else None
    if p is not None and l2:
        q = q + l2 * p
    m, v = moments(
        q,
        None if exp_avg is None else read(exp_avg),
        None if exp_avg_sq is None else read(exp_avg_sq),
        None if max_exp_avg_sq is None else read(max_exp_avg_sq),
        beta1,
        beta2,
    )
    u = (m / denominator(v, root, eps) * h.unsqueeze(1)).sum(2) * (-step_size)
    if p is not None and decay:
        u = u - decay * (p * h.unsqueeze(1)).sum(2)
    return u
