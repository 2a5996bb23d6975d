"""A step that can be tried at several scales before it is taken, or not taken at all.

The trust region evaluates the policy at ``θ0 + s·Δθ`` for a few scales ``s``, then takes the
step at one of them or abandons it. Two ways to get there:

- :class:`PlannedStep`, for optimizers whose update curvopt computes exactly from their state and
  the gradients (``torch.optim.SGD``, ``Adam``, ``AdamW``): the trial point ``θ0 + s·Δθ`` is
  formed without stepping, into a buffer per parameter (for Adam in one pass, ``Δθ`` never
  written; on the CPU the buffers share one allocation, :func:`trial_buffers`); the parameters
  are pointed at the buffers (``.data``, no copy) and back, so ``θ0`` is never written or
  copied. :meth:`commit` lets the optimizer step from ``θ0`` with every learning rate × ``s`` —
  bit for bit the bare optimizer's step at that learning rate. Nothing is stepped until then, so
  abandoning costs nothing. Memory: one buffer per parameter (for a float32 parameter, its size;
  for a lower-precision one, ``Δθ`` in float32 beside the trial point).
- :class:`TakenStep`, for any other optimizer: it steps first, at full learning rate, with a copy
  of the parameters and of the optimizer's state kept aside; ``Δθ = θ1 − θ0`` and the step at
  scale ``s`` is ``θ0 + s·Δθ`` with the optimizer's state of the full step. For optimizers whose
  update is linear in the learning rate (SGD, Adam(W), Adamax, NAdam, RAdam, RMSprop, Adadelta,
  Adagrad without ``lr_decay``) that is their step at learning rate × ``s``; for others (Rprop,
  ASGD, LBFGS, Adafactor with relative steps, Adagrad with ``lr_decay``) it is the full step
  shrunk towards ``θ0``. Abandoning restores both copies exactly. Memory: a copy of the
  parameters and one of the optimizer's state.

Sharded parameters (``DTensor``: FSDP2, tensor parallelism) are handled through their local
shards; every operation here is elementwise, so no communication is needed.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..optimizers import UpdateRule, loss_gradients, read_rules, unwrap_optimizer
from ..optimizers.support import CLOSED_FORM, recognised

__all__ = ["PlannedStep", "TakenStep", "Transaction", "begin", "can_plan", "trial_buffers"]

TakeStep = Callable[[float], Any]


def _local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _sharded(t: Tensor) -> bool:
    return callable(getattr(t, "to_local", None))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of ``optimizer``'s param groups, once each, in order."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def can_plan(optimizer: torch.optim.Optimizer) -> bool:
    """Whether curvopt computes ``optimizer``'s next update exactly without stepping it: a torch
    SGD, Adam or AdamW (or a subclass that does not override ``step``), with unsharded parameters
    and gradients that are not scaled (an accelerate wrapper holding a ``GradScaler`` unscales
    them inside its own step)."""
    base = unwrap_optimizer(optimizer)
    if recognised(base) not in CLOSED_FORM:
        return False
    if getattr(optimizer, "scaler", None) is not None:
        return False
    return not any(_sharded(p) for p in optimizer_params(base))


class Transaction(ABC):
    """A step under trial: :meth:`move` to scales, then :meth:`commit` one or :meth:`abort`."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, copy_start: bool = True) -> None:
        self.params = optimizer_params(unwrap_optimizer(optimizer))
        with torch.no_grad():  # θ0: copies, or aliases of the parameters' own tensors
            self._start = [
                _local(p).detach().clone() if copy_start else p.detach() for p in self.params
            ]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.scale = 0.0

    def original(self, t: Tensor) -> Tensor:
        """``θ0`` of a parameter of the optimizer (``t`` itself for any other tensor)."""
        i = self._index.get(id(t))
        return t if i is None else self._start[i]

    @abstractmethod
    def _deltas(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(local parameter, θ0, Δθ)`` for each parameter; Δθ in the compute dtype."""

    @torch.no_grad()
    def move(self, scale: float) -> None:
        """Write ``θ0 + scale·Δθ`` into the parameters (summed in Δθ's dtype, then rounded)."""
        for local, start, delta in self._deltas():
            if local.dtype == delta.dtype:
                torch.add(start, delta, alpha=scale, out=local)  # one pass
            else:  # e.g. bf16 parameters: θ0 + s·Δθ summed in float32, then rounded
                local.copy_(start)
                local.add_(delta, alpha=scale)
        self.scale = scale

    @abstractmethod
    def commit(self, scale: float) -> None:
        """Finish the step at ``scale``."""

    @abstractmethod
    def abort(self) -> None:
        """Leave the parameters and the optimizer's state as they were before the step."""

    @torch.no_grad()
    def _restore_params(self) -> None:
        for p, start in zip(self.params, self._start):
            _local(p).copy_(start)


class PlannedStep(Transaction):
    """The update formed from the optimizer's state without stepping it (see the module).

    A trial point is written into a buffer and the parameter pointed at it; ``θ0`` stays where it
    was. Where the parameter's dtype is its compute dtype (float32, float64), the buffer is the
    only copy: the next trial point is ``θ0 + (s'/s)·(θ_s − θ0)`` from the current one (the
    trial points are measurements, within a rounding of ``θ0 + s'Δθ``; the step taken is the
    optimizer's own). Otherwise (bf16, fp16) ``Δθ`` is kept in float32 and each trial point is
    ``θ0 + s'Δθ`` summed in float32, then rounded.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, take_step: TakeStep) -> None:
        # θ0: aliases of the parameters' own tensors (no copy), which nothing here writes
        super().__init__(optimizer, copy_start=False)
        self.optimizer = unwrap_optimizer(optimizer)
        self.take_step = take_step
        self._held = 0.0
        # per parameter with a gradient: (parameter, θ0, trial buffer, Δθ or None)
        self._trials: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] | None = None

    def _planned(self) -> Iterator[tuple[Tensor, Tensor, UpdateRule, Tensor]]:
        """``(parameter, θ0, update rule, loss gradient)`` of each parameter with a gradient
        (torch optimizers leave one without alone), the rule in the parameter's compute dtype;
        the rules read the parameters (weight decay), so they are formed at θ0."""
        start = {id(p): s for p, s in zip(self.params, self._start)}
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                by_dtype.setdefault(_compute_dtype(p), []).append(p)
        for dtype, ps in by_dtype.items():
            rules = read_rules(self.optimizer, ps, frozen=False, dtype=dtype)
            for p, rule, q in zip(ps, rules, loss_gradients(rules, ps, self.optimizer)):
                assert q is not None
                yield p, start[id(p)], rule, q

    def _deltas(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for p, start, rule, q in self._planned():
            yield p, start, rule.full(q)

    @torch.no_grad()
    def move(self, scale: float) -> None:
        """Point the parameters at ``θ0 + scale·Δθ`` (at ``θ0`` itself for scale 0)."""
        if self._trials is None:
            self._trials = []
            self._held = scale or 1.0  # the scale the buffers hold
            buffers = trial_buffers([p for p in self.params if p.grad is not None])
            for p, start, rule, q in self._planned():
                trial = buffers[id(p)]
                if rule.dtype == p.dtype:  # the trial point is the only buffer (one pass)
                    self._trials.append((p, start, rule.point(q, start, self._held, trial), None))
                else:  # Δθ kept in the compute dtype; the trial point in the parameter's
                    delta = rule.full(q)
                    trial.copy_(start)
                    trial.add_(delta, alpha=self._held)
                    self._trials.append((p, start, trial, delta))
        elif scale and scale != self._held:
            ratio = scale / self._held
            for _, start, trial, kept in self._trials:
                if kept is None:
                    torch.lerp(start, trial, ratio, out=trial)
                else:
                    trial.copy_(start)
                    trial.add_(kept, alpha=scale)
            self._held = scale
        for p, start, trial, _ in self._trials:
            p.data = trial if scale else start
        self.scale = scale

    def commit(self, scale: float) -> None:
        self._restore_params()
        self.take_step(scale)

    def abort(self) -> None:
        self._restore_params()

    @torch.no_grad()
    def _restore_params(self) -> None:
        for p, start, _, _ in self._trials or ():
            p.data = start
        self._trials = None  # the buffers are freed before the optimizer steps
        self.scale = 0.0


#: where trial buffers start within their shared allocation (bytes)
ALIGNMENT = 64


def trial_buffers(params: list[Tensor]) -> dict[int, Tensor]:
    """An uninitialised buffer like each of ``params`` (by ``id``), contiguous.

    On the CPU they are carved out of one allocation per dtype, each starting on an
    ``ALIGNMENT``-byte boundary: one allocation and one release of the whole instead of one per
    parameter, and the trial forwards then run as fast as forwards on the parameters themselves
    (trial points in hundreds of separate allocations made them measurably slower; see
    docs/performance.md). Elsewhere each is allocated on its own: a caching allocator (CUDA)
    reuses blocks of those sizes, where one block the size of all the parameters together could
    fragment its pool.
    """
    out: dict[int, Tensor] = {}
    groups: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.device.type == "cpu":
            groups.setdefault(p.dtype, []).append(p)
        else:
            out[id(p)] = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    for dtype, ps in groups.items():
        step = max(1, ALIGNMENT // ps[0].element_size())
        offsets, total = [], 0
        for p in ps:
            offsets.append(total)
            total += -(-p.numel() // step) * step
        flat = torch.empty(total, dtype=dtype, device="cpu")
        for p, offset in zip(ps, offsets):
            out[id(p)] = flat[offset : offset + p.numel()].view(p.shape)
    return out


class TakenStep(Transaction):
    """The optimizer stepped at full learning rate, with its prior state kept (see the module)."""

    def __init__(self, optimizer: torch.optim.Optimizer, take_step: TakeStep) -> None:
        super().__init__(optimizer)
        base = unwrap_optimizer(optimizer)
        self.state = base.state
        self._saved = {p: copy.deepcopy(dict(s)) for p, s in base.state.items()}
        take_step(1.0)
        self.scale = 1.0

    def _deltas(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for p, start in zip(self.params, self._start):
            local = _local(p)
            dtype = _compute_dtype(p)
            # the parameters hold θ0 + scale·Δθ: Δθ from them (exact at scale 1, within
            # rounding after)
            delta = (local.detach().to(dtype) - start.to(dtype)).div_(self.scale)
            yield local, start, delta

    def move(self, scale: float) -> None:
        if scale != self.scale:
            super().move(scale)

    def commit(self, scale: float) -> None:
        self.move(scale)

    @torch.no_grad()
    def abort(self) -> None:
        self._restore_params()
        for p in list(self.state):
            if p not in self._saved:
                del self.state[p]
        for p, saved in self._saved.items():
            self.state[p] = saved


def begin(optimizer: torch.optim.Optimizer, take_step: TakeStep) -> Transaction:
    """The transaction that fits ``optimizer``: planned where curvopt can, taken otherwise."""
    if can_plan(optimizer):
        return PlannedStep(optimizer, take_step)
    return TakenStep(optimizer, take_step)
