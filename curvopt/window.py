"""The window: everything between two optimizer steps.

Each ``select`` call adds its token and candidate counts (summed over the process group, so every
rank holds the same window) and what the step will model or measure of its micro-batch; the step
adds its own measurements. The first ``select`` after a step opens a new window, so the statistics
still describe the last step after ``step()`` returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .distributed import Group
from .inputs import Inputs
from .rejector import Selection
from .trust_region import Measured

__all__ = ["Window"]


class Window:
    """One optimizer step's selections, micro-batches and measurements (see the module)."""

    def __init__(self, group: Group = None) -> None:
        self.group = group
        self.open = False
        self.sums: dict[str, Tensor] = {}
        self.batches: list[Inputs] = []
        self.measured: list[Measured] = []
        self.step: dict[str, float] = {}

    def add(self, selection: Selection, mask: Tensor) -> None:
        """Count one ``select`` call (a collective under a process group)."""
        keep = selection.keep
        add: dict[str, Tensor] = {"tokens": mask.bool().sum(), "kept_tokens": keep.sum()}
        for i, (qm, accepted) in enumerate(selection.models):
            cand = qm.candidates
            # every rank holds the whole (global) batch candidate: count it once over the group
            share = 1.0 / distributed.world_size(self.group) if qm.level == "batch" else 1.0
            prefix = [qm.level + "_"] if i else ["", qm.level + "_"]
            for p in prefix:
                add[p + "candidates"] = cand.sum() * share
                add[p + "objective_shift_sum"] = qm.objective_shift[cand].sum() * share
                add[p + "policy_shift_sum"] = qm.policy_shift[cand].sum() * share
            add[qm.level + "_rejected"] = (cand & ~accepted).sum() * share
        keys = list(add)
        values = torch.stack([add[k].to(device=keep.device, dtype=torch.float64) for k in keys])
        values = distributed.all_reduce_sum(values, self.group)
        if not self.open:
            self.open, self.sums = True, {}
            self.batches, self.measured, self.step = [], [], {}
        for k, v in zip(keys, values):
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    @property
    def kept_nothing(self) -> bool:
        """An open window whose selections kept no token."""
        return self.open and float(self.sums["kept_tokens"]) == 0

    def unkeep(self, count: int) -> None:
        """``count`` kept tokens were rejected after their selection (by the step)."""
        kept = self.sums["kept_tokens"]
        self.sums["kept_tokens"] = kept - torch.tensor(float(count)).to(kept)

    def close(self) -> None:
        """The step is done: the next ``select`` opens a new window (the statistics stay)."""
        self.open = False
        self.batches, self.measured = [], []

    def stats(self) -> dict[str, float]:
        """The window's counts and means, and the step's measurements."""
        out: dict[str, float] = {}
        w = {k: float(v) for k, v in self.sums.items()}
        if w:
            tokens = w["tokens"]
            out["tokens"], out["kept_tokens"] = tokens, w["kept_tokens"]
            out["rejected_frac"] = 1.0 - w["kept_tokens"] / tokens if tokens else 0.0
            for key in list(w):
                if key.endswith("candidates"):
                    prefix = key[: -len("candidates")]
                    n = w[key]
                    if prefix:
                        out[key] = n
                        out[prefix + "rejected"] = w[prefix + "rejected"]
                    for name in ("objective_shift", "policy_shift"):
                        out[f"{prefix}{name}_mean"] = w[f"{prefix}{name}_sum"] / n if n else 0.0
        out.update(self.step)
        return out
