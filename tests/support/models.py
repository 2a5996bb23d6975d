"""Small stand-ins for causal LMs shared by the tests."""

from __future__ import annotations

from torch import nn


class TinyLM(nn.Module):
    """inputs [B, T, D] → two tanh layers → a linear head: a stand-in for a causal LM."""

    def __init__(self, D: int = 3, H: int = 4, V: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())
        self.lm_head = nn.Linear(H, V)

    def forward(self, x):
        return self.lm_head(self.body(x))
