"""The support rule: every torch.optim.Optimizer works with the measured trust region; the head's
models are exact for the torch optimizers curvopt recognises (subclasses included) and refused,
naming ``optimizer``, for any other; ``direction="shadow"`` only where Adam's update is honest."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss, train_step
from oracle import oracle
from torch import nn

from curvopt import CAPO, CurvatureTracker
from curvopt.optimizers.support import CLOSED_FORM, ELEMENTWISE, recognised

ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)


class MyAdamW(torch.optim.AdamW):
    pass


class StepOverridingAdamW(torch.optim.AdamW):
    """A subclass with its own step: no longer AdamW's update, as far as curvopt can know."""

    def step(self, closure=None):
        return super().step(closure)


class PlainSGD(torch.optim.Optimizer):
    """A user-written optimizer: θ ← θ − lr·g."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class UserAdam(torch.optim.Optimizer):
    """Adam written by a user (the state layout curvopt cannot know): shadow moments model it."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                if not s:
                    s["t"], s["m"], s["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                s["t"] += 1
                s["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (s["v"] / (1 - b2 ** s["t"])).sqrt_().add_(group["eps"])
                p.addcdiv_(s["m"], denom, value=-group["lr"] / (1 - b1 ** s["t"]))


class SignMomentum(UserAdam):
    """Adam's hyperparameters, not Adam's update (Lion-like): θ ← θ − lr·sign(m)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, _ = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                p.add_(m.sign(), alpha=-group["lr"])


def test_recognition_follows_subclasses_that_keep_the_step():
    ps = [nn.Parameter(torch.ones(2))]
    assert recognised(MyAdamW(ps)) is torch.optim.AdamW
    assert recognised(torch.optim.AdamW(ps)) is torch.optim.AdamW
    assert recognised(StepOverridingAdamW(ps)) is None
    assert recognised(PlainSGD(ps)) is None
    assert recognised(torch.optim.LBFGS(ps)) is None
    for cls in CLOSED_FORM + ELEMENTWISE:
        assert recognised(type("Sub", (cls,), {})(ps)) is cls


def test_an_optimizer_with_nothing_modelled_is_accepted():
    model = TinyPolicy()
    opt = CAPO(torch.optim.LBFGS(model.parameters()), model.lm_head, levels=())
    assert opt.tracker is None


@pytest.mark.parametrize("direction", ["exact", "frozen"])
def test_a_one_line_subclass_is_the_bare_subclass_bit_for_bit(direction):
    torch.manual_seed(0)
    a = TinyPolicy()
    b = copy.deepcopy(a)
    bare = MyAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    capo = CAPO(
        MyAdamW(b.parameters(), lr=1e-2, weight_decay=0.1),
        b.lm_head,
        direction=direction,
        **ACCEPT_ALL,
    )
    for i in range(3):
        train_step(a, bare, make_batch(i), select=False)
        train_step(b, capo, make_batch(i))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # and its models are AdamW's
    twin = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    twin.load_state_dict(capo.optimizer.state_dict())
    batch = make_batch(5)
    h, _ = b(batch["x"])
    args = (h.detach(), batch["actions"], batch["advantages"], batch["mask"])
    mine = capo.tracker.quadratic_model(*args).policy_shift
    theirs = CurvatureTracker(b.lm_head, twin, direction=direction).quadratic_model(*args)
    torch.testing.assert_close(mine, theirs.policy_shift, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.LBFGS(ps),
        lambda ps: torch.optim.Adafactor(ps),
        lambda ps: StepOverridingAdamW(ps),
        lambda ps: PlainSGD(ps),
    ],
    ids=["LBFGS", "Adafactor", "subclass-with-step", "user-written"],
)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(levels=("sequence",)),
        dict(levels=(), max_policy_shift=1e-3, shift_estimate="jvp"),
    ],
    ids=["token", "sequence", "jvp"],
)
def test_unmodelled_optimizers_are_refused_at_construction_pointing_to_the_trust_region(
    make, options
):
    model = TinyPolicy()
    with pytest.raises(TypeError, match=r"optimizer: .*measured trust region"):
        CAPO(make(model.parameters()), model.lm_head, **options)


@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.Adafactor(ps), PlainSGD],
    ids=["Adafactor", "user-written"],
)
def test_track_realised_measures_the_step_of_any_optimizer(make):
    """track_realised needs no model of the optimizer: the realised KL and its quadratic model
    are of the update actually taken."""
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(make(model.parameters()), model.lm_head, levels=(), track_realised=True)
    batch = make_batch(0)

    def closure():
        opt.zero_grad()
        h, logits = model(batch["x"])
        keep = opt.select(h, batch["actions"], batch["advantages"], batch["mask"], logits=logits)
        loss = policy_loss(logits, batch["actions"], batch["advantages"], keep)
        loss.backward()
        return loss

    opt.step(closure)
    stats = opt.stats
    assert stats["policy_shift_realised"] > 0
    assert stats["policy_shift_step_model"] == pytest.approx(
        stats["policy_shift_realised"], rel=0.2
    )


def _problem(cls, options, seed=0, warm=2):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(3, 5).double()
    opt = cls(head.parameters(), **options)
    for _ in range(warm):
        opt.zero_grad()
        head(torch.randn(4, 3, generator=gen, dtype=torch.float64)).square().mean().backward()
        opt.step()
    opt.zero_grad()
    hidden = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, 5, (2, 3), generator=gen)
    adv = torch.randn(2, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    return head, opt, (hidden, actions, adv, mask)


ELEMENTWISE_CONFIGS = [
    (torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=0.1)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.5, weight_decay=0.1)),
    (torch.optim.Adadelta, dict(rho=0.95, weight_decay=0.1)),
    (torch.optim.Adamax, dict(weight_decay=0.1, maximize=True)),
    (torch.optim.NAdam, dict(weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.RAdam, dict(weight_decay=0.1)),
    (torch.optim.ASGD, dict(weight_decay=0.1, t0=1)),
    (torch.optim.Rprop, dict(etas=(0.5, 1.5))),
]


@pytest.mark.parametrize(
    "cls, options", ELEMENTWISE_CONFIGS, ids=lambda c: getattr(c, "__name__", "")
)
@pytest.mark.parametrize("level", ["token", "sequence", "batch"])
def test_elementwise_optimizers_are_modelled_exactly(cls, options, level):
    """Against the oracle: a deep copy of the optimizer stepping on each candidate's loss."""
    head, opt, args = _problem(cls, options)
    cands = oracle(head, opt, *args, level=level)
    for direction in ("exact", "frozen"):
        qm = CurvatureTracker(head, opt, direction=direction).quadratic_model(*args, level=level)
        for c in cands:
            b, t = c["tokens"][0]
            at = {"token": (b, t), "sequence": (b,), "batch": ()}[level]
            got = torch.stack([qm.first_order[at], qm.second_order[at], qm.policy_shift[at]])
            want = torch.stack([c["first_order"], c["second_order"], c["policy_empirical"]])
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.RMSprop(ps),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.NAdam(ps),
        lambda ps: type("MyRMSprop", (torch.optim.RMSprop,), {"step": PlainSGD.step})(ps),
        lambda ps: torch.optim.Adafactor(ps),
        lambda ps: PlainSGD(ps),
    ],
    ids=["RMSprop", "SGD", "NAdam", "RMSprop-subclass-with-step", "Adafactor", "no-betas"],
)
def test_shadow_is_refused_where_the_update_is_known_not_to_be_adams(make):
    model = TinyPolicy()
    with pytest.raises(TypeError, match="optimizer: direction='shadow'"):
        CAPO(make(model.parameters()), model.lm_head, direction="shadow")


def shadow_run(make, steps=4):
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(make(model.parameters()), model.lm_head, direction="shadow", **ACCEPT_ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            train_step(model, opt, make_batch(i))
    return opt, [w for w in caught if "direction='shadow'" in str(w.message)]


def test_shadow_models_an_adam_whose_state_it_cannot_read():
    opt, warned = shadow_run(lambda ps: UserAdam(ps, lr=1e-2))
    assert not warned
    assert opt._shadow.error < 1e-3


def test_shadow_warns_when_the_step_taken_is_not_adams():
    opt, warned = shadow_run(lambda ps: SignMomentum(ps, lr=1e-2))
    assert len(warned) == 1 and "SignMomentum" in str(warned[0].message)
    assert opt._shadow.error > 0.1


@pytest.mark.parametrize("options", [dict(weight_decay=0.1), dict(amsgrad=True, maximize=True)])
def test_shadow_moments_follow_torch_adam(options):
    """L2 decay, amsgrad and maximize are Adam's: the shadow predicts torch's step."""
    opt, warned = shadow_run(lambda ps: torch.optim.Adam(ps, lr=1e-2, **options))
    assert not warned
    assert opt._shadow.error < 1e-3
