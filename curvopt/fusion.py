"""Optional fusion of curvopt's elementwise computations with ``torch.compile``.

Each full-vocabulary block of the token path is a few products followed by some fifteen
elementwise operations and reductions over ``[n, R]``; Adam's step is a dozen elementwise
operations per parameter. Eager PyTorch writes every intermediate to memory; compiled, they fuse
into one pass. Fusion changes speed only: the same Python function runs either way.

``CURVOPT_COMPILE`` (environment): ``auto`` (default) compiles work of at least
``MIN_ELEMENTS`` elements, ``1`` always, ``0`` never. If compilation fails (no C++ compiler, an
unsupported platform), curvopt warns once and stays eager.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MIN_ELEMENTS", "call", "fuses"]

MIN_ELEMENTS = 1 << 20
_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_broken = False


def _wanted(size: int) -> bool:
    mode = os.environ.get("CURVOPT_COMPILE", "auto").lower()
    if mode in ("0", "never", "false", "off"):
        return False
    if mode in ("1", "always", "true", "on"):
        return True
    return size >= MIN_ELEMENTS


def fuses(size: int) -> bool:
    """Whether work of ``size`` elements goes through ``torch.compile`` (see the module)."""
    return not _broken and _wanted(size)


def call(fn: Callable[..., Any], size: int, *args: Any) -> Any:
    """``fn(*args)``, through ``torch.compile`` when wanted for work of ``size`` elements."""
    global _broken
    if _broken or not _wanted(size):
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[fn](*args)
    except Exception as error:  # a compiler that is missing or fails: fall back, once
        _broken = True
        warnings.warn(
            f"curvopt: torch.compile failed ({type(error).__name__}: {error}); "
            "running eagerly (set CURVOPT_COMPILE=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return fn(*args)
