"""The linear head ``z = W h + b``: closed forms in logit space, no per-token gradient tensor.

Every quantity depends on the update Δ only through the logit change ``u_t = ΔW h_t + Δb``, and
a token's gradient is rank one, ``A_t (e_{a_t} − π_t) h_tᵀ`` (Melo, Abate, Gal, ICLR 2026,
https://arxiv.org/abs/2510.00819, restrict the model to this layer). Token candidates take the
rank-one forms of :mod:`~curvopt.heads.rank_one`, over the full vocabulary by blocks of rows
(:mod:`~curvopt.heads.blocks`) or over each token's top-K rows; sequence and batch candidates form
their ``ΔW`` by row blocks and evaluate it on their tokens (two logits-sized products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed, fusion
from ..inputs import Batch
from ..optimizers.readers import RuleSource
from ..optimizers.rules import Rows, UpdateRule
from ..policy import LogitTransform
from ..quadratic import LogitMoments, Moments, action_residual
from .base import CHUNK_ELEMENTS, Group, OutputLayer, chunks
from .blocks import bias_terms, block_stats, block_stats_eager, weight_terms
from .rank_one import token_logit_change

__all__ = ["EXACT_ROWS", "LinearHead"]

# Rows per token (besides its action) on which the frozen direction keeps Adam's exact step.
EXACT_ROWS = 16


class LinearHead(OutputLayer):
    """``nn.Linear`` (with or without bias), by closed forms.

    ``direction`` ``"frozen"``/``"shadow"``: token candidates of an Adam-type step take the frozen
    rule of ``source`` on every row, with the exact step restored on each token's action row and
    its ``EXACT_ROWS`` most probable rows, where the token's own gradient can dominate Adam's
    second moment.
    """

    def __init__(
        self,
        head: nn.Module,
        names: list[str],
        params: list[Tensor],
        transform: LogitTransform,
        top_k: int | None,
        direction: str,
        source: RuleSource,
    ) -> None:
        super().__init__(head, names, params, transform, top_k)
        self.direction = direction
        self.source = source

    def head_logits(self, h: Tensor, params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        params = [p.to(dtype) for p in params]
        z = h @ params[0].T
        return z + params[1] if len(params) > 1 else z

    def output_width(self, h: Tensor) -> int:
        rows, width = self.params[0].shape
        if h.shape[1] != width:
            raise ValueError(
                f"hidden: expected states of width H = {width} (the head's in_features), got "
                f"{h.shape[1]}"
            )
        return rows

    def logit_change(
        self, deltas: Sequence[Tensor], dtype: torch.dtype
    ) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        return lambda h: (self.head_logits(h, deltas, dtype), None)

    def realised_change(
        self, h: Tensor, before: Sequence[Tensor], after: Sequence[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        # from the parameter change itself: no cancellation in z1 − z0
        z = self.head_logits(h, before, dtype)
        return z, self.head_logits(h, [a - b for a, b in zip(after, before)], dtype)

    # ------------------------------------------------------------------ token candidates

    def token_moments(self, batch: Batch, tokens: Tensor, rules: list[UpdateRule]) -> Moments:
        approx = rules
        support = batch.vocab if self.top_k is None else self.top_k
        # only Adam's exact step has a frozen approximation (SGD's is exact, copies are exact)
        if self.direction != "exact" and rules[0].kind == "adam" and support > EXACT_ROWS + 1:
            approx = self.source.rules(batch.h.dtype, frozen=True)
        if self.top_k is None:
            return self._token_full(batch, tokens, rules, approx).moments
        return self._token_topk(batch, tokens, rules, approx).moments

    def _token_full(
        self,
        batch: Batch,
        tokens: Tensor,
        rules: list[UpdateRule],
        approx: list[UpdateRule],
    ) -> LogitMoments:
        """Full vocabulary, by blocks of head rows: each block's rule coefficients are computed
        once for all tokens, so nothing ``[V, H]``-sized is ever materialised."""
        dtype, device, width = batch.h.dtype, batch.h.device, batch.h.shape[1]
        h, acts, coef = batch.h[tokens], batch.actions[tokens], batch.adv[tokens]
        lse = self._lse(batch, top=approx is not rules)[tokens]
        m = LogitMoments(tokens.numel(), dtype, device)
        fix_rows = fix = None
        if approx is not rules:
            assert batch.top is not None
            fix_rows = batch.top[tokens]
            fix = torch.empty(fix_rows.shape, dtype=dtype, device=device)
            for sl in chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // (width * EXACT_ROWS))):
                rows = fix_rows[sl]
                z = self._gathered_logits(batch, tokens[sl], rows)
                probs = (self.transform(z) - lse[sl].unsqueeze(1)).exp()
                grad = action_residual(probs, acts[sl], rows) * self.transform.derivatives(z)[0]
                fix[sl] = token_logit_change(h[sl], coef[sl], grad, rules, rows)
                fix[sl] -= token_logit_change(h[sl], coef[sl], grad, approx, rows)
        block = max(1, CHUNK_ELEMENTS // width)
        t = self.transform
        for r0 in range(0, batch.vocab, block):
            r1 = min(r0 + block, batch.vocab)
            parts = [rule.restrict(slice(r0, r1)) for rule in approx]
            for sl in chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // (r1 - r0))):
                z = self._block_logits(batch, tokens[sl], r0, r1)
                local = torch.where((acts[sl] >= r0) & (acts[sl] < r1), acts[sl] - r0, -1)
                fix_at = fix_val = None
                if fix is not None and fix_rows is not None:
                    inside = (fix_rows[sl] >= r0) & (fix_rows[sl] < r1)
                    fix_at = (fix_rows[sl] - r0).clamp(0, r1 - r0 - 1)
                    fix_val = torch.where(inside, fix[sl], 0)
                if approx[0].closed_form:  # one fused pass per block
                    g, dh, reach = weight_terms(parts[0], h[sl])
                    b = bias_terms(parts[1]) if len(parts) > 1 else (None, 0.0, None, None)
                    stats = fusion.call(
                        block_stats, z.numel(), z, lse[sl], coef[sl], local, g, dh, reach,
                        parts[0].rule.kind, *b, fix_at, fix_val, t.scale, t.softcap,
                        t.temperature,
                    )  # fmt: skip
                else:
                    stats = block_stats_eager(
                        z, lse[sl], coef[sl], local, h[sl], parts, fix_at, fix_val, t
                    )
                m.merge(*stats, index=sl)
        return m

    def _token_topk(
        self,
        batch: Batch,
        tokens: Tensor,
        rules: list[UpdateRule],
        approx: list[UpdateRule],
    ) -> LogitMoments:
        """Top-K: each token's own K rows, gathered (``[n, K, H]`` per chunk)."""
        assert self.top_k is not None
        dtype, device = batch.h.dtype, batch.h.device
        m = LogitMoments(tokens.numel(), dtype, device)
        width = self.top_k * batch.h.shape[1]
        for sl in chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // width)):
            tok = tokens[sl]
            h, coef = batch.h[tok], batch.adv[tok]
            probs, v, rows, d1, d2 = self.support(batch, tok)
            grad = v * d1  # ∂ log π(a) / ∂z: the token's gradient is −c·grad·hᵀ on the weight
            u = token_logit_change(h, coef, grad, approx, rows)
            if approx is not rules:
                assert rows is not None
                # the action (the one positive entry of v) and the most probable rows
                score = torch.where(v > 0, torch.full_like(probs, 2.0), probs)
                pos = torch.topk(score, EXACT_ROWS + 1, -1).indices
                exact_rows = rows.gather(1, pos)
                gc = grad.gather(1, pos)
                fix = token_logit_change(h, coef, gc, rules, exact_rows)
                fix = fix - token_logit_change(h, coef, gc, approx, exact_rows)
                u = u.scatter_add(1, pos, fix)
            m.add(u * d1, probs, v, None if d2 is None else d2 * u.square(), index=sl)
        return m

    def _lse(self, batch: Batch, *, top: bool = False) -> Tensor:
        """log Σ exp φ(z) per token (the policy's normaliser); with ``top``, also stores in
        ``batch.top`` each token's action and its ``EXACT_ROWS`` largest other logits' rows.
        One pass over the logits, shared by every level of a selection."""
        if batch.lse is None or (top and batch.top is None):
            lse, best = [], []
            for sl in chunks(batch.n, max(1, CHUNK_ELEMENTS // batch.vocab)):
                z = self.logits(batch, sl)
                if top:
                    best.append(
                        _with_action(torch.topk(z, EXACT_ROWS + 1, -1).indices, batch.actions[sl])
                    )
                lse.append(torch.logsumexp(self.transform(z), -1))
            empty = torch.zeros(0, dtype=torch.long, device=batch.h.device)
            batch.lse = torch.cat(lse) if lse else batch.h.new_zeros(0)
            if top:
                batch.top = torch.cat(best) if best else empty.reshape(0, EXACT_ROWS + 1)
        return batch.lse

    # ------------------------------------------------------------------ subset candidates

    def subset(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        rules: list[UpdateRule],
        group: Group,
    ) -> Moments:
        """One candidate made of ``tokens``: form its ΔW by row blocks, evaluate it on them."""
        h = batch.h[tokens]
        coef = batch.adv[tokens] * weights
        m = LogitMoments(tokens.numel(), h.dtype, h.device)
        for rows, probs, v, d1, d2 in self._row_blocks(batch, tokens, group):
            cv = v * d1 * coef.unsqueeze(1)
            grad_w = distributed.all_reduce_sum(cv.T @ h, group)
            delta_w = rules[0](-grad_w, rows)
            u = h @ delta_w.T
            if len(rules) > 1:
                u = u + rules[1](-distributed.all_reduce_sum(cv.sum(0), group), rows)
            m.add(u * d1, probs, v, None if d2 is None else d2 * u.square())
        return m.moments

    def _row_blocks(
        self, batch: Batch, tokens: Tensor, group: Group
    ) -> Iterator[tuple[Rows, Tensor, Tensor, Any, Any]]:
        """Blocks of head rows with the tokens' (π, v, φ', φ'') on them, zero outside each
        token's support: ``(rows, probs [n, r], v [n, r], φ', φ'')``. With ``group`` the blocks
        are the same on every rank (sized by the group's token count, over the union of rows)."""
        width = batch.h.shape[1]
        n = int(
            distributed.all_reduce_sum(torch.tensor(tokens.numel(), device=tokens.device), group)
        )
        step = max(1, CHUNK_ELEMENTS // max(n, width))
        n = tokens.numel()
        if self.top_k is None:
            lse = self._lse(batch)[tokens]
            acts = batch.actions[tokens]
            for r0 in range(0, batch.vocab, step):
                r1 = min(r0 + step, batch.vocab)
                z = self._block_logits(batch, tokens, r0, r1)
                probs = (self.transform(z) - lse.unsqueeze(1)).exp()
                local = torch.where((acts >= r0) & (acts < r1), acts - r0, -1)
                v = action_residual(probs, local)
                yield slice(r0, r1), probs, v, *self.transform.derivatives(z)
            return
        assert batch.topk_idx is not None
        idx = batch.topk_idx[tokens]
        rows = distributed.union(idx.flatten(), group)
        pos = torch.searchsorted(rows, idx)
        on_support = self.support(batch, tokens)
        for p0 in range(0, rows.numel(), step):
            p1 = min(p0 + step, rows.numel())
            inside = (pos >= p0) & (pos < p1)
            at = (pos - p0).clamp(0, p1 - p0 - 1)
            zero = torch.zeros(n, p1 - p0, dtype=batch.h.dtype, device=batch.h.device)
            yield (
                rows[p0:p1],
                *(_scatter(zero, at, inside, x) for x in on_support[:2]),
                *(_scatter(zero, at, inside, x) for x in on_support[3:]),
            )

    # ------------------------------------------------------------------ logits on rows

    def _gathered_logits(self, batch: Batch, tokens: Tensor, rows: Tensor) -> Tensor:
        """Raw logits ``[n, E]`` of each token at its own head rows ``rows [n, E]``."""
        if batch.logits is not None:
            b, t = batch.seq[tokens], batch.positions[tokens] % batch.shape[1]
            return batch.logits[b.unsqueeze(1), t.unsqueeze(1), rows].to(batch.h.dtype)
        w = self.params[0].detach()[rows].to(batch.h.dtype)
        z = torch.bmm(w, batch.h[tokens].unsqueeze(2)).squeeze(2)
        if len(self.params) > 1:
            z = z + self.params[1].detach()[rows].to(batch.h.dtype)
        return z

    def _block_logits(self, batch: Batch, tokens: Tensor, r0: int, r1: int) -> Tensor:
        """Raw logits ``[n, r1 − r0]`` of the tokens on head rows ``r0:r1``."""
        if batch.logits is not None:
            b, t = batch.seq[tokens], batch.positions[tokens] % batch.shape[1]
            return batch.logits[b, t, r0:r1].to(batch.h.dtype)
        w = self.params[0][r0:r1].detach().to(batch.h.dtype)
        z = batch.h[tokens] @ w.T
        if len(self.params) > 1:
            z = z + self.params[1][r0:r1].detach().to(batch.h.dtype)
        return z


def _scatter(zero: Tensor, at: Tensor, inside: Tensor, x: Tensor | float | None) -> Any:
    """Per-token support values ``x [n, K]`` placed at block columns ``at`` (0 outside)."""
    if not isinstance(x, Tensor):
        return x
    return zero.scatter_add(1, at, torch.where(inside, x, 0))


def _with_action(best: Tensor, actions: Tensor) -> Tensor:
    """``best [n, E]`` indices with each token's action put in place of its last entry when it is
    not already among them."""
    missing = ~(best == actions.unsqueeze(1)).any(1)
    best[missing, -1] = actions[missing]
    return best
