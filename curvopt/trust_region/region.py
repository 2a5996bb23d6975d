"""The measured whole-policy trust region: scale each step so that the policy's measured KL on
the step's own tokens stays within a bound.

After ``backward()``, the update Δθ the optimizer is about to take is tried at a few scales ``s``
(:mod:`~curvopt.trust_region.step`). At each, the step's micro-batches are run forward with no
gradient and the exact mean per-token ``KL(π_θ ‖ π_{θ+sΔθ})`` over their kept tokens is computed
(:mod:`~curvopt.trust_region.kl`); the scale comes from :mod:`~curvopt.trust_region.search`. Only
forwards are needed, so any model works: any attention kernel, tied weights, LoRA, bf16,
``torch.autocast``, DDP (the KL is the group's mean) and FSDP2 (sharded parameters; after each
change the root module's gathered parameters are dropped so the next forward sees it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..policy import LogitTransform
from ..precision import AUTOCAST_DEVICES
from .kl import HeadInput, PolicyOutput, batch_shape, policy_kl, vocab_size
from .search import Search
from .step import Transaction, begin

__all__ = ["Measured", "TrustRegion", "autocast_state"]

Forward = Callable[[nn.Module], PolicyOutput]


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast contexts in force (device type and dtype), to run trial forwards as the
    training forward ran."""
    return tuple(
        (device, torch.get_autocast_dtype(device))
        for device in AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device)
    )


@dataclass
class Measured:
    """What measuring one micro-batch needs.

    ``keep``/``actions`` ``[B, T]``; ``before`` the policy's output at the step's start (the
    caller's logits, or the head's input states with the head's parameters, resolved to their
    values at the start of the step when measured); ``forward`` maps the model to the policy's
    output at the current parameters; ``autocast`` the contexts the training forward ran in.
    """

    keep: Tensor
    actions: Tensor
    before: PolicyOutput
    forward: Forward
    autocast: tuple[tuple[str, torch.dtype], ...] = ()
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = int(self.keep.sum())


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel`` (its forward would broadcast buffers)."""
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
        return inner
    return model


class TrustRegion:
    """Bound the measured mean per-token KL of every optimizer step (see the module docstring).

    Args:
        bound: the bound on ``mean_t KL(π_θ(·|x_t) ‖ π_{θ+sΔθ}(·|x_t))`` over the step's kept
            tokens.
        model: the policy (the module the forwards receive; a DDP wrapper is looked through).
        transform: the map from raw logits to the policy's logits (temperature, scale, soft-cap).
        process_group: under ``torch.distributed``, the KL is the mean over this group's tokens
            (every rank takes the same decisions; ``step`` is then a collective).
        search: the scale search's settings (a :class:`~curvopt.trust_region.search.Search`).
    """

    def __init__(
        self,
        bound: float,
        model: nn.Module,
        transform: LogitTransform,
        *,
        head: nn.Module | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        search: Search | None = None,
    ) -> None:
        self.search = search if search is not None else Search(bound)
        self.model = model
        self.head = head
        self.transform = transform
        self.process_group = process_group
        self._warned_dropout = False

    @torch.no_grad()
    def record(
        self,
        keep: Tensor,
        actions: Tensor,
        *,
        hidden: Tensor | None = None,
        logits: Tensor | None = None,
        forward: Forward | None = None,
    ) -> Measured:
        """What measuring a micro-batch needs, from what ``select`` was given.

        The policy before the step: ``logits`` (kept by reference), else ``hidden`` through a
        linear ``head`` (``[B, T, H]`` kept, the logits formed in chunks when measured), else
        ``forward(model)`` now. After it: ``forward(model)`` at each trial point, else the head
        on ``hidden`` (the output layer's share alone: the states entering it are held fixed).
        """
        head = self.head
        if forward is None:
            if hidden is None or head is None:
                raise TypeError(
                    "forward: the trust region measures the policy after the step; pass "
                    "forward=, a callable mapping the model to the completion logits [B, T, V]"
                )
            forward = _head_forward(head, hidden.detach())
        before: PolicyOutput
        if logits is not None:
            before = logits.detach()
        elif hidden is not None and isinstance(head, nn.Linear):
            before = HeadInput(hidden.detach(), head.weight, head.bias)
        else:
            with _autocast(autocast_state()):
                before = forward(_unwrap(self.model))
            _check_output(before, keep)
            if isinstance(before, Tensor):
                before = before.detach()
        return Measured(keep, actions.detach(), before, forward, autocast_state())

    @property
    def bound(self) -> float:
        return self.search.bound

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        batches: Sequence[Measured],
        take_step: Callable[[float], Any],
    ) -> dict[str, float]:
        """Take ``optimizer``'s step at the scale the bound allows, or not at all.

        ``take_step(s)`` steps the optimizer with every learning rate × ``s``. Returns the step's
        statistics: ``step_scale`` (0 when not taken), ``step_policy_shift`` (the measured KL of
        the unscaled step), ``policy_shift_realised`` (of the step taken), ``trust_region_trials``
        (measurements, each a forward of every micro-batch) and ``skipped`` (1 when the step was
        not taken: non-finite gradients or KL, or no safe scale; parameters and optimizer state
        are then as before).
        """
        if not self._finite_gradients(optimizer):
            warnings.warn(
                "curvopt: non-finite gradients; the step is not taken",
                RuntimeWarning,
                stacklevel=3,
            )
            return _not_taken(math.nan, 0)
        self._check_dropout()
        txn = begin(optimizer, take_step)
        try:
            result = self.search.run(lambda s: self._measure(txn, s, batches))
        except BaseException:
            txn.abort()
            self._reshard()
            raise
        if result.scale is None:
            txn.abort()
            self._reshard()
            reason = (
                "is not finite"
                if not math.isfinite(result.trials[-1][1])
                else (f"stays above the bound {self.bound:g} at every scale tried")
            )
            warnings.warn(
                f"curvopt: the step's measured KL {reason} "
                f"(trials: {[(round(s, 4), m) for s, m in result.trials]}); "
                "the step is not taken",
                RuntimeWarning,
                stacklevel=3,
            )
            return _not_taken(result.unscaled_kl, len(result.trials))
        txn.commit(result.scale)
        self._reshard()
        return {
            "step_scale": result.scale,
            "step_policy_shift": result.unscaled_kl,
            "policy_shift_realised": result.kl,
            "trust_region_trials": float(len(result.trials)),
            "skipped": 0.0,
        }

    # ------------------------------------------------------------------ internals

    def _finite_gradients(self, optimizer: torch.optim.Optimizer) -> bool:
        bad = torch.zeros((), dtype=torch.float64)
        device = None
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.detach()
                    g = g.to_local() if callable(getattr(g, "to_local", None)) else g
                    device = g.device
                    if g.numel():  # both finite unless an entry is ±inf or NaN (one pass)
                        ends = torch.stack(torch.aminmax(g))
                        bad = bad.to(device) + (~torch.isfinite(ends)).any().double()
        if device is None:
            device = next(self.model.parameters()).device
        bad = distributed.all_reduce_sum(bad.to(device), self.process_group)
        return float(bad) == 0.0

    def _check_dropout(self) -> None:
        if self._warned_dropout or not self.model.training:
            return
        dropout = nn.modules.dropout._DropoutNd
        if any(isinstance(m, dropout) and m.p > 0 for m in self.model.modules()):
            self._warned_dropout = True
            warnings.warn(
                "curvopt: the model is in training mode with dropout: each trial forward draws "
                "new dropout masks, so the measured KL includes their noise. Disable dropout "
                "(model.eval(), or a config with zero dropout) for RL training.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _reshard(self) -> None:
        """Drop FSDP2's gathered parameters: the next forward gathers the changed shards."""
        for module in _fsdp_modules(self.model):
            module.reshard()  # type: ignore[operator]

    @torch.no_grad()
    def _measure(self, txn: Transaction, scale: float, batches: Sequence[Measured]) -> float:
        """Mean KL over the kept tokens of every micro-batch (over the group) at ``scale``."""
        txn.move(scale)
        self._reshard()
        model = _unwrap(self.model)
        total = torch.zeros(2, dtype=torch.float64)
        device = None
        # FSDP's forwards gather parameters from every rank: each rank runs each of its forwards
        collective = bool(_fsdp_modules(self.model))
        for b in batches:
            if not b.tokens and not collective:
                continue
            with _autocast(b.autocast):
                after = b.forward(model)
            _check_output(after, b.keep, vocab_size(b.before))
            kl = policy_kl(_at_start(b.before, txn), after, b.keep, b.actions, self.transform)
            device = kl.device
            total = total.to(device) + torch.stack([kl.sum(), kl.new_tensor(float(b.tokens))])
        if device is None:
            device = next(model.parameters()).device
        kl_sum, n = distributed.all_reduce_sum(total.to(device), self.process_group).tolist()
        return kl_sum / n if n else 0.0


def _head_forward(head: nn.Module, hidden: Tensor) -> Forward:
    """The policy as ``head`` on fixed input states: a :class:`HeadInput` for a linear head."""
    if isinstance(head, nn.Linear):
        return lambda _: HeadInput(hidden, head.weight, head.bias)
    return lambda _: head(hidden)


def _at_start(out: PolicyOutput, txn: Transaction) -> PolicyOutput:
    """``out`` with a head's parameters taken at the start of the step."""
    if isinstance(out, HeadInput):
        bias = None if out.bias is None else txn.original(out.bias)
        return HeadInput(out.hidden, txn.original(out.weight), bias)
    return out


def _check_output(out: Any, keep: Tensor, vocab: int | None = None) -> None:
    if not isinstance(out, (Tensor, HeadInput)):
        raise TypeError(
            "forward: expected it to return the completion logits [B, T, V] (a Tensor) or a "
            f"curvopt.HeadInput, got {type(out).__name__}"
        )
    shape = batch_shape(out)
    if tuple(shape) != tuple(keep.shape):
        raise ValueError(
            f"forward: returned logits of shape {tuple(shape)} + [V] for a mask of shape "
            f"{tuple(keep.shape)}; it must return the logits of the completion tokens the mask "
            "covers, [B, T, V]"
        )
    if vocab is not None and vocab_size(out) != vocab:
        raise ValueError(
            f"forward: returned V = {vocab_size(out)} logits per token, but the policy before the "
            f"step had V = {vocab} (the logits given to select, or the head's rows)"
        )


class _autocast:
    """Re-enter the autocast contexts a training forward ran in."""

    def __init__(self, state: tuple[tuple[str, torch.dtype], ...]) -> None:
        self.contexts = [torch.autocast(device, dtype=dtype) for device, dtype in state]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _not_taken(unscaled: float, trials: int) -> dict[str, float]:
    return {
        "step_scale": 0.0,
        "step_policy_shift": unscaled,
        "policy_shift_realised": 0.0,
        "trust_region_trials": float(trials),
        "skipped": 1.0,
    }
