"""Any head module mapping hidden states to logits, through ``torch.func``.

For a head ``z = f(θ, h)`` that is not an ``nn.Linear``, the candidate gradient is taken with
``grad`` (per token: ``vmap(grad(...))``), passed through the optimizer's update rule, and its
logit change ``u = J Δ`` and second logit derivative ``r = Δᵀ∇²z Δ`` come from a nested
``jvp``. Exact for any differentiable head, and the oracle the closed forms are tested against;
it materialises per-token parameter-shaped tensors, so it is meant for small heads.
Forward-mode AD must be implemented for the head's kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .. import distributed
from ..inputs import Batch
from ..optimizers.rules import UpdateRule
from ..policy import LogitTransform
from ..quadratic import LogitMoments, Moments
from .base import Group, OutputLayer, jvp

__all__ = ["TOKENS_PER_VMAP", "FunctionalHead", "head_logits"]

# Tokens per vmap chunk: each holds a parameter-sized gradient and update.
TOKENS_PER_VMAP = 32

Params = tuple[Tensor, ...]


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
) -> Callable[[Params, Tensor, Tensor, Tensor], Tensor]:
    """log π(a | h) of one token; with ``top_k`` the softmax runs over the logits at ``rows``."""

    def log_prob(params: Params, h: Tensor, a: Tensor, rows: Tensor) -> Tensor:
        z = head_logits(head, names, params, h.unsqueeze(0), transform).squeeze(0)
        z_a = z.gather(0, a.unsqueeze(0)).squeeze(0)
        if not top_k:
            return z_a - torch.logsumexp(z, 0)
        inside = (rows == a).any()
        return torch.where(inside, z_a, torch.zeros_like(z_a)) - torch.logsumexp(z[rows], 0)

    return log_prob


def _change(
    head: nn.Module, names: Sequence[str], params: Params, transform: LogitTransform | None
) -> Callable[[Tensor, Params], tuple[Tensor, Tensor]]:
    """(u, r): first and second directional derivatives of one token's logits along Δ."""

    def change(h: Tensor, delta: Params) -> tuple[Tensor, Tensor]:
        def logits(p: Params) -> Tensor:
            return head_logits(head, names, p, h.unsqueeze(0), transform).squeeze(0)

        def tangent(p: Params) -> Tensor:
            return jvp(logits, (p,), (delta,))[1]

        return jvp(tangent, (params,), (delta,))

    return change


class FunctionalHead(OutputLayer):
    """Any differentiable head module, exactly, through ``torch.func`` (small heads)."""

    def head_logits(self, h: Tensor, params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        return head_logits(self.head, self.names, [p.to(dtype) for p in params], h, None)

    def logit_change(
        self, deltas: Sequence[Tensor], dtype: torch.dtype
    ) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        change = _change(self.head, self.names, self._params(dtype), None)

        def of(h: Tensor) -> tuple[Tensor, Tensor | None]:
            with torch.enable_grad():
                return torch.func.vmap(change, in_dims=(0, None))(h, tuple(deltas))

        return of

    def _params(self, dtype: torch.dtype) -> Params:
        return tuple(p.detach().to(dtype) for p in self.params)

    def _rows(self, batch: Batch, tokens: Tensor) -> Tensor:
        if batch.topk_idx is not None:
            return batch.topk_idx[tokens]
        return torch.zeros(tokens.numel(), 1, dtype=torch.long, device=tokens.device)

    def _moments(self, batch: Batch, tokens: Tensor, u: Tensor, r: Tensor) -> LogitMoments:
        probs, v, rows, _, _ = self.support(batch, tokens)
        if rows is not None:
            u, r = u.gather(1, rows), r.gather(1, rows)
        m = LogitMoments(tokens.numel(), u.dtype, u.device)
        m.add(u, probs, v, r)
        return m

    def token_moments(self, batch: Batch, tokens: Tensor, rules: list[UpdateRule]) -> Moments:
        dtype = batch.h.dtype
        params = self._params(dtype)
        log_prob = _log_prob(self.head, self.names, batch.topk_idx is not None, self.transform)
        per_token_grad = vmap(grad(log_prob), in_dims=(None, 0, 0, 0))
        change = vmap(_change(self.head, self.names, params, self.transform))
        out = [torch.empty(tokens.numel(), dtype=dtype, device=batch.h.device) for _ in range(3)]
        for start in range(0, tokens.numel(), TOKENS_PER_VMAP):
            tok = tokens[start : start + TOKENS_PER_VMAP]
            h, coef = batch.h[tok], batch.adv[tok]
            grads = per_token_grad(params, h, batch.actions[tok], self._rows(batch, tok))
            deltas = tuple(
                rule(-g * coef.reshape(-1, *([1] * (g.dim() - 1)))) for rule, g in zip(rules, grads)
            )
            u, r = change(h, deltas)
            m = self._moments(batch, tok, u, r)
            sl = slice(start, start + tok.numel())
            out[0][sl], out[1][sl], out[2][sl] = m.vu, m.ufu, m.vr
        return Moments(*out)

    def subset(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        rules: list[UpdateRule],
        group: Group,
    ) -> Moments:
        """One candidate made of ``tokens`` with ``weights``; with ``group``, the candidate's
        gradient is summed over the group (a collective)."""
        params = self._params(batch.h.dtype)
        log_prob = vmap(
            _log_prob(self.head, self.names, batch.topk_idx is not None, self.transform),
            in_dims=(None, 0, 0, 0),
        )
        coef = batch.adv[tokens] * weights
        rows = self._rows(batch, tokens)
        h, acts = batch.h[tokens], batch.actions[tokens]

        def objective(p: Params, sl: slice) -> Tensor:
            return (log_prob(p, h[sl], acts[sl], rows[sl]) * coef[sl]).sum()

        total = [torch.zeros_like(p) for p in params]
        for start in range(0, tokens.numel(), TOKENS_PER_VMAP):
            g = grad(objective)(params, slice(start, start + TOKENS_PER_VMAP))
            total = [t + gi for t, gi in zip(total, g)]
        total = [distributed.all_reduce_sum(t, group) for t in total]
        deltas = tuple(rule(-g) for rule, g in zip(rules, total))
        change = _change(self.head, self.names, params, self.transform)
        u, r = vmap(change, in_dims=(0, None), chunk_size=TOKENS_PER_VMAP)(h, deltas)
        return self._moments(batch, tokens, u, r).moments
