"""Input checks shared by every entry point: each error names the argument, what was expected
and what was given, and is raised before any state changes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .inputs import Inputs

__all__ = [
    "check_choice",
    "check_distinct",
    "check_finite",
    "check_fraction",
    "check_inputs",
    "check_measured",
    "check_model_advantages",
    "check_optional_positive",
    "check_positive",
    "check_positive_bound",
    "check_top_k",
]

T = TypeVar("T")

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# The largest |advantage| the quadratic models take: beyond it, a candidate's squared gradient can
# overflow float32 in Adam's second moment (a step that should saturate comes out as zero).
MAX_ADVANTAGE = 1e12


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value: T, choices: Sequence[Any]) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float, if it is a finite number."""
    if not _is_number(value):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    """``value`` if it is a finite number > 0."""
    if not _is_number(value):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def check_optional_positive(name: str, value: float | None) -> float | None:
    """``value`` if it is None or a finite number > 0."""
    if value is None:
        return value
    if not _is_number(value):
        raise TypeError(f"{name}: expected None or a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected None or a finite number > 0, got {value}")
    return value


def check_positive_bound(name: str, value: Any) -> float | None:
    """``value`` as a float, or None: a bound that is off (None) or a finite number > 0."""
    if value is not None and (not _is_number(value) or not (math.isfinite(value) and value > 0)):
        raise ValueError(f"{name}: expected None or a finite number > 0, got {value!r}")
    return None if value is None else float(value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float, if it is a number in ``[0, 1)``."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def check_top_k(name: str, value: int | None) -> int | None:
    """``value`` if it is None or an int ≥ 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name}: expected None or an int, got {type(value).__name__}")
    if value is not None and value < 1:
        raise ValueError(f"{name}: expected None or ≥ 1, got {value}")
    return value


def check_distinct(name: str, value: Any, choices: Sequence[T]) -> tuple[T, ...]:
    """``value`` as a tuple, if it is a sequence (not a string) of distinct ``choices``."""
    if isinstance(value, str):
        raise TypeError(f"{name}: expected a sequence of levels such as ('token',), got {value!r}")
    value = tuple(value)
    if any(v not in choices for v in value) or len(set(value)) != len(value):
        raise ValueError(
            f"{name}: expected distinct levels from {tuple(choices)} (or none), got {value}"
        )
    return value


def check_inputs(inputs: Inputs, device: torch.device) -> Tensor:
    """Check shapes, dtypes, devices and finiteness; return the mask as bool. ``hidden`` may be
    None (whole-model tracking), and then ``actions`` sets B and T."""
    hidden, actions, advantages, mask, logits = (
        inputs.hidden,
        inputs.actions,
        inputs.advantages,
        inputs.mask,
        inputs.logits,
    )
    for name, t in (
        ("hidden", hidden),
        ("actions", actions),
        ("advantages", advantages),
        ("mask", mask),
    ):
        if not isinstance(t, Tensor) and not (name == "hidden" and t is None):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if logits is not None and not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor or None, got {type(logits).__name__}")
    if hidden is not None:
        if not hidden.is_floating_point():
            raise TypeError(f"hidden: expected a floating-point tensor, got {hidden.dtype}")
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected shape [B, T, H], got {tuple(hidden.shape)}")
    if actions.dtype not in INTEGER_DTYPES:
        raise TypeError(f"actions: expected an integer tensor, got {actions.dtype}")
    if hidden is not None and tuple(actions.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"actions: expected shape {tuple(hidden.shape[:2])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(actions.shape)}"
        )
    if actions.dim() != 2:
        raise ValueError(f"actions: expected shape [B, T], got {tuple(actions.shape)}")
    B, T = actions.shape
    if not advantages.is_floating_point():
        raise TypeError(f"advantages: expected a floating-point tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages: expected shape {(B,)} or {(B, T)}, got {tuple(advantages.shape)}"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask: expected a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)}, got {tuple(mask.shape)}")
    if logits is not None:
        if not logits.is_floating_point():
            raise TypeError(f"logits: expected a floating-point tensor, got {logits.dtype}")
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
            raise ValueError(f"logits: expected shape [{B}, {T}, V], got {tuple(logits.shape)}")
    for name, t in (
        ("hidden", hidden),
        ("actions", actions),
        ("advantages", advantages),
        ("mask", mask),
        ("logits", logits),
    ):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: is on {t.device}, but the head is on {device}")
    if hidden is not None and not torch.isfinite(hidden).all():
        raise ValueError("hidden: contains non-finite values")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages: contains non-finite values")
    return mask.bool()


def check_measured(inputs: Inputs, device: torch.device, head: nn.Module | None) -> Tensor:
    """:func:`check_inputs` where no model of the head checks the rest (the trust region alone):
    masked-in actions within the vocabulary (the logits', else a linear ``head``'s), finite
    logits there, and, when the policy is ``head`` on ``hidden`` (a linear head, no
    ``forward``), hidden states of its input width and logits of its output width."""
    mask = check_inputs(inputs, device)
    logits, hidden = inputs.logits, inputs.hidden
    linear = head if isinstance(head, nn.Linear) else None
    if linear is not None and hidden is not None and hidden.shape[-1] != linear.in_features:
        raise ValueError(
            f"hidden: expected states of width H = {linear.in_features} (the head's "
            f"in_features), got {hidden.shape[-1]}"
        )
    if (
        linear is not None
        and hidden is not None
        and inputs.forward is None
        and logits is not None
        and logits.shape[-1] != linear.out_features
    ):
        raise ValueError(
            f"logits: the head gives V = {linear.out_features} logits per token (all its rows, "
            f"padding beyond the tokenizer's vocabulary included), got V = {logits.shape[-1]}"
        )
    vocab = logits.shape[-1] if logits is not None else None
    if vocab is None and linear is not None:
        vocab = linear.out_features
    acts = inputs.actions[mask]
    if vocab is not None and acts.numel() and (acts.min() < 0 or acts.max() >= vocab):
        bad = acts[(acts < 0) | (acts >= vocab)][0].item()
        raise ValueError(
            f"actions: masked-in token id {bad} is outside the vocabulary [0, {vocab})"
        )
    check_finite_logits(logits, mask)
    return mask


def check_finite_logits(logits: Tensor | None, mask: Tensor) -> None:
    """``logits [B, T, V]`` (when given) are finite at the masked-in positions (``mask [B, T]``
    bool): per-token extremes (both finite unless an entry is ±inf or NaN; NaN propagates
    through both) instead of an elementwise test. ``amax`` and ``amin`` separately: on CPU the
    pair is about 3× faster over the last dimension than ``aminmax``."""
    if logits is None or logits.shape[-1] == 0:
        return
    z = logits.detach()
    low, high = z.amin(-1), z.amax(-1)
    if not (torch.isfinite(low[mask]).all() and torch.isfinite(high[mask]).all()):
        raise ValueError("logits: contains non-finite values at masked-in positions")


def check_model_advantages(advantages: Tensor) -> None:
    """The masked-in ``advantages`` (any shape) are within :data:`MAX_ADVANTAGE` in magnitude."""
    if advantages.numel() == 0:
        return
    largest = float(advantages.abs().max())
    if largest > MAX_ADVANTAGE:
        raise ValueError(
            f"advantages: |A| up to {largest:.3g} at masked-in tokens; the quadratic models take "
            f"|A| <= {MAX_ADVANTAGE:g} (beyond it a candidate's update overflows float32): "
            "normalise the advantages (as GRPO does)"
        )
