"""CAPO's predicted trust region (max_policy_shift with shift_estimate="jvp") and whole-model
tracking through the wrapper."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss
from models import TinyLM

from curvopt import CAPO

ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)


def lm_batch(seed: int, B: int = 3, T: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    return (
        x,
        torch.randint(0, 5, (B, T), generator=g),
        torch.randn(B, generator=g, dtype=torch.float64),
    )


def lm_step(model, opt, seed, whole=True):
    x, actions, advantages = lm_batch(seed)
    mask = torch.ones_like(actions, dtype=torch.bool)
    logits = model(x)
    if whole:
        keep = opt.select(None, actions, advantages, mask, forward=lambda m: m(x))
    else:
        keep = opt.select(model.body(x), actions, advantages, mask, logits=logits)
    policy_loss(logits, actions, advantages, keep).backward()
    opt.step()
    opt.zero_grad()
    return keep


@pytest.mark.parametrize("params", ["head", "all"])
def test_a_loose_bound_changes_nothing(params):
    torch.manual_seed(0)
    a = TinyLM().double()
    b = copy.deepcopy(a)
    bare = torch.optim.AdamW(a.parameters(), lr=1e-2)
    kw = {} if params == "head" else dict(params="all", model=b)
    capo = CAPO(
        torch.optim.AdamW(b.parameters(), lr=1e-2),
        head=b.lm_head,
        max_policy_shift=1e300,
        shift_estimate="jvp",
        **kw,
        **ACCEPT_ALL,
    )
    for seed in range(3):
        x, actions, advantages = lm_batch(seed)
        mask = torch.ones_like(actions, dtype=torch.bool)
        policy_loss(a(x), actions, advantages, mask).backward()
        bare.step()
        bare.zero_grad()
        lm_step(b, capo, seed, whole=params == "all")
        assert capo.stats["step_scale"] == 1.0 and capo.stats["step_policy_shift"] > 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("params", ["head", "all"])
def test_the_step_is_scaled_to_the_bound_and_the_realised_kl_follows(params):
    torch.manual_seed(0)
    model = TinyLM().double()
    kw = {} if params == "head" else dict(params="all", model=model)
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=3e-2),
        head=model.lm_head,
        max_policy_shift=1e-5,
        shift_estimate="jvp",
        track_realised=True,
        **kw,
        **ACCEPT_ALL,
    )
    for seed in range(4):
        lm_step(model, opt, seed, whole=params == "all")
        s = opt.stats
        assert 0 < s["step_scale"] < 1
        assert s["step_policy_shift"] * s["step_scale"] ** 2 == pytest.approx(1e-5, rel=1e-9)
        # the realised update's own quadratic model is the prediction of the scaled step (for a
        # linear head exactly; through the network the logits also move at second order)
        rel = 1e-6 if params == "head" else 0.05
        assert s["policy_shift_step_model"] == pytest.approx(1e-5, rel=rel)
        assert s["policy_shift_realised"] == pytest.approx(1e-5, rel=0.05)
    assert opt.param_groups[0]["lr"] == 3e-2  # the scale applies to one step only


@pytest.mark.parametrize("params", ["head", "all"])
def test_no_levels_is_the_step_alone(params):
    """``levels=()`` models no candidate and keeps the mask: the same steps as thresholds that
    accept everything, without the candidates' statistics."""
    torch.manual_seed(0)
    a = TinyLM().double()
    b = copy.deepcopy(a)
    runs = []
    for model, kw in ((a, ACCEPT_ALL), (b, dict(levels=()))):
        extra = {} if params == "head" else dict(params="all", model=model)
        opt = CAPO(
            torch.optim.AdamW(model.parameters(), lr=3e-2),
            head=model.lm_head,
            max_policy_shift=1e-5,
            shift_estimate="jvp",
            **extra,
            **kw,
        )
        for seed in range(3):
            keep = lm_step(model, opt, seed, whole=params == "all")
            assert keep.all()
        runs.append(opt.stats)
    accept_all, alone = runs
    assert "objective_shift_mean" in accept_all and "objective_shift_mean" not in alone
    assert alone["step_scale"] == accept_all["step_scale"] < 1
    assert alone["tokens"] == alone["kept_tokens"] == accept_all["tokens"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_whole_model_selection_matches_the_tracker():
    torch.manual_seed(0)
    model = TinyLM().double()
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        head=model.lm_head,
        params="all",
        model=model,
        direction="exact",
        rule="symmetric",
        delta_h=1.0,
        delta_f=1e300,
    )
    lm_step(model, opt, 0)  # a first real step, so Adam has moments
    opt.rejector.delta_f = 1.2e-3
    x, actions, advantages = lm_batch(1)
    mask = torch.ones_like(actions, dtype=torch.bool)
    keep = opt.select(None, actions, advantages, mask, forward=lambda m: m(x))
    qm = opt.tracker.quadratic_model(None, actions, advantages, mask, forward=lambda m: m(x))
    assert torch.equal(keep, opt.rejector.accept(qm))
    assert 0 < opt.stats["rejected_frac"] < 1


def test_whole_model_tracking_needs_a_forward():
    model = TinyLM().double()
    opt = CAPO(torch.optim.AdamW(model.parameters()), head=model.lm_head, params="all", model=model)
    _, actions, advantages = lm_batch(0)
    with pytest.raises(TypeError, match="forward"):
        opt.select(None, actions, advantages, torch.ones_like(actions, dtype=torch.bool))
    with pytest.raises(TypeError, match="model"):
        CAPO(torch.optim.AdamW(model.parameters()), head=model.lm_head, params="all")


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), "1e-3"])
def test_bad_bounds_are_rejected(bound):
    model = TinyPolicy()
    with pytest.raises(ValueError, match="max_policy_shift"):
        CAPO(torch.optim.AdamW(model.parameters()), head=model.lm_head, max_policy_shift=bound)


def test_head_controller_with_the_tiny_policy_keeps_scheduler_lr():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=0.1),
        head=model.lm_head,
        max_policy_shift=1e-6,
        shift_estimate="jvp",
        **ACCEPT_ALL,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(2):
        batch = make_batch(i)
        h, logits = model(batch["x"])
        keep = opt.select(h, batch["actions"], batch["advantages"], batch["mask"], logits=logits)
        policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        assert opt.stats["step_scale"] < 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


# ---------------------------------------------------------------- rejection before scaling


def make_capo(model, params, **kw):
    extra = {} if params == "head" else dict(params="all", model=model)
    return CAPO(
        torch.optim.AdamW(model.parameters(), lr=3e-2),
        head=model.lm_head,
        max_policy_shift=1e-5,
        shift_estimate="jvp",
        **extra,
        **ACCEPT_ALL,
        **kw,
    )


def select_and_closure(model, opt, seed, params, calls=None):
    """One micro-batch: the selection and a closure whose loss reads the returned mask."""
    x, actions, advantages = lm_batch(seed, B=4, T=5)
    mask = torch.ones_like(actions, dtype=torch.bool)
    if params == "head":
        keep = opt.select(model.body(x), actions, advantages, mask, logits=model(x))
    else:
        keep = opt.select(None, actions, advantages, mask, forward=lambda m: m(x))

    def closure():
        if calls is not None:
            calls.append(keep.clone())
        opt.zero_grad()
        loss = policy_loss(model(x), actions, advantages, keep)
        loss.backward()
        return loss

    return keep, closure, (x, actions, advantages)


@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_step_rejects_its_largest_shift_tokens_then_scales(params, seed):
    """Reference: the token model of the actual update, the largest-KL tokens above the bound
    removed by hand, gradients recomputed without them, then the ordinary scaled step."""
    torch.manual_seed(seed)
    a = TinyLM().double()
    b = copy.deepcopy(a)
    ref = make_capo(a, params)
    opt = make_capo(b, params, step_reject_frac=0.25)
    for step in range(2):
        keep_a, closure_a, (x, actions, advantages) = select_and_closure(
            a, ref, 10 * seed + step, params
        )
        closure_a()
        qm = ref.tracker.step_model(
            actions,
            advantages,
            keep_a,
            hidden=a.body(x).detach() if params == "head" else None,
            forward=lambda m, x=x: m(x),
            fisher="true",
        )
        shift = qm.policy_shift.reshape(-1)
        k = min(int((shift > 1e-5).sum()), int(0.25 * keep_a.sum()))
        assert k > 0  # the bound binds: a rejection to check
        expected = keep_a.clone()
        expected.view(-1)[torch.argsort(shift, descending=True)[:k]] = False
        keep_a.copy_(expected)
        closure_a()
        ref.step()

        calls = []
        keep_b, closure_b, _ = select_and_closure(b, opt, 10 * seed + step, params, calls)
        closure_b()
        calls.clear()
        loss = opt.step(closure_b)
        assert torch.is_tensor(loss)  # the closure's
        assert len(calls) == 1 and torch.equal(calls[0], expected)  # the closure saw the new mask
        assert torch.equal(keep_b, expected)
        s, r = opt.stats, ref.stats
        assert s["step_rejected"] == k
        assert s["kept_tokens"] == keep_b.numel() - k
        assert s["rejected_frac"] == pytest.approx(k / keep_b.numel())
        assert (
            s["step_scale"] == r["step_scale"] and s["step_policy_shift"] == r["step_policy_shift"]
        )
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_step_within_the_bound_rejects_nothing_and_calls_no_extra_closure():
    torch.manual_seed(0)
    a = TinyLM().double()
    b = copy.deepcopy(a)
    bare = torch.optim.AdamW(a.parameters(), lr=3e-2)
    opt = make_capo(b, "head", step_reject_frac=0.5)
    opt.max_policy_shift = 1e300
    x, actions, advantages = lm_batch(0, B=4, T=5)
    policy_loss(a(x), actions, advantages, torch.ones_like(actions)).backward()
    bare.step()
    calls = []
    keep, closure, _ = select_and_closure(b, opt, 0, "head", calls)
    closure()
    assert opt.step(closure) is None  # nothing re-evaluated, no loss to return
    assert len(calls) == 1  # ours: neither the controller nor the inner step calls it again
    assert keep.all() and opt.stats["step_rejected"] == 0 and opt.stats["step_scale"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_step_rejection_needs_a_closure_and_changes_nothing_without_one():
    torch.manual_seed(0)
    model = TinyLM().double()
    opt = make_capo(model, "head", step_reject_frac=0.25)
    keep, closure, _ = select_and_closure(model, opt, 0, "head")
    closure()
    before = [p.detach().clone() for p in model.parameters()]
    stats = opt.stats
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert keep.all() and opt.stats == stats and not opt.state
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    opt.step(closure)  # and the window is still there to step
    assert opt.stats["step_rejected"] > 0


@pytest.mark.parametrize("frac", [-0.1, 1.0, True, "0.1", float("nan")])
def test_bad_rejection_fractions_are_rejected(frac):
    model = TinyPolicy()
    with pytest.raises(ValueError, match="step_reject_frac"):
        CAPO(
            torch.optim.AdamW(model.parameters()),
            head=model.lm_head,
            max_policy_shift=1e-3,
            shift_estimate="jvp",
            step_reject_frac=frac,
        )


def test_rejection_before_scaling_needs_the_bound():
    model = TinyPolicy()
    with pytest.raises(ValueError, match="max_policy_shift"):
        CAPO(torch.optim.AdamW(model.parameters()), head=model.lm_head, step_reject_frac=0.1)
