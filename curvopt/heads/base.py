"""The protocol behind every backend of :class:`~curvopt.CurvatureTracker`, and what they share.

A backend knows one kind of tracked parameters: an ``nn.Linear`` head (closed forms,
:mod:`~curvopt.heads.linear`), any other head module (``torch.func``,
:mod:`~curvopt.heads.functional`), or any set of a model's parameters (forward-mode AD through
the whole model, :mod:`~curvopt.heads.whole`). The tracker validates and gathers the inputs,
weighs the candidates and builds the quadratic model; the backend gives, for each candidate,
the per-token moments of the logit change its update causes (:class:`~curvopt.quadratic.Moments`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import fusion
from ..distributed import Group
from ..inputs import Batch, Inputs
from ..optimizers.rules import UpdateRule
from ..policy import LogitTransform
from ..quadratic import LogitMoments, Moments, action_residual, row_moments

__all__ = [
    "CHUNK_ELEMENTS",
    "Candidate",
    "Head",
    "OutputLayer",
    "StepChange",
    "change_stats",
    "chunks",
    "compute_dtype",
    "jvp",
    "kl_of_change",
    "step_moments",
]

# Elements of the largest temporary a chunk may create; 2**22 float32 ≈ 16 MiB.
CHUNK_ELEMENTS = 1 << 22

# One candidate subset: its tokens (indices into the batch's N tokens) and their weights.
Candidate = tuple[Tensor, Tensor]
# The logit change of a chunk of tokens: raw logits z, their first and second directional
# derivatives u and r (None: zero) along the update, each [n, V].
Change = tuple[Tensor, Tensor, Tensor | None]


def jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    """``torch.func.jvp(fn, primals, tangents)``: ``(fn(*primals), its derivative along
    tangents)``, each shaped as ``fn``'s output."""
    return torch.func.jvp(fn, primals, tangents)


def compute_dtype(hidden: Tensor | None, params: Sequence[Tensor]) -> torch.dtype:
    """float32, or float64 if the hidden states or a tracked parameter are float64: curvature is
    computed in float32 or higher whatever the parameters' dtype."""
    if hidden is not None and hidden.dtype == torch.float64:
        return torch.float64
    if any(p.dtype == torch.float64 for p in params):
        return torch.float64
    return torch.float32


def chunks(n: int, size: int) -> Iterator[slice]:
    """``slice``s of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@dataclass
class StepChange:
    """The logit change along the planned update Δθ, chunk by chunk of a batch's tokens.

    ``logits``: the ``[B, T, V]`` logits when computing the change produced them (whole model),
    else None.
    """

    logits: Tensor | None
    chunk: Callable[[Batch, slice], Change]


class Head(ABC):
    """A backend of the tracker: the logit change of candidate updates of its parameters.

    ``reduces_over_groups``: whether a batch candidate can span a process group.
    """

    reduces_over_groups: ClassVar[bool] = True
    names: list[str]
    params: list[Tensor]
    transform: LogitTransform

    @abstractmethod
    def complete(self, inputs: Inputs) -> Inputs:
        """``inputs`` with what this backend needs filled in or checked (before validation)."""

    @abstractmethod
    def vocab(self, logits: Tensor | None, h: Tensor) -> int:
        """The vocabulary size, from the caller's logits or the parameters."""

    @abstractmethod
    def check(self, batch: Batch) -> None:
        """Backend-specific work on a gathered batch (checks, shared per-batch passes)."""

    @abstractmethod
    def token_moments(self, batch: Batch, tokens: Tensor, rules: list[UpdateRule]) -> Moments:
        """Moments ``[n]`` of each of ``tokens`` under its own candidate update (weight 1)."""

    @abstractmethod
    def subset_moments(
        self,
        batch: Batch,
        candidates: Sequence[Candidate],
        rules: list[UpdateRule],
        group: Group,
    ) -> list[Moments]:
        """Per candidate, the moments of its tokens under its update. With a ``group`` other
        than ``LOCAL``, the one candidate is the union of every rank's tokens (a collective)."""

    @abstractmethod
    def step_change(
        self, inputs: Inputs, deltas: Sequence[Tensor], dtype: torch.dtype, curvature: bool
    ) -> StepChange:
        """The logit change along ``deltas``, the update about to be taken; ``curvature`` asks
        for its second directional derivative where it is not zero."""

    @abstractmethod
    def realised_shift(
        self, hidden: Tensor, before: Sequence[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``(kl, quadratic)`` ``[n]`` of an actual update of the parameters (see
        :meth:`curvopt.CurvatureTracker.realised_shift`)."""

    @abstractmethod
    def snapshot(self, batches: Sequence[Inputs]) -> list[Tensor]:
        """Before a step: what its realised shift on ``batches`` is measured against."""

    @abstractmethod
    def measure(
        self, inputs: Inputs, index: int, before: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """After the step: ``(kl, quadratic)`` of the realised shift on the tokens of ``inputs``'s
        mask, the ``index``-th of the batches given to :meth:`snapshot` (which gave ``before``)."""


class OutputLayer(Head):
    """A head module mapping hidden states ``[n, H]`` to logits ``[n, V]``: what the linear and
    the ``torch.func`` backends share (logits, each token's support, realised shifts)."""

    def __init__(
        self,
        head: nn.Module,
        names: list[str],
        params: list[Tensor],
        transform: LogitTransform,
        top_k: int | None,
    ) -> None:
        self.head = head
        self.names = names
        self.params = params
        self.transform = transform
        self.top_k = top_k

    @abstractmethod
    def head_logits(self, h: Tensor, params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """Raw logits ``[n, V]`` of ``h [n, H]`` with the head's parameters set to ``params``."""

    @abstractmethod
    def logit_change(
        self, deltas: Sequence[Tensor], dtype: torch.dtype
    ) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        """``h ↦ (u, r)``: the first and second directional derivatives of the logits of ``h``
        along ``deltas``."""

    def complete(self, inputs: Inputs) -> Inputs:
        if inputs.hidden is None:
            raise TypeError("hidden: expected a torch.Tensor, got NoneType")
        return inputs

    def output_width(self, h: Tensor) -> int:
        """V, the head's logits per token, for hidden states ``h [n, H]``; hidden states of a
        width the head cannot take raise :class:`ValueError` naming ``hidden``."""
        row = h[:1] if h.shape[0] else h.new_zeros(1, h.shape[1])
        try:
            return self.head_logits(row, self.params, h.dtype).shape[-1]
        except RuntimeError as e:
            raise ValueError(
                f"hidden: states of width H = {h.shape[1]} do not fit the head ({e})"
            ) from e

    def vocab(self, logits: Tensor | None, h: Tensor) -> int:
        """V: the head's output width, which the caller's ``logits`` must have (raises
        :class:`ValueError` naming ``logits`` otherwise)."""
        width = self.output_width(h)
        if logits is not None and logits.shape[-1] != width:
            raise ValueError(
                f"logits: the head gives V = {width} logits per token (all its rows, padding "
                f"beyond the tokenizer's vocabulary included), got V = {logits.shape[-1]}: pass "
                "its raw outputs head(hidden) for every row (the policy is the softmax over all "
                "of them)"
            )
        return width

    @abstractmethod
    def subset(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        rules: list[UpdateRule],
        group: Group,
    ) -> Moments:
        """The moments of one candidate made of ``tokens`` with ``weights``."""

    def subset_moments(
        self,
        batch: Batch,
        candidates: Sequence[Candidate],
        rules: list[UpdateRule],
        group: Group,
    ) -> list[Moments]:
        return [self.subset(batch, tokens, w, rules, group) for tokens, w in candidates]

    def check(self, batch: Batch) -> None:
        """With ``top_k``, each token's K largest logits and their rows."""
        if self.top_k is None or not batch.n:
            return
        vals, idxs = [], []
        for sl in chunks(batch.n, max(1, CHUNK_ELEMENTS // batch.vocab)):
            v, i = torch.topk(self.logits(batch, sl), self.top_k, dim=-1)
            vals.append(v)
            idxs.append(i)
        batch.topk_logits, batch.topk_idx = torch.cat(vals), torch.cat(idxs)

    def logits(self, batch: Batch, sl: slice | Tensor) -> Tensor:
        """Logits ``[n, V]`` (compute dtype) of tokens ``sl`` of the batch; checked finite."""
        if batch.logits is not None:
            z = batch.at(batch.logits, sl).to(batch.h.dtype)
            # one reduction instead of an elementwise isfinite: any inf or nan reaches the sum
            if not torch.isfinite(z.sum(-1, dtype=torch.float64)).all():
                raise ValueError("logits: contains non-finite values at masked-in positions")
            return z
        return self.head_logits(batch.h[sl], self.params, batch.h.dtype)

    def support(
        self, batch: Batch, tok: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | float, Tensor | None]:
        """(π, v = e_a − π, rows, φ'(z), φ''(z)) over each token's support: all V rows, or its
        top-K rows (``rows [n, K]``); φ'' is None for a linear logit transform."""
        if self.top_k is None:
            z = self.logits(batch, tok)
            rows = None
        else:
            assert batch.topk_idx is not None and batch.topk_logits is not None
            rows, z = batch.topk_idx[tok], batch.topk_logits[tok]
        probs = torch.softmax(self.transform(z), -1)
        v = action_residual(probs, batch.actions[tok], rows)
        return probs, v, rows, *self.transform.derivatives(z)

    def step_change(
        self, inputs: Inputs, deltas: Sequence[Tensor], dtype: torch.dtype, curvature: bool
    ) -> StepChange:
        change = self.logit_change(deltas, dtype)

        def chunk(batch: Batch, sl: slice) -> Change:
            return self.logits(batch, sl), *change(batch.h[sl])

        return StepChange(None, chunk)

    def snapshot(self, batches: Sequence[Inputs]) -> list[Tensor]:
        """The head's parameters."""
        return [p.detach().clone() for p in self.params]

    def measure(
        self, inputs: Inputs, index: int, before: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        assert inputs.hidden is not None
        hidden = inputs.hidden[inputs.mask]
        return self.realised_shift(hidden, before, compute_dtype(hidden, self.params))

    def realised_change(
        self, h: Tensor, before: Sequence[Tensor], after: Sequence[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``(z, u)``: the logits of ``h`` before an update and their change."""
        z = self.head_logits(h, before, dtype)
        return z, self.head_logits(h, after, dtype) - z

    def realised_shift(
        self, hidden: Tensor, before: Sequence[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        h = hidden.detach().to(dtype)
        before = [b.detach().to(dtype) for b in before]
        after = [p.detach().to(dtype) for p in self.params]
        kl = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        quad = torch.empty_like(kl)
        vocab = self.vocab(None, h[:1]) if h.shape[0] else 1
        for sl in chunks(h.shape[0], max(1, CHUNK_ELEMENTS // vocab)):
            z, u = self.realised_change(h[sl], before, after, dtype)
            kl[sl], quad[sl] = kl_of_change(self.transform, z, u)
        return kl, quad


def kl_of_change(
    transform: LogitTransform, logits: Tensor, change: Tensor
) -> tuple[Tensor, Tensor]:
    """``(kl, quadratic)`` per row of raw logits ``z [n, V]`` moved by ``u [n, V]``: the exact
    ``KL(π(z) ‖ π(z + u))`` of the policy ``softmax(φ(z))`` and its quadratic model ½ũᵀFũ, ũ the
    policy logits' change. The KL is evaluated as ``log E_π[exp(ũ − E_π ũ)]``
    (``log1p``/``expm1``), accurate in float32 for tiny shifts."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z, u = logits.to(dtype), change.to(dtype)
    probs = torch.softmax(transform(z), -1)
    u = transform.difference(z, u)
    m = LogitMoments(probs.shape[0], dtype, z.device)
    m.add(u, probs, torch.zeros_like(probs))
    kl = torch.log1p((probs * torch.expm1(u - m.mean.unsqueeze(1))).sum(-1))
    return kl, 0.5 * m.ufu


def change_stats(
    z: Tensor,
    u: Tensor,
    r: Tensor | None,
    action: Tensor,
    scale: float,
    softcap: float | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Moments of a given raw-logit change, elementwise (fusable: plain tensors and numbers).

    ``z [n, V]`` raw logits, ``u [n, V]`` their first and ``r [n, V]`` (or None) their second
    directional derivative, ``action [n]``; the logit transform φ by its three numbers. The
    policy's logits φ(z) change by ``φ'u`` at first and ``φ'r + φ''u²`` at second order. Returns
    ``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token for the policy's logits.
    """
    transform = LogitTransform(scale, softcap, temperature)
    y = transform(z)
    probs = torch.exp(y - torch.logsumexp(y, 1, keepdim=True))
    d1, d2 = transform.derivatives(z)
    if r is not None:
        r = r * d1
    if d2 is not None:
        r = d2 * u.square() if r is None else r + d2 * u.square()
    if not transform.identity:
        u = u * d1
    return row_moments(action_residual(probs, action), u, r, probs)


def step_moments(batch: Batch, change: StepChange, transform: LogitTransform) -> LogitMoments:
    """Each token's moments under the planned update's logit change, in token chunks: no
    ``[n, V]`` temporary beyond the chunk's, and one fused pass per chunk."""
    m = LogitMoments(batch.n, batch.h.dtype, batch.h.device)
    t = transform
    for sl in chunks(batch.n, max(1, CHUNK_ELEMENTS // batch.vocab)):
        z, u, r = change.chunk(batch, sl)
        stats = fusion.call(
            change_stats, z.numel(), z, u, r, batch.actions[sl], t.scale, t.softcap, t.temperature
        )
        m.merge(*stats, index=sl)
    return m
