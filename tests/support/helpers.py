"""A tiny policy (backbone + linear head) and one GRPO-style step, for the wrapper tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyPolicy(nn.Module):
    def __init__(self, hidden: int = 8, vocab: int = 11, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return h, self.lm_head(h)


def make_batch(seed: int, B: int = 4, T: int = 5, H: int = 8, V: int = 11) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, T, H, generator=g),
        "actions": torch.randint(0, V, (B, T), generator=g),
        "advantages": torch.randn(B, generator=g),
        "mask": torch.rand(B, T, generator=g) < 0.8,
    }


def policy_loss(logits: Tensor, actions: Tensor, advantages: Tensor, keep: Tensor) -> Tensor:
    """Token-mean REINFORCE loss over the kept tokens."""
    logp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return -(logp * advantages[:, None] * keep).sum() / keep.sum().clamp(min=1)


def train_step(model: TinyPolicy, opt, batch: dict, select: bool = True) -> Tensor:
    h, logits = model(batch["x"])
    keep = batch["mask"]
    if select:
        keep = opt.select(h, batch["actions"], batch["advantages"], batch["mask"], logits=logits)
    policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
    opt.step()
    opt.zero_grad()
    return keep
