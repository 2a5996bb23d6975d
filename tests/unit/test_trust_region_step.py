"""Step transactions: trial points θ0 + sΔθ, the step taken at a scale, and abandoning it."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import make_optimizer, optimizer_configs, warm_up
from torch import nn

from curvopt.optimizers import AffineStep
from curvopt.trust_region.step import (
    ALIGNMENT,
    PlannedStep,
    TakenStep,
    begin,
    can_plan,
    trial_buffers,
)

F64 = torch.float64


def model_and_grads(seed: int, optimizer_factory, warm: int = 2):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    opt = optimizer_factory(model.parameters())
    warm_up(model, opt, warm, gen)
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    (model(x) ** 2).mean().backward()
    return model, opt


def scaled_step(opt, scale):
    def take(s):
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] *= s
        opt.step()
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr

    return take


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def states_equal(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            x, y = sa[k][name], sb[k][name]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), name
            else:
                assert x == y, name


def reference(model, opt, scale, start=None):
    """A deep copy of model and optimizer (the parameters set to ``start`` if given), stepped at
    lr × scale."""
    model2, opt2 = copy.deepcopy((model, opt))
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(model.parameters(), model2.parameters())):
            q.grad = None if p.grad is None else p.grad.clone()
            if start is not None:
                q.copy_(start[i])
    scaled_step(opt2, scale)(scale)
    return model2, opt2


@given(config=optimizer_configs(), seed=st.integers(0, 1000), scale=st.floats(0.05, 1.0))
def test_planned_trial_points_and_commit_are_the_optimizer_at_lr_times_s(config, seed, scale):
    kind, opts, warm = config
    model, opt = model_and_grads(seed, lambda ps: make_optimizer(kind, ps, opts), warm)
    assert can_plan(opt)
    before = params_of(model)
    full, _ = reference(model, opt, 1.0)
    txn = PlannedStep(opt, scaled_step(opt, scale))
    txn.move(scale)
    for p, p0, p1 in zip(model.parameters(), before, full.parameters()):
        want = p0 + scale * (p1.detach() - p0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    txn.move(1.0)
    for p, p1 in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(p.detach(), p1.detach(), rtol=1e-12, atol=1e-14)
    want_model, want_opt = reference(model, opt, scale, start=before)
    txn.commit(scale)
    for p, w in zip(model.parameters(), want_model.parameters()):
        assert torch.equal(p, w)
    states_equal(opt, want_opt)


@given(config=optimizer_configs(), seed=st.integers(0, 1000))
def test_an_abandoned_planned_step_changes_nothing(config, seed):
    kind, opts, warm = config
    model, opt = model_and_grads(seed, lambda ps: make_optimizer(kind, ps, opts), warm)
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    txn = PlannedStep(opt, scaled_step(opt, 1.0))
    txn.move(0.3)
    txn.move(1.0)
    txn.abort()
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    assert str(opt.state_dict()) == str(state)


OTHERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_taken_steps_of_linear_optimizers_are_their_step_at_lr_times_s(name, scale):
    model, opt = model_and_grads(0, OTHERS[name], warm=3)
    assert not can_plan(opt)
    want_model, want_opt = reference(model, opt, scale)
    txn = begin(opt, scaled_step(opt, 1.0))
    assert isinstance(txn, TakenStep)
    txn.move(0.5)
    txn.commit(scale)
    for p, w in zip(model.parameters(), want_model.parameters()):
        if scale == 1.0:
            torch.testing.assert_close(p, w, rtol=1e-13, atol=1e-15)
        else:
            torch.testing.assert_close(p, w, rtol=1e-11, atol=1e-13)
    # their state does not depend on the learning rate: the full step's is the scaled step's
    states_equal(opt, want_opt)


def test_a_taken_step_at_scale_one_is_the_bare_step_bit_for_bit():
    model, opt = model_and_grads(1, OTHERS["rmsprop"], warm=2)
    want_model, want_opt = reference(model, opt, 1.0)
    txn = TakenStep(opt, scaled_step(opt, 1.0))
    txn.commit(1.0)
    for p, w in zip(model.parameters(), want_model.parameters()):
        assert torch.equal(p, w)
    states_equal(opt, want_opt)


@pytest.mark.parametrize("name", ["rmsprop", "rprop", "asgd", "fresh"])
def test_an_abandoned_taken_step_restores_parameters_and_state_exactly(name):
    factories = dict(OTHERS)
    factories["rprop"] = lambda ps: torch.optim.Rprop(ps, lr=1e-2)
    factories["asgd"] = lambda ps: torch.optim.ASGD(ps, lr=1e-2)
    factories["fresh"] = lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5)
    model, opt = model_and_grads(2, factories[name], warm=0 if name == "fresh" else 2)
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    txn = TakenStep(opt, scaled_step(opt, 1.0))
    txn.move(0.2)
    txn.abort()
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    assert str(opt.state_dict()) == str(state)


def test_a_nonlinear_optimizer_is_shrunk_towards_the_start():
    model, opt = model_and_grads(3, lambda ps: torch.optim.Rprop(ps, lr=1e-2), warm=2)
    before = params_of(model)
    full, _ = reference(model, opt, 1.0)
    txn = begin(opt, scaled_step(opt, 1.0))
    txn.commit(0.25)
    for p, p0, p1 in zip(model.parameters(), before, full.parameters()):
        want = p0 + 0.25 * (p1.detach() - p0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_original_gives_the_start_of_optimizer_parameters_only():
    model, opt = model_and_grads(4, lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = params_of(model)
    other = torch.zeros(3)
    txn = begin(opt, scaled_step(opt, 1.0))
    txn.move(1.0)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(txn.original(p), p0)
    assert txn.original(other) is other


def test_parameters_without_gradient_do_not_move():
    model, opt = model_and_grads(5, lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5))
    model[0].weight.grad = None
    w0 = model[0].weight.detach().clone()
    txn = begin(opt, scaled_step(opt, 1.0))
    txn.move(0.5)
    assert torch.equal(model[0].weight, w0)
    txn.commit(0.5)
    assert torch.equal(model[0].weight, w0)


def test_bf16_parameters_move_in_float32():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (model(torch.randn(5, 4).bfloat16()).float() ** 2).mean().backward()
    w0 = model.weight.detach().float().clone()
    want, _ = reference(model, opt, 1.0)
    txn = begin(opt, scaled_step(opt, 1.0))
    txn.move(0.5)
    expected = w0 + 0.5 * (want.weight.float() - w0)
    torch.testing.assert_close(model.weight.float(), expected.bfloat16().float(), atol=2e-2, rtol=0)
    txn.commit(1.0)
    assert torch.equal(model.weight, want.weight)


@given(
    config=optimizer_configs(),
    seed=st.integers(0, 1000),
    scales=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5),
)
def test_planned_trial_points_in_any_order_are_theta0_plus_s_delta(config, seed, scales):
    # each trial point is formed from the last one (one buffer per parameter): within a few
    # roundings of θ0 + sΔθ whatever the order of the scales, and θ0 itself untouched
    kind, opts, warm = config
    model, opt = model_and_grads(seed, lambda ps: make_optimizer(kind, ps, opts), warm)
    before = params_of(model)
    full, _ = reference(model, opt, 1.0)
    txn = PlannedStep(opt, scaled_step(opt, 1.0))
    for s in [1.0, *scales]:
        txn.move(s)
        for p, p0, p1 in zip(model.parameters(), before, full.parameters()):
            step = p1.detach() - p0
            want = p0 + s * step
            slack = 1e-13 * (p0.abs() + step.abs()).max() / min([*scales, 1.0])
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=float(slack))
    txn.abort()
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)


def test_planned_trials_never_write_or_copy_theta0():
    # the parameters are pointed at buffers holding the trial points and back: the tensors that
    # held θ0 are never written, and after the step is abandoned or taken each parameter holds
    # its own storage again (the optimizer's step then writes it in place, as without curvopt)
    model, opt = model_and_grads(6, lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1))
    storage = [p.data_ptr() for p in model.parameters()]
    aliases = [p.detach() for p in model.parameters()]
    before = params_of(model)
    txn = PlannedStep(opt, scaled_step(opt, 0.5))
    txn.move(1.0)
    txn.move(0.5)
    for p, alias, p0, ptr in zip(model.parameters(), aliases, before, storage):
        assert p.data_ptr() != ptr
        assert torch.equal(alias, p0)
    txn.move(0.0)  # θ0 itself
    for p, p0, ptr in zip(model.parameters(), before, storage):
        assert p.data_ptr() == ptr and torch.equal(p, p0)
    txn.move(0.25)
    want, _ = reference(model, opt, 0.5, start=before)
    txn.commit(0.5)
    for p, w, ptr in zip(model.parameters(), want.parameters(), storage):
        assert p.data_ptr() == ptr
        assert torch.equal(p, w)


def test_trial_buffers_on_the_cpu_share_one_aligned_allocation_per_dtype():
    # one allocation per dtype, each buffer contiguous, of its parameter's shape and dtype,
    # starting on an ALIGNMENT-byte boundary, and no two overlapping
    params = [
        torch.zeros(3, 5), torch.zeros(7, dtype=F64), torch.zeros(2, 2, 2),
        torch.zeros(()), torch.zeros(0, 4), torch.zeros(3, 4, dtype=F64).t(),
    ]  # fmt: skip
    out = trial_buffers(params)
    assert set(out) == {id(p) for p in params}
    spans = {}
    for p in params:
        b = out[id(p)]
        assert b.shape == p.shape and b.dtype == p.dtype and b.is_contiguous()
        assert b.data_ptr() % ALIGNMENT == 0 or b.numel() == 0
        base = b.untyped_storage().data_ptr()
        assert spans.setdefault(p.dtype, base) == base  # one storage per dtype
    f32 = sorted((out[id(p)].data_ptr(), out[id(p)].numel() * 4) for p in params[:5:2])
    for (a, n), (b, _) in itertools.pairwise(f32):
        assert a + n <= b
    with torch.device("meta"):  # a default device elsewhere: the buffers stay on the CPU
        assert trial_buffers(params[:1])[id(params[0])].device.type == "cpu"
    elsewhere = torch.zeros(2, 3, device="meta")  # off the CPU: a buffer of its own
    assert trial_buffers([elsewhere])[id(elsewhere)].device.type == "meta"


def test_a_planned_step_whose_update_rule_returns_the_gradient_does_not_write_it(monkeypatch):
    # a rule may hand back a tensor that aliases the gradient (an SGD step at lr = -1 is −(−g));
    # the trial point must then be formed in a buffer of its own
    model, opt = model_and_grads(7, lambda ps: torch.optim.SGD(ps, lr=0.1))
    grads = [p.grad.clone() for p in model.parameters()]
    monkeypatch.setattr(AffineStep, "full", lambda self, q: q)
    txn = PlannedStep(opt, scaled_step(opt, 1.0))
    txn.move(1.0)
    for p, p0, g in zip(model.parameters(), txn._start, grads):
        torch.testing.assert_close(p.detach(), p0 + g)  # the patched rule's Δ is the gradient
    txn.abort()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
