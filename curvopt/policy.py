"""The map from the head's outputs to the logits of the policy being trained.

Many trainers do not sample from ``softmax(head(h))``: TRL divides by the sampling temperature,
some models multiply by a logit scale (Cohere) or soft-cap the logits (Gemma 2). The policy is then
``softmax(φ(z))`` with ``z = head(h)`` and, elementwise,

    φ(z) = c·tanh(s·z / c) / τ        (soft-cap c; without one, φ(z) = s·z / τ)

for logit scale s, soft-cap c and temperature τ. A parameter change that moves z by u moves the
policy's logits by ``φ'(z)·u + ½φ''(z)·u² + …``, so the tracker's quadratic model uses
``φ'(z)⊙u`` as the logit change and ``φ''(z)⊙u²`` as the logits' second directional derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import check_optional_positive, check_positive

__all__ = ["LogitTransform"]


@dataclass(frozen=True)
class LogitTransform:
    """φ(z) = softcap·tanh(scale·z/softcap)/temperature, or scale·z/temperature without softcap."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_positive("logit_scale", self.scale)
        check_positive("temperature", self.temperature)
        check_optional_positive("softcap", self.softcap)

    @property
    def linear(self) -> bool:
        return self.softcap is None

    @property
    def identity(self) -> bool:
        return self.linear and self.scale == 1.0 and self.temperature == 1.0

    def __call__(self, z: Tensor) -> Tensor:
        if self.identity:
            return z
        if self.softcap is None:
            return z * (self.scale / self.temperature)
        return torch.tanh(z * (self.scale / self.softcap)) * (self.softcap / self.temperature)

    def derivatives(self, z: Tensor) -> tuple[Tensor | float, Tensor | None]:
        """(φ'(z), φ''(z)); a float and None when φ is linear."""
        if self.softcap is None:
            return self.scale / self.temperature, None
        t = torch.tanh(z * (self.scale / self.softcap))
        d1 = (1 - t * t) * (self.scale / self.temperature)
        d2 = -2 * t * (1 - t * t) * (self.scale**2 / (self.softcap * self.temperature))
        return d1, d2

    def difference(self, z: Tensor, u: Tensor) -> Tensor:
        """φ(z + u) − φ(z), accurate when u is tiny against z (no cancellation)."""
        if self.softcap is None:
            return u * (self.scale / self.temperature)
        # tanh(a + b) − tanh(a) = tanh(b)·(1 − tanh²a) / (1 + tanh(a)·tanh(b))
        a = torch.tanh(z * (self.scale / self.softcap))
        b = torch.tanh(u * (self.scale / self.softcap))
        return b * (1 - a * a) / (1 + a * b) * (self.softcap / self.temperature)
