"""The exact KL of each token's policy between two parameter values, in chunks.

For a token with old policy logits ``y0 = φ(z0)`` and new ones ``y1 = φ(z1)`` (φ the logit
transform: temperature, logit scale, soft-cap), ``π0 = softmax(y0)`` and ``π1 = softmax(y1)``,
write ``a_j = (y1_j − y0_j) − c`` for any per-token constant ``c``. Then

    KL(π0 ‖ π1) = log E_π0[e^a] − E_π0[a] = (log1p(x) − x) + R = log1p(x) − e,
    e = E_π0[a],   R = E_π0[e^a − 1 − a] ≥ 0,   x = e + R,

which is exact for any shift and has no cancellation while ``|e|`` is small (``R ≈ ½E[a²]`` is
formed elementwise from ``a²·(½ + a/6 + …)``). ``c`` is first the change at the token's own action,
so a uniform shift of all logits (which leaves π unchanged) never enters ``a``; a token whose
mean change is far from its action's (``|e| > RECENTRE``) is measured again with ``c`` moved to
its mean, where ``e ≈ 0``. The expectations
stream over vocabulary chunks with an online normaliser (the running maximum of ``y0``), so a
linear head given by its input states never materialises ``[B, T, V]``: only ``[n, V_chunk]``
blocks, converted to float32 (float64 when an input is float64) whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import fusion
from ..inputs import HeadInput, PolicyOutput
from ..policy import LogitTransform
from ..precision import full_precision

__all__ = ["HeadInput", "PolicyOutput", "policy_kl"]

# Elements of the largest [tokens, vocabulary] block formed at once (2**22 float32 ≈ 16 MiB).
BLOCK_ELEMENTS = 1 << 22
# Where the logits exist and a block is a view of them, the fused pass forms no block-sized
# temporaries: its blocks may be this much larger (fewer, longer calls).
VIEW_BLOCK_FACTOR = 4
# Tokens per head product when the logits are formed from a head's input states.
HEAD_TOKENS = 512
# Tokens with |E_π0[a]| above this are measured again about their mean change (below it the
# float32 sums lose at most ~1e-7·e² of the KL).
RECENTRE = 0.5
# Above this logit change a block is formed in float64 (e^a would overflow float32 near 88).
_WIDE = 50.0


def vocab_size(out: PolicyOutput) -> int:
    """V of a policy output."""
    return out.weight.shape[0] if isinstance(out, HeadInput) else out.shape[-1]


def batch_shape(out: PolicyOutput) -> tuple[int, ...]:
    """``(B, T)`` of a policy output (its leading dimensions)."""
    t = out.hidden if isinstance(out, HeadInput) else out
    return tuple(t.shape[:-1])


def _dtype(*outs: PolicyOutput) -> torch.dtype:
    tensors = []
    for out in outs:
        tensors += [out.hidden, out.weight] if isinstance(out, HeadInput) else [out]
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


#: tokens ``b, t0 … t1−1`` of one sequence: their logits are a view, not a gathered copy
Span = tuple[int, int, int]


def _block(
    out: PolicyOutput,
    rows: tuple[Tensor, Tensor],
    c0: int,
    c1: int,
    dtype: torch.dtype,
    span: Span | None = None,
) -> Tensor:
    """Raw logits ``[n, c1 − c0]`` of tokens ``rows`` (batch and time indices) in columns c0:c1
    (``span``: the same tokens as one run of a sequence)."""
    if isinstance(out, Tensor):
        if span is not None:
            b, t0, t1 = span
            return out[b, t0:t1, c0:c1].to(dtype)
        return out[rows[0], rows[1], c0:c1].to(dtype)
    z = out.hidden[rows].to(dtype) @ out.weight[c0:c1].to(dtype).T
    return z if out.bias is None else z + out.bias[c0:c1].to(dtype)


def _at(
    out: PolicyOutput, rows: tuple[Tensor, Tensor], actions: Tensor, dtype: torch.dtype
) -> Tensor:
    """Raw logit ``[n]`` of each token's action."""
    if isinstance(out, Tensor):
        return out[rows[0], rows[1], actions].to(dtype)
    z = (out.hidden[rows].to(dtype) * out.weight[actions].to(dtype)).sum(-1)
    return z if out.bias is None else z + out.bias[actions].to(dtype)


def _excess(a: Tensor) -> Tensor:
    """``e^a − 1 − a`` elementwise, to full relative precision for small ``|a|``."""
    # the series to a⁶: relative truncation error below a⁵/2520 (4e-14 at |a| = 1e-2)
    series = 1.0 / 6.0 + a * (1.0 / 24.0 + a * (1.0 / 120.0 + a * (1.0 / 720.0)))
    small = a * a * (0.5 + a * series)
    return torch.where(a.abs() < 1e-2, small, torch.expm1(a) - a)


def block_sums(
    z0: Tensor,
    z1: Tensor,
    ref: Tensor,
    scale: float,
    softcap: float | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block's per-token ``(max y0, Σw, Σw·a, Σw·(e^a − 1 − a), max |a|)`` with
    ``w = e^{y0 − max y0}``, from raw logits ``z0, z1 [n, R]`` and reference changes ``ref [n]``.

    Plain tensors and numbers, elementwise and row reductions only: ``torch.compile`` fuses it
    into one pass over the block.
    """
    transform = LogitTransform(scale, softcap, temperature)
    y0 = transform(z0)
    a = transform.difference(z0, z1 - z0) - ref.unsqueeze(1)
    top = y0.max(1).values
    w = torch.exp(y0 - top.unsqueeze(1))
    return top, w.sum(1), (w * a).sum(1), (w * _excess(a)).sum(1), a.abs().max(1).values


class _Moments:
    """Per-token float64 sums over vocabulary blocks, normalised online: the running maximum
    ``M`` of ``y0`` and ``Σ e^{y0−M}``, ``Σ e^{y0−M}·a``, ``Σ e^{y0−M}·(e^a − 1 − a)``."""

    def __init__(self, n: int, device: torch.device) -> None:
        f64 = torch.float64
        self.top = torch.full((n,), -torch.inf, dtype=f64, device=device)
        self.mass = torch.zeros(n, dtype=f64, device=device)
        self.first = torch.zeros(n, dtype=f64, device=device)
        self.excess = torch.zeros(n, dtype=f64, device=device)

    def add(self, z0: Tensor, z1: Tensor, ref: Tensor, transform: LogitTransform) -> None:
        """Add a block of raw logits ``[n, R]`` (compute dtype) with reference changes ``ref``."""
        t = transform
        args = (t.scale, t.softcap, t.temperature)
        sums = fusion.call(block_sums, z0.numel(), z0, z1, ref.to(z0.dtype), *args)
        if z0.dtype != torch.float64 and float(sums[4].max()) > _WIDE:
            # e^a would overflow float32: this block again in float64
            sums = block_sums(z0.double(), z1.double(), ref, *args)
        top = torch.maximum(self.top, sums[0].to(torch.float64))
        block = torch.exp(sums[0].to(torch.float64) - top)
        rescale = torch.exp(self.top - top)
        for name, s in zip(("mass", "first", "excess"), sums[1:4]):
            setattr(self, name, getattr(self, name) * rescale + s.to(torch.float64) * block)
        self.top = top

    @property
    def mean(self) -> Tensor:
        """``e = E_π0[a]``."""
        return self.first / self.mass

    def kl(self) -> Tensor:
        e, r = self.mean, self.excess / self.mass
        x = e + r
        # (log1p(x) − x) + R has no cancellation for small shifts; past x = 1 the KL is of
        # order one and log1p(x) − e keeps huge R from swamping it
        small = (torch.log1p(x) - x) + r
        return torch.where(x <= 1, small, torch.log1p(x) - e).clamp_min(0.0)


def _moments(
    before: PolicyOutput,
    after: PolicyOutput,
    at: tuple[Tensor, Tensor],
    ref: Tensor,
    transform: LogitTransform,
    width: int,
    dtype: torch.dtype,
    span: Span | None = None,
) -> _Moments:
    """One pass over the vocabulary for tokens ``at`` with reference changes ``ref [n]``."""
    moments = _Moments(ref.numel(), ref.device)
    for c0 in range(0, vocab_size(before), width):
        c1 = min(c0 + width, vocab_size(before))
        z0 = _block(before, at, c0, c1, dtype, span)
        z1 = _block(after, at, c0, c1, dtype, span)
        moments.add(z0, z1, ref, transform)
    return moments


@full_precision()
def policy_kl(
    before: PolicyOutput,
    after: PolicyOutput,
    mask: Tensor,
    actions: Tensor,
    transform: LogitTransform,
    *,
    block_elements: int = BLOCK_ELEMENTS,
) -> Tensor:
    """``KL(π_before ‖ π_after)`` of every token in ``mask``: float64 ``[n]``, row-major order.

    Args:
        before, after: the raw logits ``[B, T, V]`` of the two policies, or their
            :class:`HeadInput` (then formed by vocabulary chunks, never ``[B, T, V]`` at once).
        mask: ``[B, T]`` bool, the tokens to measure.
        actions: ``[B, T]`` token ids (the reference of each token's logit change; any id in
            ``[0, V)`` gives the same KL, the action keeps it accurate).
        transform: φ, the map from raw logits to the policy's logits.
    """
    rows = mask.nonzero(as_tuple=True)
    n, vocab = rows[0].numel(), vocab_size(before)
    dtype, device = _dtype(before, after), mask.device
    out = torch.empty(n, dtype=torch.float64, device=device)
    if isinstance(before, HeadInput) or isinstance(after, HeadInput):
        # products of HEAD_TOKENS tokens by a vocabulary block: large enough to be efficient
        width = min(vocab, max(1, block_elements // HEAD_TOKENS))
    else:  # the logits exist already: whole rows
        width = vocab
    per_chunk = max(1, block_elements // width)
    if width == vocab and fusion.fuses(block_elements * VIEW_BLOCK_FACTOR):
        per_chunk *= VIEW_BLOCK_FACTOR
    for sl, span in _chunks((rows[0], rows[1]), per_chunk, views=width == vocab):
        at = (rows[0][sl], rows[1][sl])
        acts = actions[at].long()
        z0a, z1a = _at(before, at, acts, dtype), _at(after, at, acts, dtype)
        ref = transform.difference(z0a, z1a - z0a).to(torch.float64)
        moments = _moments(before, after, at, ref, transform, width, dtype, span)
        kl = moments.kl()
        far = (moments.mean.abs() > RECENTRE).nonzero().squeeze(1)
        if far.numel():
            again = _moments(
                before, after, (at[0][far], at[1][far]), ref[far] + moments.mean[far],
                transform, width, dtype,
            )  # fmt: skip
            kl[far] = again.kl()
        wild = (~torch.isfinite(kl)).nonzero().squeeze(1)
        if wild.numel():  # e^a overflows even in float64: shifts of hundreds of nats
            kl[wild] = _direct_kl(
                before, after, (at[0][wild], at[1][wild]), transform, width, torch.float64
            )
        out[sl] = kl
    return out


def _chunks(
    rows: tuple[Tensor, Tensor], per_chunk: int, *, views: bool
) -> list[tuple[slice, Span | None]]:
    """Consecutive pieces of at most ``per_chunk`` of the tokens ``rows``; with ``views``, each
    within one run of consecutive positions of a sequence, with that run's span (its logits are
    then a view: no copy of ``[n, V]``)."""
    n = rows[0].numel()
    if not views or n == 0:
        return [(slice(i, min(i + per_chunk, n)), None) for i in range(0, n, per_chunk)]
    b, t = rows[0].tolist(), rows[1].tolist()
    out: list[tuple[slice, Span | None]] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or b[i] != b[start] or t[i] != t[start] + (i - start) or i - start == per_chunk:
            out.append((slice(start, i), (b[start], t[start], t[start] + i - start)))
            start = i
    return out


def _direct_kl(
    before: PolicyOutput,
    after: PolicyOutput,
    at: tuple[Tensor, Tensor],
    transform: LogitTransform,
    width: int,
    dtype: torch.dtype,
) -> Tensor:
    """``KL = E_π0[y0 − y1] + logsumexp(y1) − logsumexp(y0)`` of tokens ``at``, streamed over the
    vocabulary with online normalisers: no exponential of a logit change, so it stays finite
    for any finite logits (at the cost of cancellation for tiny shifts, which the main path
    handles)."""
    n = at[0].numel()
    f64 = torch.float64
    top0 = torch.full((n,), -torch.inf, dtype=f64, device=at[0].device)
    top1, mass0, mass1, gap = top0.clone(), top0.new_zeros(n), top0.new_zeros(n), top0.new_zeros(n)
    for c0 in range(0, vocab_size(before), width):
        c1 = min(c0 + width, vocab_size(before))
        y0 = transform(_block(before, at, c0, c1, dtype)).to(f64)
        y1 = transform(_block(after, at, c0, c1, dtype)).to(f64)
        new0 = torch.maximum(top0, y0.max(1).values)
        new1 = torch.maximum(top1, y1.max(1).values)
        w0 = torch.exp(y0 - new0.unsqueeze(1))
        rescale0 = torch.exp(top0 - new0)
        mass0 = mass0 * rescale0 + w0.sum(1)
        gap = gap * rescale0 + (w0 * (y0 - y1)).sum(1)
        mass1 = mass1 * torch.exp(top1 - new1) + torch.exp(y1 - new1.unsqueeze(1)).sum(1)
        top0, top1 = new0, new1
    lse0, lse1 = top0 + torch.log(mass0), top1 + torch.log(mass1)
    return (gap / mass0 + lse1 - lse0).clamp_min(0.0)
