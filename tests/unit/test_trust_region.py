"""TrustRegion: the step taken keeps the policy's measured KL within the bound, by literal
forwards before and after the step, in float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from models import TinyLM

from curvopt.policy import LogitTransform
from curvopt.trust_region import HeadInput, Measured, TrustRegion

F64 = torch.float64
TRANSFORM = LogitTransform(temperature=0.8)


def setup(seed=0, optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1), B=4, T=5):
    gen = torch.Generator().manual_seed(seed)
    model = TinyLM(D=3, H=6, V=7).double()
    opt = optimizer(model.parameters())
    x = torch.randn(B, T, 3, generator=gen, dtype=F64)
    actions = torch.randint(0, 7, (B, T), generator=gen)
    adv = torch.randn(B, generator=gen, dtype=F64)
    keep = torch.rand(B, T, generator=gen) < 0.8
    return model, opt, x, actions, adv, keep


def backward(model, x, actions, adv, keep):
    logits = model(x)
    logp = torch.log_softmax(TRANSFORM(logits), -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    (-(logp * adv[:, None] * keep).sum() / keep.sum()).backward()
    return logits.detach()


def literal_kl(before, after, keep):
    lp0 = torch.log_softmax(TRANSFORM(before.double()), -1)[keep]
    lp1 = torch.log_softmax(TRANSFORM(after.double()), -1)[keep]
    return float((lp0.exp() * (lp0 - lp1)).sum(-1).mean())


def take_step(opt):
    def take(s):
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] *= s
        try:
            opt.step()
        finally:
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr

    return take


def bare(model, opt, scale):
    """Model and optimizer deep-copied with their gradients, stepped at lr × scale."""
    m2, o2 = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), m2.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    take_step(o2)(scale)
    return m2, o2


def run(model, opt, x, actions, adv, keep, bound, forward=None):
    before = backward(model, x, actions, adv, keep)
    forward = forward or (lambda m: m(x))
    batch = Measured(keep, actions, before, forward)
    region = TrustRegion(bound, model, TRANSFORM)
    return before, region.step(opt, [batch], take_step(opt))


def test_a_step_within_the_bound_is_the_bare_step_bit_for_bit():
    model, opt, x, actions, adv, keep = setup()
    before = backward(model, x, actions, adv, keep)
    want, _ = bare(model, opt, 1.0)
    stats = TrustRegion(10.0, model, TRANSFORM).step(
        opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt)
    )
    assert stats["step_scale"] == 1.0 and stats["trust_region_trials"] == 1
    for p, q in zip(model.parameters(), want.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        realised = literal_kl(before, model(x), keep)
    assert stats["policy_shift_realised"] == pytest.approx(realised, rel=1e-9)
    assert stats["step_policy_shift"] == stats["policy_shift_realised"]


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=3.0, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=3e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bound", [3e-4, 1e-6])
def test_the_step_taken_keeps_the_literal_kl_within_the_bound(name, bound):
    model, opt, x, actions, adv, keep = setup(1, OPTIMIZERS[name])
    before = backward(model, x, actions, adv, keep)
    with torch.no_grad():
        unscaled = literal_kl(before, bare(model, opt, 1.0)[0](x), keep)
    assert unscaled > 10 * bound  # the bound is active
    stats = TrustRegion(bound, model, TRANSFORM).step(
        opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt)
    )
    with torch.no_grad():
        realised = literal_kl(before, model(x), keep)
    assert 0.5 * bound <= realised <= 1.1 * bound
    assert stats["policy_shift_realised"] == pytest.approx(realised, rel=1e-6)
    assert stats["step_policy_shift"] == pytest.approx(unscaled, rel=1e-6)
    assert 0 < stats["step_scale"] < 1


def test_a_planned_step_is_the_bare_optimizer_at_the_scaled_learning_rate():
    model, opt, x, actions, adv, keep = setup(2)
    before = backward(model, x, actions, adv, keep)
    reference = copy.deepcopy((model, opt))
    stats = TrustRegion(1e-4, model, TRANSFORM).step(
        opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt)
    )
    m2, o2 = reference
    for p, q in zip(model.parameters(), m2.parameters()):
        q.grad = p.grad.clone()
    take_step(o2)(stats["step_scale"])
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_micro_batches_are_measured_together():
    model, opt, x, actions, adv, keep = setup(3, B=6)
    parts = [slice(0, 2), slice(2, 6)]
    batches = []
    logits = []
    for sl in parts:
        out = model(x[sl])
        logp = torch.log_softmax(TRANSFORM(out), -1).gather(-1, actions[sl].unsqueeze(-1))
        (-(logp.squeeze(-1) * adv[sl, None] * keep[sl]).sum() / keep.sum()).backward()
        logits.append(out.detach())
        batches.append(Measured(keep[sl], actions[sl], out.detach(), lambda m, sl=sl: m(x[sl])))
    stats = TrustRegion(1e-4, model, TRANSFORM).step(opt, batches, take_step(opt))
    with torch.no_grad():
        realised = literal_kl(torch.cat(logits), model(x), keep)
    assert stats["policy_shift_realised"] == pytest.approx(realised, rel=1e-6)
    assert 0.5e-4 <= realised <= 1.1e-4


def test_the_head_input_route_measures_the_same_kl():
    model, opt, x, actions, adv, keep = setup(4)
    twin = copy.deepcopy((model, opt))
    backward(model, x, actions, adv, keep)
    h0 = model.body(x).detach()
    head = model.lm_head
    batch = Measured(
        keep, actions, HeadInput(h0, head.weight, head.bias),
        lambda m: HeadInput(m.body(x), m.lm_head.weight, m.lm_head.bias),
    )  # fmt: skip
    stats = TrustRegion(1e-4, model, TRANSFORM).step(opt, [batch], take_step(opt))
    m2, o2 = twin
    logits2 = backward(m2, x, actions, adv, keep)
    stats2 = TrustRegion(1e-4, m2, TRANSFORM).step(
        o2, [Measured(keep, actions, logits2, lambda m: m(x))], take_step(o2)
    )
    for key in ("step_scale", "step_policy_shift", "policy_shift_realised"):
        assert stats[key] == pytest.approx(stats2[key], rel=1e-10)


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], str(opt.state_dict())


def assert_unchanged(model, opt, snap):
    for p, p0 in zip(model.parameters(), snap[0]):
        assert torch.equal(p, p0)
    assert str(opt.state_dict()) == snap[1]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_non_finite_gradients_mean_no_step(name, bad):
    model, opt, x, actions, adv, keep = setup(5, OPTIMIZERS[name])
    before = backward(model, x, actions, adv, keep)
    model.lm_head.weight.grad[0, 0] = bad
    snap = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        stats = TrustRegion(1e-4, model, TRANSFORM).step(
            opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt)
        )
    assert stats["skipped"] == 1.0 and stats["step_scale"] == 0.0
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_a_non_finite_kl_at_a_trial_point_means_no_step(name):
    model, opt, x, actions, adv, keep = setup(6, OPTIMIZERS[name])
    before = backward(model, x, actions, adv, keep)
    snap = snapshot(model, opt)

    def forward(m):
        out = m(x).clone()
        out[0, 0, 0] = float("nan")
        return out

    keep[0, 0] = True
    with pytest.warns(RuntimeWarning, match="not finite"):
        stats = TrustRegion(1e-4, model, TRANSFORM).step(
            opt, [Measured(keep, actions, before, forward)], take_step(opt)
        )
    assert stats["skipped"] == 1.0
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_a_forward_of_the_wrong_shape_raises_naming_it_and_changes_nothing(name):
    model, opt, x, actions, adv, keep = setup(7, OPTIMIZERS[name])
    before = backward(model, x, actions, adv, keep)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="forward"):
        TrustRegion(1e-4, model, TRANSFORM).step(
            opt, [Measured(keep, actions, before, lambda m: m(x)[:, 1:])], take_step(opt)
        )
    assert_unchanged(model, opt, snap)
    with pytest.raises(TypeError, match="forward"):
        TrustRegion(1e-4, model, TRANSFORM).step(
            opt, [Measured(keep, actions, before, lambda m: (m(x),))], take_step(opt)
        )
    assert_unchanged(model, opt, snap)


def test_trial_forwards_run_under_the_training_forward_autocast():
    model, opt, x, actions, adv, keep = setup(8)
    seen = []

    def forward(m):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return m(x)

    before = backward(model, x, actions, adv, keep)
    batch = Measured(keep, actions, before, forward, autocast=(("cpu", torch.bfloat16),))
    TrustRegion(10.0, model, TRANSFORM).step(opt, [batch], take_step(opt))
    assert seen == [torch.bfloat16]
    assert not torch.is_autocast_enabled("cpu")


def test_dropout_in_training_mode_is_warned_about_once():
    model, opt, x, actions, adv, keep = setup(9)
    model.body.insert(1, torch.nn.Dropout(0.1))
    model.eval()
    region = TrustRegion(10.0, model, TRANSFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = backward(model, x, actions, adv, keep)
        region.step(opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt))
    model.train()
    opt.zero_grad()
    before = backward(model, x, actions, adv, keep)
    with pytest.warns(RuntimeWarning, match="dropout"):
        region.step(opt, [Measured(keep, actions, before, lambda m: m(x))], take_step(opt))
