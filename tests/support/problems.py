"""Random small problems (head, optimizer with warm state, batch) shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn


@dataclass
class Problem:
    head: nn.Module
    optimizer: torch.optim.Optimizer
    hidden: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor


def make_optimizer(kind: str, params, options: dict) -> torch.optim.Optimizer:
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, **options)


@st.composite
def optimizer_configs(draw, kinds=("sgd", "adam", "adamw")):
    kind = draw(st.sampled_from(kinds))
    lr = draw(st.sampled_from([1e-3, 3e-2, 0.3]))
    wd = draw(st.sampled_from([0.0, 0.1]))
    maximize = draw(st.booleans())
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        dampening = draw(st.sampled_from([0.0, 0.3])) if momentum else 0.0
        nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
        opts = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=wd,
            maximize=maximize,
        )
    else:
        opts = dict(
            lr=lr,
            betas=draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9)])),
            eps=draw(st.sampled_from([1e-8, 1e-3])),
            weight_decay=wd,
            amsgrad=draw(st.booleans()),
            maximize=maximize,
        )
        if kind == "adam" and wd and draw(st.booleans()):
            opts["decoupled_weight_decay"] = True
    return kind, opts, draw(st.integers(0, 3))


def warm_up(
    head: nn.Module, optimizer: torch.optim.Optimizer, steps: int, gen: torch.Generator
) -> None:
    """Take ``steps`` real steps on a random quadratic loss so the state is non-trivial."""
    in_features = next(p for p in head.parameters()).shape[-1]
    for _ in range(steps):
        x = torch.randn(5, in_features, generator=gen, dtype=torch.float64)
        target = torch.randn(5, head(x).shape[-1], generator=gen, dtype=torch.float64)
        optimizer.zero_grad()
        ((head(x) - target) ** 2).mean().backward()
        optimizer.step()
    optimizer.zero_grad()


@st.composite
def problems(draw, kinds=("sgd", "adam", "adamw"), max_vocab=6):
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, V = draw(st.integers(1, 4)), draw(st.integers(2, max_vocab))
    bias = draw(st.booleans())
    head = nn.Linear(H, V, bias=bias).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    kind, opts, warm = draw(optimizer_configs(kinds))
    optimizer = make_optimizer(kind, head.parameters(), opts)
    warm_up(head, optimizer, warm, gen)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T), generator=gen)
    if draw(st.booleans()):
        advantages = torch.randn(B, generator=gen, dtype=torch.float64)
    else:
        advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.8
    return Problem(head, optimizer, hidden, actions, advantages, mask)
