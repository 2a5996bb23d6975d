"""Whole-model tracking: exact candidates over any parameter set, and the real step's model."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import TinyLM
from oracle import oracle_model
from problems import make_optimizer, optimizer_configs

from curvopt import CurvatureTracker
from curvopt.heads.whole import step_logit_change
from curvopt.optimizers import planned_update

F64 = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)
LEVELS = st.sampled_from(["token", "sequence", "batch"])


def warm(model, optimizer, steps, gen):
    for _ in range(steps):
        x = torch.randn(4, 3, generator=gen, dtype=F64)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()


@st.composite
def setups(draw, kinds=("sgd", "adam", "adamw")):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = TinyLM().double()
    kind, opts, n_warm = draw(optimizer_configs(kinds))
    optimizer = make_optimizer(kind, model.parameters(), opts)
    warm(model, optimizer, n_warm, gen)
    x = torch.randn(B, T, 3, generator=gen, dtype=F64)
    actions = torch.randint(0, 5, (B, T), generator=gen)
    advantages = torch.randn(B, T, generator=gen, dtype=F64)
    mask = torch.rand(B, T, generator=gen) < 0.8
    return model, optimizer, x, actions, advantages, mask


def rows_of(qm, cands):
    out = []
    for c in cands:
        b, t = c["tokens"][0]
        idx = {"token": (b, t), "sequence": (b,), "batch": ()}[qm.level]
        out.append(torch.stack([qm.first_order[idx], qm.second_order[idx], qm.policy_shift[idx]]))
    return torch.stack(out) if out else torch.zeros(0, 3, dtype=F64)


@given(
    setup=setups(),
    level=LEVELS,
    fisher=st.sampled_from(["empirical", "true"]),
    subset=st.booleans(),
)
def test_whole_model_candidates_match_the_oracle(setup, level, fisher, subset):
    model, optimizer, x, actions, advantages, mask = setup
    params = [model.body[2], model.lm_head] if subset else "all"
    tracker = CurvatureTracker(
        model.lm_head, optimizer, params=params, model=model, fisher=fisher, direction="exact"
    )
    qm = tracker.quadratic_model(
        None, actions, advantages, mask, level=level, forward=lambda m: m(x)
    )
    tracked = tracker.names
    cands = oracle_model(
        model, optimizer, lambda m: m(x), actions, advantages, mask, level=level, tracked=tracked
    )
    key = "policy_empirical" if fisher == "empirical" else "policy_true"
    want = (
        torch.stack([torch.stack([c["first_order"], c["second_order"], c[key]]) for c in cands])
        if cands
        else torch.zeros(0, 3, dtype=F64)
    )
    torch.testing.assert_close(rows_of(qm, cands), want, **TOL)


@given(setup=setups(), level=LEVELS)
def test_tracking_only_the_head_reproduces_the_closed_forms(setup, level):
    model, optimizer, x, actions, advantages, mask = setup
    whole = CurvatureTracker(
        model.lm_head, optimizer, params=[model.lm_head], model=model, direction="exact"
    )
    head = CurvatureTracker(model.lm_head, optimizer, direction="exact")
    a = whole.quadratic_model(None, actions, advantages, mask, level=level, forward=lambda m: m(x))
    with torch.no_grad():
        hidden = model.body(x)
    b = head.quadratic_model(hidden, actions, advantages, mask, level=level)
    for key in ("first_order", "second_order", "policy_shift"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)


@given(setup=setups())
def test_planned_update_is_the_step_the_optimizer_takes(setup):
    model, optimizer, x, actions, advantages, mask = setup
    loss = -(
        torch.log_softmax(model(x), -1).gather(-1, actions[..., None]).squeeze(-1)
        * advantages
        * mask
    ).sum()
    loss.backward()
    tracker = CurvatureTracker(
        model.lm_head, optimizer, params="all", model=model, direction="exact"
    )
    planned = planned_update(tracker._steps(F64, frozen=False), tracker.params, optimizer)
    model_c, opt_c = copy.deepcopy((model, optimizer))
    for p_c, p in zip(model_c.parameters(), model.parameters(), strict=True):
        p_c.grad = p.grad.clone()  # a deep copy of a Parameter leaves its .grad behind
    before = [p.detach().clone() for p in model_c.parameters()]
    opt_c.step()
    for d, p, b in zip(planned, model_c.parameters(), before, strict=True):
        torch.testing.assert_close(d, p.detach() - b, rtol=1e-10, atol=1e-14)


def test_jvp_logit_change_matches_finite_differences():
    torch.manual_seed(0)
    model = TinyLM().double()
    x = torch.randn(2, 3, 3, dtype=F64)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    deltas = [torch.randn_like(p) for p in params]
    z, u, r = step_logit_change(model, names, params, deltas, lambda m: m(x), curvature=True)

    def shifted(scale):
        with torch.no_grad():
            m = copy.deepcopy(model)
            for p, d in zip(m.parameters(), deltas):
                p.add_(scale * d)
            return m(x)

    torch.testing.assert_close(z, model(x).detach())
    eps = 1e-6  # central differences: truncation ~eps², rounding ~1e-16/eps
    torch.testing.assert_close(u, (shifted(eps) - shifted(-eps)) / (2 * eps), rtol=1e-7, atol=1e-9)
    eps = 1e-4
    fd2 = (shifted(eps) - 2 * z + shifted(-eps)) / eps**2
    torch.testing.assert_close(r, fd2, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("curvature", [False, True])
def test_step_model_predicts_the_realised_change_to_third_order(curvature):
    """The real step's per-token KL and surrogate change, predicted before stepping, against the
    realised ones: halving the learning rate divides the errors by ~8. The surrogate's own Taylor
    model is m_H without the REINFORCE term ½A(v·u)² (which estimates ∇²J, not ∇² of the
    surrogate), and needs the network's curvature v·r: without it the error is second order."""
    torch.manual_seed(1)
    model = TinyLM().double()
    x = torch.randn(3, 4, 3, dtype=F64)
    actions = torch.randint(0, 5, (3, 4))
    advantages = torch.randn(3, 4, dtype=F64)
    mask = torch.ones(3, 4, dtype=torch.bool)

    def surrogate(m):
        lp = torch.log_softmax(m(x), -1).gather(-1, actions[..., None]).squeeze(-1)
        return (lp * advantages * mask).sum()

    errors = []
    for lr in (2e-2, 1e-2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        (-surrogate(m)).backward()
        tracker = CurvatureTracker(m.lm_head, opt, params="all", model=m)
        kw = dict(forward=lambda mm: mm(x), curvature=curvature)
        true = tracker.step_model(actions, advantages, mask, fisher="true", **kw)
        score = tracker.step_model(actions, advantages, mask, fisher="empirical", **kw)
        predicted = (true.objective_shift - advantages * score.policy_shift).sum()
        with torch.no_grad():
            lp0 = torch.log_softmax(m(x), -1)
            f0 = surrogate(m)
            opt.step()
            lp1 = torch.log_softmax(m(x), -1)
            kl = (lp0.exp() * (lp0 - lp1)).sum(-1)
            df = surrogate(m) - f0
        errors.append((float((true.policy_shift - kl).abs().max()), float((df - predicted).abs())))
    (k1, h1), (k2, h2) = errors
    assert 6 < k1 / k2 < 10
    if curvature:
        assert 6 < h1 / h2 < 10
    else:
        assert 3 < h1 / h2 < 5


@pytest.mark.parametrize("level", ["token", "batch"])
def test_whole_model_candidates_of_a_transformers_model(level):
    """A 1-layer Qwen2 (eager attention). Its RMSNorm and rotary embedding compute in float32
    even in a float64 model, which bounds the agreement with the oracle."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=12,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 12, (2, 6))
    model(ids).logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    prompt = 3
    actions = ids[:, prompt:]
    advantages = torch.tensor([1.0, -0.5], dtype=F64)
    mask = torch.ones_like(actions, dtype=torch.bool)

    def forward(m):
        return m(ids).logits[:, prompt - 1 : -1]

    tracker = CurvatureTracker(
        model.lm_head, optimizer, params="all", model=model, direction="exact"
    )
    qm = tracker.quadratic_model(None, actions, advantages, mask, level=level, forward=forward)
    cands = oracle_model(model, optimizer, forward, actions, advantages, mask, level=level)
    want = torch.stack(
        [torch.stack([c["first_order"], c["second_order"], c["policy_empirical"]]) for c in cands]
    )
    torch.testing.assert_close(rows_of(qm, cands), want, rtol=1e-5, atol=1e-9)
