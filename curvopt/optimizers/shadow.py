"""Adam moments kept by curvopt itself, for optimizers whose state cannot be read."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import adam
from .readers import as_float, group_of
from .rules import UpdateRule, adam_rule

__all__ = ["ShadowAdam", "ShadowWatch"]


class ShadowAdam:
    """Adam moments of the tracked parameters, advanced by curvopt from their gradients.

    At each real step :meth:`update` advances ``m, v`` (and ``max v`` with ``amsgrad``) from the
    gradient exactly as Adam would (:func:`curvopt.optimizers.adam.moments`; the loss gradient is
    negated where the group maximizes, and L2 weight decay enters it as in ``torch.optim.Adam``);
    :meth:`rules` returns the exact or frozen update rule of that shadow Adam with the group's
    learning rate. ``betas``, ``eps``, ``amsgrad`` and ``decoupled_weight_decay`` come from the
    param group (:func:`curvopt.optimizers.support.check_shadow` checks they are Adam's); without
    ``decoupled_weight_decay``, weight decay is taken as decoupled (AdamW-style).
    """

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        n = len(self.params)
        self.exp_avg: list[Tensor | None] = [None] * n
        self.exp_avg_sq: list[Tensor | None] = [None] * n
        self.max_exp_avg_sq: list[Tensor | None] = [None] * n
        self.step = 0
        self._captured: dict[int, Tensor | None] = {}

    def _hyper(self, p: Tensor) -> dict[str, Any]:
        group = group_of(self.optimizer, p)
        beta1, beta2 = (as_float(b) for b in group.get("betas", (0.9, 0.999)))
        return {
            "lr": as_float(group["lr"]),
            "beta1": beta1,
            "beta2": beta2,
            "eps": as_float(group.get("eps", 1e-8)),
            "weight_decay": as_float(group.get("weight_decay", 0.0)),
            "decoupled": bool(group.get("decoupled_weight_decay", True)),
            "amsgrad": bool(group.get("amsgrad", False)),
            "maximize": bool(group.get("maximize", False)),
        }

    def _loss_gradient(self, i: int, hyper: dict[str, Any]) -> Tensor | None:
        """The gradient Adam's moments see: ``±grad`` (+ ``λ·p`` under L2 decay), float32."""
        p = self.params[i]
        if p.grad is None:
            return None
        g = p.grad.float()
        if hyper["maximize"]:
            g = -g
        if hyper["weight_decay"] and not hyper["decoupled"]:
            g = g + hyper["weight_decay"] * p.detach().float()
        return g

    @torch.no_grad()
    def capture(self) -> None:
        """Just before a step: keep the loss gradients that depend on the parameters (L2 decay
        reads them before the step changes them) for the :meth:`update` that follows."""
        self._captured = {}
        for i, p in enumerate(self.params):
            hyper = self._hyper(p)
            if hyper["weight_decay"] and not hyper["decoupled"]:
                self._captured[i] = self._loss_gradient(i, hyper)

    @torch.no_grad()
    def update(self) -> None:
        """Advance the moments with the parameters' current ``.grad`` (once per real step; the
        gradients :meth:`capture` kept, if it was called before the step)."""
        captured, self._captured = self._captured, {}
        if all(p.grad is None for p in self.params):
            return
        self.step += 1
        for i, p in enumerate(self.params):
            hyper = self._hyper(p)
            g = captured[i] if i in captured else self._loss_gradient(i, hyper)
            if g is None:
                g = torch.zeros_like(p, dtype=torch.float32)
            self.exp_avg[i], self.exp_avg_sq[i] = adam.moments(
                g, self.exp_avg[i], self.exp_avg_sq[i], None, hyper["beta1"], hyper["beta2"]
            )
            if hyper["amsgrad"]:
                top, v = self.max_exp_avg_sq[i], self.exp_avg_sq[i]
                assert v is not None
                self.max_exp_avg_sq[i] = v.clone() if top is None else torch.maximum(top, v)

    def rules(self, dtype: torch.dtype, *, frozen: bool) -> list[UpdateRule]:
        """Update rules of the shadow Adam: exact (:class:`AdamStep`) or frozen."""
        out: list[UpdateRule] = []
        for i, p in enumerate(self.params):
            hyper = self._hyper(p)
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            out.append(
                adam_rule(
                    p,
                    m,
                    v,
                    self.max_exp_avg_sq[i] if hyper["amsgrad"] else None,
                    frozen=frozen,
                    lr=hyper["lr"],
                    beta1=hyper["beta1"],
                    beta2=hyper["beta2"],
                    eps=hyper["eps"],
                    weight_decay=hyper["weight_decay"],
                    decoupled=hyper["decoupled"],
                    step=self.step if m is not None else 0,
                    dtype=dtype,
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        def copies(ts: list[Tensor | None]) -> list[Tensor | None]:
            return [None if t is None else t.clone() for t in ts]

        return {
            "step": self.step,
            "exp_avg": copies(self.exp_avg),
            "exp_avg_sq": copies(self.exp_avg_sq),
            "max_exp_avg_sq": copies(self.max_exp_avg_sq),
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
        top = state.get("max_exp_avg_sq", [None] * n)
        self.max_exp_avg_sq = [None if t is None else t.clone() for t in top]


class ShadowWatch:
    """Checks at every step that the optimizer's update of the tracked parameters is the shadow
    Adam's: before the step, the shadow's step of a few rows (:data:`ROWS` of each parameter) is
    planned from the gradients; after it, the change taken (× the step's scale) is compared, and a
    :class:`RuntimeWarning` is raised (once) when they differ by more than :data:`TOLERANCE` beyond
    the parameters' rounding. ``error`` is the last step's relative difference.
    """

    ROWS = 16
    TOLERANCE = 0.1

    def __init__(self, shadow: ShadowAdam) -> None:
        self.shadow = shadow
        self.error = 0.0
        self._planned: list[tuple[Tensor, Any, Tensor, Tensor]] = []
        self._warned = False

    @torch.no_grad()
    def before(self) -> None:
        """Plan the sampled rows' step from the current gradients (call just before the step)."""
        self.shadow.capture()
        self._planned = []
        rules = self.shadow.rules(torch.float64, frozen=False)
        for rule, p in zip(rules, self.shadow.params):
            if p.grad is None:
                continue
            rows = slice(0, min(self.ROWS, p.shape[0])) if p.dim() else None
            grad = p.grad.detach()[rows].double()
            if group_of(self.shadow.optimizer, p).get("maximize", False):
                grad = -grad
            start = p.detach()[rows].double().clone()
            self._planned.append((p, rows, start, rule(grad, rows)))

    @torch.no_grad()
    def after(self, scale: float) -> None:
        """Compare the step taken at ``scale`` with the plan (call once the step is taken)."""
        if not self._planned:
            return
        taken, planned, rounding = [], [], []
        for p, rows, start, delta in self._planned:
            taken.append((p.detach()[rows].double() - start).flatten())
            planned.append(delta.flatten() * scale)
            rounding.append(start.flatten() * (2 * torch.finfo(p.dtype).eps))
        diff = torch.cat(taken) - torch.cat(planned)
        want = float(torch.cat(planned).norm())
        excess = max(0.0, float(diff.norm()) - float(torch.cat(rounding).norm()))
        self.error = excess / want if want > 0 else 0.0
        self._planned = []
        if self.error > self.TOLERANCE and not self._warned:
            self._warned = True
            optimizer = type(self.shadow.optimizer)
            warnings.warn(
                f"curvopt: direction='shadow': the step {optimizer.__module__}."
                f"{optimizer.__qualname__} took differs from the shadow Adam's by "
                f"{self.error:.0%} (relative, step {self.shadow.step + 1}), so the quadratic "
                "models of its candidates are off by about that much. The shadow moments model "
                "Adam's update and start from zero when CAPO is built: for another optimizer, "
                "bound the whole policy with the measured trust region (CAPO(optimizer, "
                "model=model)).",
                RuntimeWarning,
                stacklevel=4,
            )
