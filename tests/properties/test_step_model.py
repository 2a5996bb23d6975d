"""The real step's per-token quadratic model (``CurvatureTracker.step_model``) against derivatives
of the exact policy along the step, for every kind of tracked set and logit transform.

Along the update Δ the optimizer is about to take (read off a deep copy of it, stepped), with
``ℓ(s) = log π(· | θ + sΔ)``: the model's first order is ``A·ℓ_a'(0)``, its second order
``½A·(ℓ_a'' + ℓ_a'²)(0)`` (that is ``½A·π_a''/π_a``), and its policy shift (true Fisher) is
``½·KL''(0) = −½ Σ_j π_j ℓ_j''(0)`` — each the exact Taylor coefficient, from nested ``jvp``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import TinyLM
from torch import nn
from torch.func import functional_call, jvp

from curvopt import CurvatureTracker
from curvopt.policy import LogitTransform

F64 = torch.float64


class DeepHeadLM(TinyLM):
    """TinyLM whose head is not linear: the tracker's exact torch.func head path."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))


def oracle(model, x, actions, advantages, before, after, transform):
    """(first_order, second_order, policy_shift) ``[B, T]`` from derivatives along θ + sΔ."""
    names = [n for n, _ in model.named_parameters()]
    delta = [a - b for a, b in zip(after, before)]

    def logp(s):
        params = {n: p + s * d for n, p, d in zip(names, before, delta)}
        return torch.log_softmax(transform(functional_call(model, params, (x,))), -1)

    one = torch.ones((), dtype=F64)

    def first(s):
        return jvp(logp, (s,), (one,))

    (lp, lp1), (_, lp2) = jvp(first, (torch.zeros((), dtype=F64),), (one,))
    a = actions.unsqueeze(-1)
    d1, d2 = lp1.gather(-1, a).squeeze(-1), lp2.gather(-1, a).squeeze(-1)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    return adv * d1, 0.5 * adv * (d2 + d1.square()), -0.5 * (lp.exp() * lp2).sum(-1)


@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["head", "deep-head", "all"]),
    transform=st.sampled_from(
        [dict(), dict(temperature=0.7), dict(temperature=0.7, softcap=3.0, logit_scale=1.3)]
    ),
    optimizer=st.sampled_from(["sgd", "adamw"]),
)
def test_step_model_is_the_taylor_model_along_the_real_step(seed, kind, transform, optimizer):
    torch.manual_seed(seed)
    model = (DeepHeadLM() if kind == "deep-head" else TinyLM()).double()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 3, generator=g, dtype=F64)
    actions = torch.randint(0, 5, (3, 4), generator=g)
    advantages = torch.randn(3, generator=g, dtype=F64)
    mask = torch.rand(3, 4, generator=g) < 0.8
    for _ in range(2):  # momentum / Adam state, then the gradient of the step to model
        opt.zero_grad()
        (model(x).square().mean() - model(x)[..., 0].mean()).backward()
        opt.step()
    opt.zero_grad()
    model(x).sin().sum().backward()
    tracked = model if kind == "all" else model.lm_head
    extra = dict(params="all", model=model) if kind == "all" else {}
    tracker = CurvatureTracker(model.lm_head, opt, direction="exact", **transform, **extra)
    with torch.no_grad():
        hidden = model.body(x)
    kw = dict(forward=lambda m: m(x), curvature=True) if kind == "all" else dict(hidden=hidden)
    true = tracker.step_model(actions, advantages, mask, fisher="true", **kw)

    before = [p.detach().clone() for p in model.parameters()]
    stepped, inner = copy.deepcopy((model, opt))  # the real optimizer, on copies
    for p, q in zip(model.parameters(), stepped.parameters()):
        q.grad = p.grad.clone()
    tracked_ids = {id(p) for p in tracked.parameters()}
    inner.step()
    after = [
        q.detach() if id(p) in tracked_ids else p.detach()
        for p, q in zip(model.parameters(), stepped.parameters())
    ]
    t = LogitTransform(
        transform.get("logit_scale", 1.0),
        transform.get("softcap"),
        transform.get("temperature", 1.0),
    )
    first, second, shift = oracle(model, x, actions, advantages, before, after, t)
    tol = dict(rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(true.first_order, first * mask, **tol)
    torch.testing.assert_close(true.second_order, second * mask, **tol)
    torch.testing.assert_close(true.policy_shift, shift * mask, **tol)


@pytest.mark.parametrize("compile_", ["0", "1"])
def test_step_model_is_the_same_fused_or_eager(compile_, monkeypatch):
    """The chunked moments run through torch.compile when fused; both give the same model."""
    torch.manual_seed(0)
    model = TinyLM().double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.randn(3, 4, 3, dtype=F64)
    model(x).sin().sum().backward()
    tracker = CurvatureTracker(model.lm_head, opt, params="all", model=model, softcap=3.0)
    args = (torch.randint(0, 5, (3, 4)), torch.randn(3, dtype=F64), torch.ones(3, 4, dtype=bool))
    monkeypatch.setenv("CURVOPT_COMPILE", "0")
    eager = tracker.step_model(*args, forward=lambda m: m(x), curvature=True)
    monkeypatch.setenv("CURVOPT_COMPILE", compile_)
    other = tracker.step_model(*args, forward=lambda m: m(x), curvature=True)
    for key in ("first_order", "second_order", "policy_shift"):
        torch.testing.assert_close(getattr(other, key), getattr(eager, key), rtol=1e-10, atol=1e-14)
