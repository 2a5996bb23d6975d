"""Curvature and KLs in float32 or higher, whatever the autocast state.

Inside ``torch.autocast`` (bf16 or fp16), matrix products run in the low precision even on
float32 inputs; a quadratic model built from them is off by up to tens of percent. Every model
curvopt computes runs under :func:`full_precision`, which turns autocast off on each device type
where it is on (the policy's own forwards, which the trust region measures, run as the training
forward ran: see :func:`curvopt.trust_region.region.autocast_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

__all__ = ["AUTOCAST_DEVICES", "full_precision"]

# The device types whose autocast state curvopt reads and sets.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on every device type where it is on (a context manager and a decorator)."""
    with ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
