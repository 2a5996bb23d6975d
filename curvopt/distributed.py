"""Reductions over a process group; every function is a no-op without torch.distributed.

Under data parallelism every rank holds the same head and optimizer state but its own slice of
the batch. Token and sequence candidates live on one rank; the batch candidate and the statistics
span the group. All functions here are collectives: every rank of the group must call them, in the
same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LOCAL", "active", "all_reduce_sum", "union", "world_size"]

# Pass as the group to keep a reduction on this rank (``None`` means the world).
LOCAL = "local"


def active(group: dist.ProcessGroup | str | None) -> bool:
    """True when a process group of more than one rank is in use (never for ``LOCAL``)."""
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | str | None) -> int:
    """Ranks in the group (1 without one, or for ``LOCAL``)."""
    return dist.get_world_size(group) if active(group) else 1


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup | str | None) -> Tensor:
    """The sum of ``t`` over the group (``t`` itself without one). Does not modify ``t``."""
    if not active(group):
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def union(values: Tensor, group: dist.ProcessGroup | str | None) -> Tensor:
    """Sorted unique values of a 1-D integer tensor over the group."""
    values = torch.unique(values)
    if not active(group):
        return values
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    merged = torch.unique(torch.cat(gathered))
    return merged[merged >= 0]
