"""The update of any elementwise ``torch.optim`` optimizer, by stepping a copy of it.

For an optimizer whose step acts on every element of a parameter independently (each element's
change depends only on its own gradient, value and state: RMSprop, Adagrad, Adadelta, Adamax,
NAdam, RAdam, ASGD, Rprop), the change of any set of rows for a loss gradient ``q`` on them is the
step of a fresh optimizer of the same class and hyperparameters on a parameter holding just those
rows, with the state restricted to them. Leading batch dimensions of ``q`` (one candidate per
slice) are stepped at once, each slice with its own copy of the state. The copy runs in float64,
so ``Δ = θ' − θ`` keeps its precision however small the step; nothing of the real optimizer
changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .rules import Kind, Restricted, Rows, UpdateRule, column_rows, read_rows, row_blocks

__all__ = ["CopyStep", "copy_rule"]

# The copy's implementation flags: plain single-tensor loops on the CPU or the tensors' device.
_PLAIN = {"foreach": False, "fused": None, "differentiable": False, "capturable": False}


@dataclass
class CopyStep(UpdateRule):
    """Δ = the step of a copy of an elementwise optimizer of class ``cls`` on loss gradient ``q``.

    ``group`` holds the hyperparameters (the real param group's, read now, so schedulers are
    honoured; ``maximize`` off: rules see the loss gradient), ``state`` the real optimizer's state
    of ``param`` (read when the rule is applied).
    """

    kind: ClassVar[Kind] = "copy"
    closed_form: ClassVar[bool] = False
    cls: type[torch.optim.Optimizer]
    group: dict[str, Any]
    param: Tensor
    state: dict[str, Any]
    dtype: torch.dtype

    def __call__(self, q: Tensor, rows: Rows = None) -> Tensor:
        work = torch.float64
        start = read_rows(self.param.detach(), rows, work)
        moved = start.expand(q.shape).clone()
        opt = self.cls([{**self.group, "params": [moved]}])  # type: ignore[call-arg]
        own = opt.state[moved]
        for key, value in self.state.items():
            if _elementwise(value, self.param):
                own[key] = read_rows(value.detach(), rows, work).expand(q.shape).clone()
            elif isinstance(value, Tensor):
                own[key] = value.detach().clone()
            else:
                own[key] = copy.deepcopy(value)
        moved.grad = q.to(work)
        opt.step()
        return (moved - start).to(self.dtype)

    def restrict(self, rows: Rows = None) -> Restricted:
        return Restricted(self, rows, None, None)

    def on_rows(self, part: Restricted, q: Tensor) -> Tensor:
        return self(q, part.rows)

    def rank_one(self, part: Restricted, h: Tensor, cv: Tensor, max_elements: int) -> Tensor:
        """Each token's own step on its rank-one gradient ``cv_t ⊗ h_t``, seen through the head:
        ``u_tj = Σ_c Δ_{t,j,c} h_{t,c}``, in blocks of rows of about ``max_elements``."""
        n, width = cv.shape
        out = torch.empty_like(cv)
        for c0, c1 in row_blocks(width, max(1, max_elements // max(1, n * h.shape[1]))):
            q = cv[:, c0:c1].unsqueeze(2) * h.unsqueeze(1)
            delta = self(q, column_rows(part.rows, c0, c1))
            out[:, c0:c1] = (delta * h.unsqueeze(1)).sum(2)
        return out


def _elementwise(value: Any, param: Tensor) -> bool:
    """State stored per element of ``param`` (as opposed to a scalar such as the step count)."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


def copy_rule(
    cls: type[torch.optim.Optimizer],
    p: Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    dtype: torch.dtype,
) -> CopyStep:
    """The :class:`CopyStep` of ``p`` under an optimizer of class ``cls`` (a torch class in
    :data:`~curvopt.optimizers.support.ELEMENTWISE`)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.numel() > 1 and not _elementwise(value, p):
            raise TypeError(
                f"optimizer: its state {key!r} of shape {tuple(value.shape)} is not per element "
                f"of a parameter of shape {tuple(p.shape)}: the step is not elementwise"
            )
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    hyper["maximize"] = False
    hyper.update({k: v for k, v in _PLAIN.items() if k in hyper})
    return CopyStep(cls, hyper, p, state, dtype)
