"""Inputs at the edges, one behaviour per test: empty micro-batches, hidden states or logits that do
not fit the head (padded heads), small integer actions, autocast, huge advantages."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss, train_step
from torch import nn

from curvopt import CAPO, CurvatureTracker
from curvopt.policy import LogitTransform
from curvopt.trust_region import HeadInput, policy_kl

ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)
LEVELS = [("token",), ("sequence",), ("batch",), ("token", "sequence", "batch")]

# every form of CAPO: the head's models (linear and torch.func heads, top-K, directions), the
# whole model's, the trust region (measured, from the head's states or a forward) and the jvp one
FORMS = {
    "linear-frozen": lambda m: CAPO(adamw(m), m.lm_head, levels=LEVELS[3]),
    "linear-exact-topk": lambda m: CAPO(
        adamw(m), m.lm_head, levels=LEVELS[3], direction="exact", top_k=3
    ),
    "linear-shadow": lambda m: CAPO(adamw(m), m.lm_head, levels=LEVELS[3], direction="shadow"),
    "functional": lambda m: CAPO(adamw(m), nn.Sequential(m.lm_head), levels=LEVELS[3]),
    "whole-model": lambda m: CAPO(
        adamw(m), m.lm_head, levels=("token", "sequence"), params="all", model=m
    ),
    "trust-region": lambda m: CAPO(adamw(m), model=m, max_policy_shift=1e-3),
    "trust-region-head": lambda m: CAPO(adamw(m), m.lm_head, levels=(), max_policy_shift=1e-3),
    "jvp": lambda m: CAPO(
        adamw(m), m.lm_head, levels=(), max_policy_shift=1e-3, shift_estimate="jvp"
    ),
    "track-realised": lambda m: CAPO(adamw(m), m.lm_head, track_realised=True, **ACCEPT_ALL),
}


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def select(opt, model, batch, rows=slice(None), cols=slice(None), **overrides):
    """select on the batch restricted to ``rows``/``cols``, with arguments replaced."""
    x = batch["x"][rows, cols]
    h, logits = model(x)
    args = dict(
        hidden=h.detach(),
        actions=batch["actions"][rows, cols],
        advantages=batch["advantages"][rows],
        mask=batch["mask"][rows, cols],
        logits=logits.detach(),
        # the policy's forward where CAPO holds the model (else the head on the hidden states)
        forward=(lambda m: m(x)[1]) if opt.model is model else None,
    )
    args.update(overrides)
    return opt.select(**args), logits


def state_of(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_state(model, opt, state):
    params, saved = state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()
    for k, s in saved["state"].items():
        assert all(torch.equal(v, now["state"][k][n]) for n, v in s.items())


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("empty", ["B=0", "T=0"])
def test_an_empty_micro_batch_is_a_no_op_on_every_path(form, empty):
    """It keeps nothing, counts nothing, and a step of it alone is skipped; beside a real one
    the step is the real one's."""
    torch.manual_seed(0)
    models = [TinyPolicy(), None]
    models[1] = copy.deepcopy(models[0])
    opts = [FORMS[form](m) for m in models]
    batch = make_batch(0)
    rows, cols = (slice(0, 0), slice(None)) if empty == "B=0" else (slice(None), slice(0, 0))
    keep, _ = select(opts[0], models[0], batch, rows, cols)
    assert keep.shape == batch["mask"][rows, cols].shape and keep.dtype == torch.bool
    assert opts[0].stats["tokens"] == 0
    opts[0].step()
    assert opts[0].stats["skipped_steps"] == 1
    for model, opt, with_empty in ((models[0], opts[0], True), (models[1], opts[1], False)):
        if with_empty:
            select(opt, model, batch, rows, cols)
        keep, logits = select(opt, model, batch)
        policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
        opt.step()
        opt.zero_grad()
    stats = [{k: v for k, v in o.stats.items() if k != "skipped_steps"} for o in opts]
    assert stats[0] == stats[1]
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.1),  # fresh: no state yet
    ],
    ids=["SGD", "fresh Adam"],
)
@pytest.mark.parametrize("form", ["linear", "functional", "trust-region-head"])
def test_hidden_states_of_another_width_raise_naming_hidden(make, form):
    model = TinyPolicy()
    if form == "trust-region-head":
        opt = CAPO(make(model), model.lm_head, levels=(), max_policy_shift=1e-3)
    else:
        head = model.lm_head if form == "linear" else nn.Sequential(model.lm_head)
        opt = CAPO(make(model), head)
    batch = make_batch(0)
    h, logits = model(batch["x"])
    stats = opt.stats
    with pytest.raises(ValueError, match=r"hidden: .*width"):
        opt.select(
            h[..., :6].detach(), batch["actions"], batch["advantages"], batch["mask"],
            logits=logits.detach(),
        )  # fmt: skip
    assert opt.stats == stats


@pytest.mark.parametrize("vocab", [9, 14], ids=["narrower", "wider"])
@pytest.mark.parametrize("form", ["linear", "functional", "trust-region-head", "jvp"])
def test_logits_of_another_vocabulary_than_the_head_raise_naming_logits(vocab, form):
    """A padded head (more rows than the tokenizer's vocabulary) gives logits for all its rows:
    the policy is the softmax over all of them, and logits of another width are refused."""
    model = TinyPolicy()  # V = 11
    kw = dict(levels=(), max_policy_shift=1e-3)
    head = nn.Sequential(model.lm_head) if form == "functional" else model.lm_head
    if form == "jvp":
        kw["shift_estimate"] = "jvp"
    opt = CAPO(adamw(model), head, **(kw if "jvp" in form or "trust" in form else {}))
    batch = make_batch(0)
    h, logits = model(batch["x"])
    wide = torch.cat([logits, logits], -1)[..., :vocab].detach()
    actions = batch["actions"] % 9
    with pytest.raises(ValueError, match="logits: the head gives V = 11"):
        opt.select(h.detach(), actions, batch["advantages"], batch["mask"], logits=wide)
    assert "tokens" not in opt.stats


def test_a_forward_of_another_vocabulary_raises_naming_it_and_changes_nothing():
    model = TinyPolicy()
    opt = CAPO(adamw(model), model=model, max_policy_shift=1e-3)
    batch = make_batch(0)
    keep, logits = select(opt, model, batch, forward=lambda m: m(batch["x"])[1][..., :9])
    policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
    state = state_of(model, opt)
    with pytest.raises(ValueError, match="forward: returned V = 9"):
        opt.step()
    assert_state(model, opt, state)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_small_integer_actions_give_the_int64_answer(dtype, form):
    torch.manual_seed(0)
    models = [TinyPolicy()]
    models.append(copy.deepcopy(models[0]))
    opts = [FORMS[form](m) for m in models]
    batch = make_batch(0)
    for model, opt, acts in zip(models, opts, (batch["actions"], batch["actions"].to(dtype))):
        keep, logits = select(opt, model, batch, actions=acts)
        policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
        opt.step()
    assert opts[0].stats == opts[1].stats
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


def trained(direction="frozen"):
    torch.manual_seed(0)
    model = TinyPolicy(vocab=40)
    opt = CAPO(adamw(model), model.lm_head, direction=direction, **ACCEPT_ALL)
    for i in range(2):
        train_step(model, opt, make_batch(i, V=40))
    return model, opt


@pytest.mark.parametrize("direction", ["exact", "frozen", "shadow"])
@pytest.mark.parametrize("level", ["token", "sequence", "batch"])
def test_models_are_computed_in_float32_under_autocast(direction, level):
    model, opt = trained(direction)
    batch = make_batch(3, V=40)
    h, logits = model(batch["x"])
    args = (h.detach(), batch["actions"], batch["advantages"], batch["mask"])
    want = opt.tracker.quadratic_model(*args, level=level, logits=logits.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = opt.tracker.quadratic_model(*args, level=level, logits=logits.detach())
    for key in ("first_order", "second_order", "policy_shift"):
        assert torch.equal(getattr(got, key), getattr(want, key))


def test_the_step_model_is_computed_in_float32_under_autocast():
    model, opt = trained()
    batch = make_batch(3, V=40)
    h, logits = model(batch["x"])
    policy_loss(logits, batch["actions"], batch["advantages"], batch["mask"]).backward()
    args = (batch["actions"], batch["advantages"], batch["mask"])
    want = opt.tracker.step_model(*args, hidden=h.detach(), fisher="true").policy_shift
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = opt.tracker.step_model(*args, hidden=h.detach(), fisher="true").policy_shift
    assert torch.equal(got, want)


def test_the_trust_regions_kl_of_a_head_input_is_float32_under_autocast():
    torch.manual_seed(0)
    hidden, mask = torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.bool)
    w0, w1 = torch.randn(50, 16), torch.randn(50, 16) * 1e-2
    before, after = HeadInput(hidden, w0), HeadInput(hidden, w0 + w1)
    actions = torch.randint(0, 50, (3, 4))
    want = policy_kl(before, after, mask, actions, LogitTransform())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = policy_kl(before, after, mask, actions, LogitTransform())
    assert torch.equal(got, want)


@pytest.mark.parametrize("form", ["linear-frozen", "functional", "whole-model", "jvp"])
def test_huge_advantages_raise_naming_them_and_change_nothing(form):
    model = TinyPolicy()
    opt = FORMS[form](model)
    warm = make_batch(1)
    keep, logits = select(opt, model, warm)
    policy_loss(logits, warm["actions"], warm["advantages"], keep).backward()
    opt.step()
    opt.zero_grad()
    batch = make_batch(0)
    state, stats = state_of(model, opt), opt.stats
    with pytest.raises(ValueError, match=r"advantages: .*1e\+30"):
        select(opt, model, batch, advantages=batch["advantages"].sign() * 1e30)
    assert_state(model, opt, state)
    assert opt.stats == stats


def test_the_trust_region_alone_does_not_read_the_advantages():
    torch.manual_seed(0)
    models = [TinyPolicy()]
    models.append(copy.deepcopy(models[0]))
    batch = make_batch(0)
    for model, scale in zip(models, (1.0, 1e30)):
        opt = FORMS["trust-region"](model)
        keep, logits = select(opt, model, batch, advantages=batch["advantages"] * scale)
        policy_loss(logits, batch["actions"], batch["advantages"], keep).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


@pytest.mark.parametrize("direction", ["exact", "frozen"])
def test_large_advantages_within_the_limit_are_modelled_as_in_float64(direction):
    model, opt = trained(direction)
    twin = copy.deepcopy(model).double()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(opt.optimizer.state_dict())
    batch = make_batch(3, V=40)
    h, _ = model(batch["x"])
    for scale in (1e6, 1e12):
        adv = batch["advantages"].sign() * scale
        args = (h.detach(), batch["actions"], adv, batch["mask"])
        got = CurvatureTracker(model.lm_head, opt, direction=direction).quadratic_model(*args)
        args64 = (h.detach().double(), batch["actions"], adv.double(), batch["mask"])
        want = CurvatureTracker(twin.lm_head, twin_opt, direction=direction).quadratic_model(
            *args64
        )
        torch.testing.assert_close(got.policy_shift.double(), want.policy_shift, rtol=1e-4, atol=0)


def test_the_frozen_rule_saturates_at_its_reach_however_large_the_gradient():
    """Adam's frozen response x/√(1 + (x/reach)²) must tend to ±reach, not collapse to 0 when
    (x/reach)² overflows (a huge advantage on a row whose second moment is still zero)."""
    from curvopt.optimizers.rules import saturate

    q = torch.tensor([1e-3, -2.0, 3e18, -1e30, 1e36])
    reach = torch.full_like(q, 1e-3)
    got = saturate("frozen", q, 1.0, reach)
    x = q.double()
    want = x / torch.sqrt(1 + (x / 1e-3) ** 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(saturate("frozen", q, 1.0, 1e-3), got)
