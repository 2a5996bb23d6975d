"""The generic head path: any module mapping hidden states to logits, through ``torch.func``.

For a head ``z = f(θ, h)`` that is not an ``nn.Linear``, the candidate gradient is taken with
``grad`` (per token: ``vmap(grad(...))``), passed through the optimizer's step model, and its
logit change ``u = J Δ`` and second logit derivative ``r = Δᵀ∇²z Δ`` come from a nested
``jvp``. Exact for any differentiable head, and the oracle the closed forms are tested against;
it materialises per-token parameter-shaped tensors, so it is meant for small heads.
Forward-mode AD must be implemented for the head's kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from . import distributed
from .directions import StepModel
from .logits import LogitTransform
from .quadratic import LogitMoments

if TYPE_CHECKING:
    from .tracker import Batch, CurvatureTracker

__all__ = ["head_logits", "subset_moments", "token_moments"]

# Tokens per vmap chunk: each holds a parameter-sized gradient and step.
VMAP_CHUNK = 32


def head_logits(
    head: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    h: Tensor,
    transform: LogitTransform | None,
) -> Tensor:
    """``head`` applied to ``h [n, H]`` with its trainable parameters replaced by ``params``,
    followed by the logit transform φ when one is given."""
    z = functional_call(head, dict(zip(names, params)), (h,))
    return z if transform is None else transform(z)


def _log_prob(
    head: nn.Module, names: Sequence[str], top_k: bool, transform: LogitTransform
) -> Callable[[tuple[Tensor, ...], Tensor, Tensor, Tensor], Tensor]:
    """log π(a | h) of one token; with ``top_k`` the softmax runs over the logits at ``rows``."""

    def log_prob(params: tuple[Tensor, ...], h: Tensor, a: Tensor, rows: Tensor) -> Tensor:
        z = head_logits(head, names, params, h.unsqueeze(0), transform).squeeze(0)
        z_a = z.gather(0, a.unsqueeze(0)).squeeze(0)
        if not top_k:
            return z_a - torch.logsumexp(z, 0)
        inside = (rows == a).any()
        return torch.where(inside, z_a, torch.zeros_like(z_a)) - torch.logsumexp(z[rows], 0)

    return log_prob


def _change(
    head: nn.Module, names: Sequence[str], params: tuple[Tensor, ...], transform: LogitTransform
) -> Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]:
    """(u, r): first and second directional derivatives of one token's logits along Δ."""

    def change(h: Tensor, delta: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        def logits(p: tuple[Tensor, ...]) -> Tensor:
            return head_logits(head, names, p, h.unsqueeze(0), transform).squeeze(0)

        def tangent(p: tuple[Tensor, ...]) -> Tensor:
            return jvp(logits, (p,), (delta,))[1]

        return jvp(tangent, (params,), (delta,))

    return change


def _rows(tracker: CurvatureTracker, batch: Batch, tokens: Tensor) -> Tensor:
    if batch.topk_idx is not None:
        return batch.topk_idx[tokens]
    return torch.zeros(tokens.numel(), 1, dtype=torch.long, device=tokens.device)


def _moments(
    tracker: CurvatureTracker, batch: Batch, tokens: Tensor, u: Tensor, r: Tensor
) -> LogitMoments:
    probs, v, rows, _, _ = tracker._support(batch, tokens)
    if rows is not None:
        u, r = u.gather(1, rows), r.gather(1, rows)
    m = LogitMoments(tokens.numel(), u.dtype, u.device)
    m.add(u, probs, v, r)
    return m


def token_moments(
    tracker: CurvatureTracker, batch: Batch, tokens: Tensor, steps: Sequence[StepModel]
) -> tuple[Tensor, Tensor, Tensor]:
    """(v·u, uᵀFu, v·r) per token for each token's own candidate update. ``[n]`` each."""
    dtype = batch.h.dtype
    params = tuple(tracker._head_params(dtype))
    log_prob = _log_prob(tracker.head, tracker.names, batch.topk_idx is not None, tracker.transform)
    per_token_grad = vmap(grad(log_prob), in_dims=(None, 0, 0, 0))
    change = vmap(_change(tracker.head, tracker.names, params, tracker.transform))
    out = [torch.empty(tokens.numel(), dtype=dtype, device=batch.h.device) for _ in range(3)]
    for start in range(0, tokens.numel(), VMAP_CHUNK):
        tok = tokens[start : start + VMAP_CHUNK]
        h, coef = batch.h[tok], batch.adv[tok]
        grads = per_token_grad(params, h, batch.actions[tok], _rows(tracker, batch, tok))
        deltas = tuple(
            step(-g * coef.reshape(-1, *([1] * (g.dim() - 1)))) for step, g in zip(steps, grads)
        )
        u, r = change(h, deltas)
        m = _moments(tracker, batch, tok, u, r)
        sl = slice(start, start + tok.numel())
        out[0][sl], out[1][sl], out[2][sl] = m.vu, m.ufu, m.vr
    return out[0], out[1], out[2]


def subset_moments(
    tracker: CurvatureTracker,
    batch: Batch,
    tokens: Tensor,
    weights: Tensor,
    steps: Sequence[StepModel],
    group: torch.distributed.ProcessGroup | str | None = distributed.LOCAL,
) -> tuple[Tensor, Tensor, Tensor]:
    """(v·u, uᵀFu, v·r) per token of one candidate made of ``tokens`` with ``weights``; with
    ``group``, the candidate's gradient is summed over the group (a collective)."""
    dtype = batch.h.dtype
    params = tuple(tracker._head_params(dtype))
    log_prob = vmap(
        _log_prob(tracker.head, tracker.names, batch.topk_idx is not None, tracker.transform),
        in_dims=(None, 0, 0, 0),
    )
    coef = batch.adv[tokens] * weights
    rows = _rows(tracker, batch, tokens)
    h, acts = batch.h[tokens], batch.actions[tokens]

    def objective(p: tuple[Tensor, ...], sl: slice) -> Tensor:
        return (log_prob(p, h[sl], acts[sl], rows[sl]) * coef[sl]).sum()

    total = [torch.zeros_like(p) for p in params]
    for start in range(0, tokens.numel(), VMAP_CHUNK):
        g = grad(objective)(params, slice(start, start + VMAP_CHUNK))
        total = [t + gi for t, gi in zip(total, g)]
    total = [distributed.all_reduce_sum(t, group) for t in total]
    deltas = tuple(step(-g) for step, g in zip(steps, total))
    change = _change(tracker.head, tracker.names, params, tracker.transform)
    u, r = vmap(change, in_dims=(0, None), chunk_size=VMAP_CHUNK)(h, deltas)
    m = _moments(tracker, batch, tokens, u, r)
    return m.vu, m.ufu, m.vr
