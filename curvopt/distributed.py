"""Reductions over a process group; every function is a no-op without torch.distributed.

Under data parallelism every rank holds the same head and optimizer state but its own slice of
the batch. Token and sequence candidates live on one rank; the batch candidate and the statistics
span the group. All functions here are collectives: every rank of the group must call them, in the
same order.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LOCAL", "Group", "active", "all_reduce_sum", "union", "world_size"]

# Pass as the group to keep a reduction on this rank (``None`` means the world).
LOCAL = "local"
Group: TypeAlias = "dist.ProcessGroup | str | None"


def _group(group: Group) -> dist.ProcessGroup | None:
    """``group`` once it is known not to be ``LOCAL``."""
    assert not isinstance(group, str)
    return group


def active(group: Group) -> bool:
    """True when a process group of more than one rank is in use (never for ``LOCAL``)."""
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(_group(group)) > 1


def world_size(group: Group) -> int:
    """Ranks in the group (1 without one, or for ``LOCAL``)."""
    return dist.get_world_size(_group(group)) if active(group) else 1


def all_reduce_sum(t: Tensor, group: Group) -> Tensor:
    """The sum of ``t`` over the group (``t`` itself without one). Does not modify ``t``."""
    if not active(group):
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_group(group))
    return out


def union(values: Tensor, group: Group) -> Tensor:
    """Sorted unique values of a 1-D integer tensor over the group."""
    values = torch.unique(values)
    if not active(group):
        return values
    size = torch.tensor([values.numel()], device=values.device)
    pg = _group(group)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(sizes, size, group=pg)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=pg)
    merged = torch.unique(torch.cat(gathered))
    return merged[merged >= 0]
