"""CAPO is a real torch.optim.Optimizer: the contract training loops rely on."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss, train_step

from curvopt import CAPO

ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)
REJECT_ALL = dict(rule="theorem", delta_h=0.0, delta_f=-1.0)


def adamw(model, **kw):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("direction", ["exact", "frozen", "shadow"])
def test_rejection_off_equals_the_bare_optimizer_bit_for_bit(direction):
    torch.manual_seed(0)
    a = TinyPolicy()
    b = copy.deepcopy(a)
    bare = adamw(a)
    capo = CAPO(adamw(b), head=b.lm_head, direction=direction, **ACCEPT_ALL)
    sched_a = torch.optim.lr_scheduler.StepLR(bare, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(capo, step_size=2, gamma=0.5)
    for i in range(5):
        batch = make_batch(i)
        train_step(a, bare, batch, select=False)
        keep = train_step(b, capo, batch)
        assert torch.equal(keep, batch["mask"])
        sched_a.step()
        sched_b.step()
    assert_same(params_of(a), params_of(b))
    assert capo.param_groups[0]["lr"] == bare.param_groups[0]["lr"] == 2.5e-3
    assert capo.stats["rejected_frac"] == 0.0


def test_param_groups_state_and_defaults_are_the_inner_optimizers():
    model = TinyPolicy()
    inner = adamw(model)
    opt = CAPO(inner, head=model.lm_head)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults


def test_scheduler_learning_rate_reaches_the_candidate_updates():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, direction="exact")
    batch = make_batch(0)
    h, _ = model(batch["x"])
    args = (h, batch["actions"], batch["advantages"], batch["mask"])
    before = opt.tracker.quadratic_model(*args).policy_shift
    opt.param_groups[0]["lr"] = 0.0
    after = opt.tracker.quadratic_model(*args).policy_shift
    assert before.abs().max() > 0
    assert after.abs().max() == 0


@pytest.mark.parametrize("direction", ["exact", "frozen", "shadow"])
def test_state_dict_resume_is_bit_exact(direction):
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, direction=direction, delta_f=1e-3)
    for i in range(3):
        train_step(model, opt, make_batch(i))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for i in range(3, 6):
        train_step(model, opt, make_batch(i))
    expected, expected_stats = params_of(model), opt.stats

    resumed = TinyPolicy()
    resumed.load_state_dict(saved_model)
    opt2 = CAPO(adamw(resumed), head=resumed.lm_head, direction=direction, delta_f=1e-3)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.state is opt2.optimizer.state
    for i in range(3, 6):
        train_step(resumed, opt2, make_batch(i))
    assert_same(params_of(resumed), expected)
    assert opt2.stats == expected_stats


def test_state_dict_loads_into_the_bare_optimizer():
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    train_step(model, opt, make_batch(0))
    bare = adamw(model)
    bare.load_state_dict(opt.state_dict())
    assert torch.equal(
        bare.state[model.lm_head.weight]["exp_avg"], opt.state[model.lm_head.weight]["exp_avg"]
    )


def test_all_rejected_step_is_skipped_without_decay_or_momentum():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    train_step(model, opt, make_batch(0))  # momentum and step count now non-trivial
    opt.rejector.delta_h, opt.rejector.delta_f = REJECT_ALL["delta_h"], REJECT_ALL["delta_f"]
    opt.rejector.rule = "theorem"
    before = params_of(model)
    state_before = copy.deepcopy(opt.state_dict())
    keep = train_step(model, opt, make_batch(1))
    assert not keep.any()
    assert_same(params_of(model), before)
    after = opt.state_dict()
    for p, s in state_before["state"].items():
        assert all(torch.equal(s[k], after["state"][p][k]) for k in s)
    assert opt.stats["skipped_steps"] == 1 and opt.stats["steps"] == 1
    assert opt.stats["rejected_frac"] == 1.0


def test_gradient_accumulation_adds_up_and_skips_only_when_nothing_was_kept():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    b0, b1 = make_batch(0), make_batch(1)
    empty = torch.zeros_like(b0["mask"])
    for batch, mask in ((b0, empty), (b1, b1["mask"])):
        h, logits = model(batch["x"])
        keep = opt.select(h, batch["actions"], batch["advantages"], mask, logits=logits)
        policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
    assert opt.stats["tokens"] == b1["mask"].sum().item()
    before = params_of(model)
    opt.step()
    assert opt.stats["skipped_steps"] == 0
    assert not all(torch.equal(x, y) for x, y in zip(before, params_of(model), strict=True))
    # a new window starts at the next select
    h, logits = model(b0["x"])
    opt.select(h, b0["actions"], b0["advantages"], b0["mask"], logits=logits)
    assert opt.stats["tokens"] == b0["mask"].sum().item()


def test_empty_mask_is_not_an_error():
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head)
    batch = make_batch(0)
    h, logits = model(batch["x"])
    mask = torch.zeros_like(batch["mask"])
    keep = opt.select(h, batch["actions"], batch["advantages"], mask, logits=logits)
    assert keep.dtype == torch.bool and not keep.any()
    assert opt.stats["rejected_frac"] == 0.0


def test_closure_is_evaluated_and_its_loss_returned():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    batch = make_batch(0)

    def closure():
        opt.zero_grad()
        h, logits = model(batch["x"])
        keep = opt.select(h, batch["actions"], batch["advantages"], batch["mask"])
        loss = policy_loss(logits, batch["actions"], batch["advantages"], keep)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_grad_scaler_on_cpu_matches_the_bare_optimizer():
    torch.manual_seed(0)
    a = TinyPolicy()
    b = copy.deepcopy(a)
    bare, capo = adamw(a), CAPO(adamw(b), head=b.lm_head, **ACCEPT_ALL)
    for model, opt in ((a, bare), (b, capo)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i in range(3):
            batch = make_batch(i)
            h, logits = model(batch["x"])
            keep = batch["mask"]
            if opt is capo:
                keep = opt.select(h, batch["actions"], batch["advantages"], keep, logits=logits)
            scaler.scale(
                policy_loss(logits, batch["actions"], batch["advantages"], keep)
            ).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert_same(params_of(a), params_of(b))


def test_deepcopy_keeps_the_aliasing_and_is_independent():
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    train_step(model, opt, make_batch(0))
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.optimizer.param_groups
    assert clone.state is clone.optimizer.state
    assert clone.tracker.params[0] is clone.param_groups[0]["params"][-2]
    clone.param_groups[0]["lr"] = 0.5
    assert opt.param_groups[0]["lr"] == 1e-2


def test_add_param_group_reaches_the_inner_optimizer():
    model = TinyPolicy()
    extra = torch.nn.Parameter(torch.ones(3))
    opt = CAPO(torch.optim.AdamW(model.lm_head.parameters(), lr=1e-2), head=model.lm_head)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert len(opt.optimizer.param_groups) == 2
    extra.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(extra.detach(), torch.ones(3))


def test_step_hooks_fire():
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train_step(model, opt, make_batch(0))
    assert calls == ["pre", "post"]


def test_realised_policy_shift_is_reported_and_matches_its_quadratic_model():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=1e-4),
        head=model.lm_head,
        track_realised=True,
        **ACCEPT_ALL,
    )
    train_step(model, opt, make_batch(0))
    train_step(model, opt, make_batch(1))
    stats = opt.stats
    assert stats["policy_shift_realised"] > 0
    assert stats["policy_shift_step_model"] == pytest.approx(
        stats["policy_shift_realised"], rel=1e-2
    )


def test_realised_shift_is_the_exact_kl_of_the_head_update():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, **ACCEPT_ALL)
    hidden = torch.randn(6, 8)
    before = [p.detach().clone() for p in model.lm_head.parameters()]
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    kl, _ = opt.tracker.realised_shift(hidden, before)
    old = torch.log_softmax(hidden @ before[0].T + before[1], -1)
    new = torch.log_softmax(model.lm_head(hidden), -1)
    expected = torch.nn.functional.kl_div(new, old, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected.detach())


def test_head_outside_the_optimizer_is_rejected():
    model = TinyPolicy()
    with pytest.raises(ValueError, match="head"):
        CAPO(torch.optim.AdamW(model.body.parameters()), head=model.lm_head)


def test_bfloat16_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, direction="exact")
    train_step(model, opt, make_batch(0))
    batch = make_batch(1)
    with torch.no_grad():
        h, _ = model(batch["x"])
    h16 = h.bfloat16()
    args = (batch["actions"], batch["advantages"], batch["mask"])
    q16 = opt.tracker.quadratic_model(h16, *args)
    q32 = opt.tracker.quadratic_model(h16.float(), *args)
    assert q16.policy_shift.dtype == torch.float32
    torch.testing.assert_close(q16.policy_shift, q32.policy_shift)
    model16 = copy.deepcopy(model).bfloat16()
    opt16 = CAPO(adamw(model16), head=model16.lm_head)
    keep = opt16.select(h16, *args, logits=model16.lm_head(h16))
    assert keep.dtype == torch.bool


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_realised_shift_uses_the_transformed_policy(softcap):
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(adamw(model), head=model.lm_head, temperature=0.7, logit_scale=1.3, softcap=softcap)
    hidden = torch.randn(6, 8)
    before = [p.detach().clone() for p in model.lm_head.parameters()]
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))

    def policy(z):
        z = z * 1.3
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.log_softmax(z / 0.7, -1)

    kl, _ = opt.tracker.realised_shift(hidden, before)
    old = policy(hidden @ before[0].T + before[1])
    new = policy(model.lm_head(hidden))
    expected = torch.nn.functional.kl_div(new, old, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected.detach())


def test_an_accelerate_optimizer_steps_once_per_accumulated_window():
    """Wrapped by accelerate with gradient accumulation, CAPO's window spans the accumulated
    micro-batches and counts one step per real step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    try:
        model = TinyPolicy()
        model, inner = accelerator.prepare(model, adamw(model))
        opt = CAPO(inner, head=model.lm_head, **ACCEPT_ALL)
        assert opt.tracker.optimizer is inner.optimizer
        for i in range(4):
            with accelerator.accumulate(model):
                batch = make_batch(i)
                h, logits = model(batch["x"])
                keep = opt.select(
                    h, batch["actions"], batch["advantages"], batch["mask"], logits=logits
                )
                accelerator.backward(
                    policy_loss(logits, batch["actions"], batch["advantages"], keep)
                )
                opt.step()
                opt.zero_grad()
            if i % 2 == 1:
                both = make_batch(i - 1)["mask"].sum() + batch["mask"].sum()
                assert opt.stats["tokens"] == both.item()
        assert opt.stats["steps"] == 2
        assert int(inner.optimizer.state[model.lm_head.weight]["step"]) == 2
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
