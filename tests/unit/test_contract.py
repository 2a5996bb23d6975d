"""CAPO and the rest of torch.optim's contract: state-dict hooks, closures, GradScaler's skipped
steps (bare and under accelerate), and a wrapped optimizer whose scaler skips its step."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss
from models import TinyLM

from curvopt import CAPO

ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)
F64 = torch.float64


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def test_state_dict_hooks_fire_as_on_any_optimizer():
    model = TinyPolicy()
    opt = CAPO(adamw(model), model.lm_head, **ACCEPT_ALL)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save-pre", o is opt)))

    def post(o, state):
        calls.append(("save-post", "capo" in state))
        return {**state, "mine": 1}

    def load_pre(o, state):
        calls.append(("load-pre", state.get("mine")))
        return {k: v for k, v in state.items() if k != "mine"}

    opt.register_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o is opt)))
    state = opt.state_dict()
    assert state["mine"] == 1
    opt.load_state_dict(state)
    assert calls == [("save-pre", True), ("save-post", True), ("load-pre", 1), ("load-post", True)]


def twin_lm(bound):
    torch.manual_seed(0)
    model = TinyLM(D=3, H=8, V=6).double()
    opt = CAPO(torch.optim.Adam(model.parameters(), lr=0.3), model=model, max_policy_shift=bound)
    g = torch.Generator().manual_seed(1)
    batch = dict(
        x=torch.randn(4, 5, 3, generator=g, dtype=F64),
        actions=torch.randint(0, 6, (4, 5), generator=g),
        advantages=torch.randn(4, generator=g, dtype=F64),
        mask=torch.rand(4, 5, generator=g) < 0.8,
    )
    return model, opt, batch


def literal_kl(before, after, keep):
    lp0, lp1 = torch.log_softmax(before, -1)[keep], torch.log_softmax(after, -1)[keep]
    return float((lp0.exp() * (lp0 - lp1)).sum(-1).mean())


@pytest.mark.parametrize("where", ["select inside the closure", "select before, grads in it"])
def test_a_closure_is_evaluated_before_the_step_is_planned(where):
    bound = 1e-4
    model, opt, b = twin_lm(bound)
    x = b["x"]
    with torch.no_grad():
        before = model(x)
    keep = None
    if where != "select inside the closure":
        keep = opt.select(
            None, b["actions"], b["advantages"], b["mask"], logits=before,
            forward=lambda m: m(x),
        )  # fmt: skip
        for p in model.parameters():  # stale gradients the closure must replace
            p.grad = torch.full_like(p, 1e-9)

    def closure():
        nonlocal keep
        opt.zero_grad()
        logits = model(x)
        if where == "select inside the closure":
            keep = opt.select(
                None, b["actions"], b["advantages"], b["mask"], logits=logits,
                forward=lambda m: m(x),
            )  # fmt: skip
        loss = policy_loss(logits, b["actions"], b["advantages"], keep)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    with torch.no_grad():
        realised = literal_kl(before, model(x), keep)
    assert opt.stats["step_scale"] < 1
    assert 0.5 * bound <= realised <= 1.1 * bound
    assert opt.stats["tokens"] == b["mask"].sum()


def scaled_run(model, opt, batches, inf_at, select=True, wrap=None):
    """GradScaler on CPU; the gradients of step ``inf_at`` get an inf. Returns the stats after
    each step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stepper = wrap(opt, scaler) if wrap else None
    out = []
    for i, batch in enumerate(batches):
        h, logits = model(batch["x"])
        keep = batch["mask"]
        if select:
            keep = opt.select(h, batch["actions"], batch["advantages"], keep, logits=logits)
        scaler.scale(policy_loss(logits, batch["actions"], batch["advantages"], keep)).backward()
        if i == inf_at:
            model.lm_head.weight.grad[0, 0] = float("inf")
        if stepper is None:
            scaler.step(opt)
            scaler.update()
        else:
            stepper.step()
        opt.zero_grad()
        out.append(dict(opt.stats) if select else {})
    return out


@pytest.mark.parametrize("form", ["head", "trust region"])
def test_a_step_grad_scaler_skips_leaves_nothing_in_the_window(form):
    """The run is the one where the skipped micro-batch never happened, and the bare optimizer's
    under the same scaler."""

    def build(model):
        if form == "head":
            return CAPO(adamw(model), model.lm_head, track_realised=True, **ACCEPT_ALL)
        return CAPO(adamw(model), model.lm_head, levels=(), max_policy_shift=1e-4)

    torch.manual_seed(0)
    models = [TinyPolicy()]
    models += [copy.deepcopy(models[0]) for _ in range(2)]
    batches = [make_batch(i) for i in range(3)]
    scaled_run(models[0], adamw(models[0]), batches, inf_at=1, select=False)
    stats = scaled_run(models[1], build(models[1]), batches, inf_at=1)
    never = scaled_run(models[2], build(models[2]), batches[::2], inf_at=None)
    assert [s["skipped_steps"] for s in stats] == [0, 1, 1]
    assert stats[2]["tokens"] == batches[2]["mask"].sum()  # only its own micro-batch
    lifetime = ("steps", "skipped_steps")
    assert {k: v for k, v in stats[2].items() if k not in lifetime} == {
        k: v for k, v in never[1].items() if k not in lifetime
    }
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(q, r)
        if form == "head":
            assert torch.equal(p, q)


def test_accelerate_wrapping_capo_with_a_scaler_closes_the_skipped_window():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        a = TinyPolicy()
        b = copy.deepcopy(a)
        capo = CAPO(adamw(b), b.lm_head, **ACCEPT_ALL)
        batches = [make_batch(i) for i in range(3)]

        def wrap(opt, scaler):
            return AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)

        scaled_run(a, adamw(a), batches, inf_at=1, select=False)
        stats = scaled_run(b, capo, batches, inf_at=1, wrap=wrap)
        assert [s["skipped_steps"] for s in stats] == [0, 1, 1]
        assert stats[2]["tokens"] == batches[2]["mask"].sum()
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def test_a_wrapped_optimizer_whose_scaler_skips_its_step_counts_as_skipped():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = TinyPolicy()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        inner = AcceleratedOptimizer(adamw(model), device_placement=False, scaler=scaler)
        capo = CAPO(inner, model.lm_head, direction="shadow", **ACCEPT_ALL)
        for i in range(2):
            batch = make_batch(i)
            h, logits = model(batch["x"])
            keep = capo.select(h, batch["actions"], batch["advantages"], batch["mask"])
            scaler.scale(
                policy_loss(logits, batch["actions"], batch["advantages"], keep)
            ).backward()
            if i == 1:
                model.lm_head.weight.grad[0, 0] = float("inf")
            capo.step()
            capo.zero_grad()
        assert capo.stats["steps"] == 1 and capo.stats["skipped_steps"] == 1
        assert capo.tracker.shadow.step == 1  # the shadow moments saw only the step taken
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
