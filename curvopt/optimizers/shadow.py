"""Adam moments kept by curvopt itself, for optimizers whose state cannot be read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import adam
from .readers import as_float, group_of
from .rules import UpdateRule, adam_rule

__all__ = ["ShadowAdam"]


class ShadowAdam:
    """Adam moments of the tracked parameters, advanced by curvopt from their gradients.

    At each real step :meth:`update` advances ``m, v`` from the gradient exactly as Adam would
    (:func:`curvopt.optimizers.adam.moments`); :meth:`rules` returns the exact or frozen update
    rule of that shadow Adam with the group's learning rate. ``betas``/``eps`` come from the param
    group when it has them, else Adam's defaults; ``weight_decay`` is treated as decoupled
    (AdamW-style).
    """

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.exp_avg: list[Tensor | None] = [None] * len(self.params)
        self.exp_avg_sq: list[Tensor | None] = [None] * len(self.params)
        self.step = 0

    def _hyper(self, p: Tensor) -> tuple[float, float, float, float, float]:
        group = group_of(self.optimizer, p)
        beta1, beta2 = (as_float(b) for b in group.get("betas", (0.9, 0.999)))
        return (
            as_float(group["lr"]),
            beta1,
            beta2,
            float(group.get("eps", 1e-8)),
            float(group.get("weight_decay", 0.0)),
        )

    @torch.no_grad()
    def update(self) -> None:
        """Advance the moments with the parameters' current ``.grad`` (once per real step)."""
        if all(p.grad is None for p in self.params):
            return
        self.step += 1
        for i, p in enumerate(self.params):
            _, beta1, beta2, _, _ = self._hyper(p)
            g = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            self.exp_avg[i], self.exp_avg_sq[i] = adam.moments(
                g, self.exp_avg[i], self.exp_avg_sq[i], None, beta1, beta2
            )

    def rules(self, dtype: torch.dtype, *, frozen: bool) -> list[UpdateRule]:
        """Update rules of the shadow Adam: exact (:class:`AdamStep`) or frozen."""
        out: list[UpdateRule] = []
        for i, p in enumerate(self.params):
            lr, beta1, beta2, eps, wd = self._hyper(p)
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            out.append(
                adam_rule(
                    p,
                    m,
                    v,
                    None,
                    frozen=frozen,
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    weight_decay=wd,
                    decoupled=True,
                    step=self.step if m is not None else 0,
                    dtype=dtype,
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "exp_avg": [None if t is None else t.clone() for t in self.exp_avg],
            "exp_avg_sq": [None if t is None else t.clone() for t in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(self.params)
        if len(state["exp_avg"]) != n or len(state["exp_avg_sq"]) != n:
            raise ValueError(
                f"state_dict: the shadow moments are for another head ({n} parameters expected)"
            )
        self.step = int(state["step"])
        self.exp_avg = [None if t is None else t.clone() for t in state["exp_avg"]]
        self.exp_avg_sq = [None if t is None else t.clone() for t in state["exp_avg_sq"]]
