"""Every torch optimizer through CAPO, as PyTorch tests its own (the CPU configurations that
``torch.testing._internal.common_optimizers.optim_db`` lists, written out here), plus a
user-written optimizer and a one-line AdamW subclass. For each configuration:

- the support rule: the head's models are built (and exact: see test_optimizer_support.py) for
  the optimizers curvopt recognises, and refused naming ``optimizer`` for the others;
- nothing rejected, a loose bound: bit for bit the bare optimizer, with an LR scheduler;
- ``state_dict`` round trip: a resumed run is bit for bit the uninterrupted one; hooks fire;
- ``torch.amp.GradScaler("cpu")`` with a step of inf gradients: bit for bit the bare optimizer
  under the same scaler, and the skipped step leaves nothing in CAPO's window;
- the measured trust region: the KL of every step taken, by literal forwards, is ≤ 1.1 × bound.

The default run takes each configuration with the default implementation; the exhaustive one
(``-m slow``) adds the ``foreach`` and ``fused`` implementations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from models import TinyLM

from curvopt import CAPO
from curvopt.optimizers.support import is_modelled

F64 = torch.float64
ACCEPT_ALL = dict(rule="symmetric", delta_h=1e300, delta_f=1e300)
BOUND = 1e-4
LOOSE = 1e9
STEPS = 3


class MyAdamW(torch.optim.AdamW):
    pass


class UserSGD(torch.optim.Optimizer):
    """A user-written optimizer (momentum SGD): curvopt cannot read its update."""

    def __init__(self, params, lr=0.1, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


OPT = torch.optim
TLR = torch.tensor(1e-3)
# (class, configurations): optim_db's CPU inputs, one dict of options each
CONFIGS: list[tuple[type, list[dict[str, Any]]]] = [
    (OPT.Adadelta, [{}, dict(lr=0.01), dict(weight_decay=0.1), dict(maximize=True),
                  dict(weight_decay=0.1, maximize=True), dict(rho=0.95, weight_decay=0.9)]),
    (OPT.Adafactor, [{}, dict(weight_decay=0.1, lr=0.01), dict(weight_decay=0.1, maximize=True),
                   dict(beta2_decay=-1.0), dict(d=1.5)]),
    (OPT.Adagrad, [{}, dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True),
                 dict(lr=0.1), dict(initial_accumulator_value=0.1, weight_decay=0.1),
                 dict(lr=0.1, lr_decay=0.5, weight_decay=0.1), dict(lr=TLR)]),
    (OPT.Adam, [{}, dict(lr=0.01), dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True),
              dict(weight_decay=0.1, amsgrad=True), dict(lr=torch.tensor(0.01)),
              dict(weight_decay=0.1, decoupled_weight_decay=True)]),
    (OPT.Adamax, [{}, dict(lr=0.1), dict(weight_decay=0.1), dict(maximize=True),
                dict(weight_decay=0.1, maximize=True)]),
    (OPT.AdamW, [{}, dict(lr=0.01), dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True),
               dict(weight_decay=0.1, amsgrad=True), dict(lr=torch.tensor(0.01))]),
    (OPT.ASGD, [{}, dict(lambd=0.1), dict(lr=0.02), dict(t0=100), dict(maximize=True),
              dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True)]),
    (OPT.LBFGS, [{}, dict(lr=0.01), dict(lr=TLR), dict(tolerance_grad=1e-6),
               dict(line_search_fn="strong_wolfe")]),
    (OPT.Muon, [{}, dict(lr=0.01), dict(lr=TLR), dict(weight_decay=0.2), dict(momentum=0.8),
              dict(ns_steps=6), dict(ns_coefficients=(3.4, -4.7, 2.0), eps=1e-8)]),
    (OPT.NAdam, [{}, dict(lr=1e-3), dict(momentum_decay=6e-3), dict(weight_decay=0.1),
               dict(weight_decay=0.1, momentum_decay=6e-3),
               dict(weight_decay=0.1, momentum_decay=6e-3, decoupled_weight_decay=True),
               dict(weight_decay=0.1, maximize=True)]),
    (OPT.RAdam, [{}, dict(lr=2e-3), dict(eps=1e-6), dict(weight_decay=0.1),
               dict(weight_decay=0.1, decoupled_weight_decay=True),
               dict(weight_decay=0.1, maximize=True)]),
    (OPT.RMSprop, [{}, dict(lr=1e-3), dict(weight_decay=0.1), dict(weight_decay=0.1, maximize=True),
                 dict(weight_decay=0.1, centered=True), dict(weight_decay=0.1, centered=True,
                 momentum=0.1), dict(weight_decay=0.1, centered=True, momentum=0.1,
                 maximize=True)]),
    (OPT.Rprop, [{}, dict(lr=2e-4), dict(etas=(0.5, 1.5)), dict(step_sizes=(2e-6, 100)),
               dict(maximize=True)]),
    (OPT.SGD, [{}, dict(lr=1e-2), dict(lr=TLR), dict(weight_decay=0.5), dict(momentum=0.9),
             dict(weight_decay=0.1, maximize=True), dict(momentum=0.9, dampening=0.5),
             dict(momentum=0.9, weight_decay=0.1),
             dict(momentum=0.9, nesterov=True, weight_decay=0.1)]),
    (MyAdamW, [{}, dict(weight_decay=0.1, amsgrad=True)]),
    (UserSGD, [{}, dict(momentum=0.5)]),
]  # fmt: skip
# optim_db's supported_impls on CPU, for the exhaustive run ("differentiable" aside: it steps
# parameters that are not leaves, which no training loop has)
IMPLS = {
    OPT.Adadelta: ("foreach",),
    OPT.Adagrad: ("foreach", "fused"),
    OPT.Adam: ("foreach", "fused"),
    OPT.Adamax: ("foreach",),
    OPT.AdamW: ("foreach", "fused"),
    OPT.ASGD: ("foreach",),
    OPT.NAdam: ("foreach",),
    OPT.RAdam: ("foreach",),
    OPT.RMSprop: ("foreach",),
    OPT.Rprop: ("foreach",),
    OPT.SGD: ("foreach", "fused"),
}


@dataclass
class Config:
    cls: type
    options: dict[str, Any]
    impl: str | None = None
    id: str = field(init=False)

    def __post_init__(self) -> None:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items()) or "default"
        self.id = f"{self.cls.__name__}-{opts}" + (f"-{self.impl}" if self.impl else "")

    def make(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        options = copy.deepcopy(self.options)  # schedulers update a tensor lr in place
        if self.impl:
            options[self.impl] = True
        params = model.parameters()
        if self.cls is OPT.Muon:  # Muon takes only matrices
            params = [p for p in model.parameters() if p.dim() == 2]
        return self.cls(params, **options)


def configs(exhaustive: bool) -> list[Any]:
    out = []
    for cls, options in CONFIGS:
        for opts in options:
            impls = [None] + (list(IMPLS.get(cls, ())) if exhaustive else [])
            for impl in impls:
                c = Config(cls, opts, impl)
                if impl:
                    try:  # combinations torch itself refuses (e.g. a tensor lr with foreach)
                        c.make(TinyLM())
                    except (ValueError, RuntimeError, TypeError):
                        continue
                out.append(pytest.param(c, id=c.id))
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and idle OpenMP threads spinning
    on a loaded machine made the grid ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(4, 5, 3, generator=g, dtype=F64),
        actions=torch.randint(0, 6, (4, 5), generator=g),
        advantages=torch.randn(4, generator=g, dtype=F64),
        mask=torch.rand(4, 5, generator=g) < 0.8,
    )


def lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(D=3, H=8, V=6).double()


def loss_of(logits, b, keep):
    logp = torch.log_softmax(logits, -1).gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1)
    return -(logp * b["advantages"][:, None] * keep).sum() / keep.sum().clamp(min=1)


def train(model, opt, steps, *, capo=True, scaler=None, inf_at=None, start=0, sched=None):
    """``steps`` steps (select, then ``step(closure)``; with a scaler, ``scaler.step``); returns
    per step the stats and the literal KL of the step over the kept tokens."""
    out = []
    for i in range(start, start + steps):
        b = batch(i)
        x = b["x"]
        with torch.no_grad():
            h = model.body(x)
            before = model.lm_head(h)
        keep = b["mask"]
        if capo:
            hidden = h if opt.tracker is not None else None
            keep = opt.select(
                hidden, b["actions"], b["advantages"], b["mask"], logits=before,
                forward=lambda m, x=x: m(x),
            )  # fmt: skip

        def closure(x=x, b=b, keep=keep):
            opt.zero_grad()
            loss = loss_of(model(x), b, keep)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        if scaler is None:
            opt.step(closure)
        else:
            closure()
            if i == inf_at:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            after = model(x)
        lp0, lp1 = torch.log_softmax(before, -1)[keep], torch.log_softmax(after, -1)[keep]
        kl = float((lp0.exp() * (lp0 - lp1)).sum(-1).mean()) if keep.any() else 0.0
        out.append((dict(opt.stats) if capo else {}, kl))
    return out


def same_params(a, b) -> bool:
    """Bit for bit (a diverged run's NaNs included)."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return all(bool(((p == q) | (p.isnan() & q.isnan())).all()) for p, q in pairs)


def check(config: Config) -> None:
    fused = config.impl == "fused"
    # the support rule
    model = lm()
    if is_modelled(config.make(model)):
        head_form = CAPO(config.make(model), model.lm_head, **ACCEPT_ALL)
    else:
        with pytest.raises(TypeError, match=r"optimizer: .*measured trust region"):
            CAPO(config.make(model), model.lm_head)
        head_form = None

    # nothing rejected, no bound, a loose bound: the bare optimizer, bit for bit, with a scheduler
    # (unless a bare step's KL exceeds even the loose bound: LBFGS diverging)
    bare_model = lm()
    bare = config.make(bare_model)
    sched = torch.optim.lr_scheduler.StepLR(bare, 1)
    bare_kls = [kl for _, kl in train(bare_model, bare, STEPS, capo=False, sched=sched)]
    within = all(kl <= LOOSE for kl in bare_kls)
    forms = [(model, head_form)] if head_form is not None else []
    for bound in (None, LOOSE):
        m = lm()
        forms.append((m, CAPO(config.make(m), model=m, max_policy_shift=bound)))
    for m, opt in forms:
        calls: list[str] = []
        opt.register_step_pre_hook(lambda *a, calls=calls: calls.append("pre"))
        opt.register_step_post_hook(lambda *a, calls=calls: calls.append("post"))
        out = train(m, opt, STEPS, sched=torch.optim.lr_scheduler.StepLR(opt, 1))
        assert calls == ["pre", "post"] * STEPS
        if within or opt.max_policy_shift is None:
            assert same_params(m, bare_model)
        else:
            assert all(kl <= 1.1 * LOOSE for _, kl in out)

    # state_dict round trip with the trust region active (bit for bit where the bare optimizer's
    # is: torch casts some of NAdam's state to the parameters' dtype when loading), and hooks
    def round_trip(capo: bool) -> tuple[Any, Any, Any, Any]:
        a = lm()
        opt_a = config.make(a)
        if capo:
            opt_a = CAPO(opt_a, model=a, max_policy_shift=BOUND)
        train(a, opt_a, 2, capo=capo)
        saved = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
        expected = train(a, opt_a, 2, capo=capo, start=2)
        b = lm()
        b.load_state_dict(saved[0])
        opt_b = config.make(b)
        if capo:
            opt_b = CAPO(opt_b, model=b, max_policy_shift=BOUND)
            opt_b.register_load_state_dict_post_hook(lambda o: hooks.append("loaded"))
            opt_b.register_state_dict_pre_hook(lambda o: hooks.append("saving"))
        opt_b.load_state_dict(saved[1])
        return a, b, expected, train(b, opt_b, 2, capo=capo, start=2)

    hooks: list[str] = []
    exact = same_params(*round_trip(capo=False)[:2])
    a, b, expected, resumed = round_trip(capo=True)
    assert hooks == ["loaded"]
    if exact:
        assert resumed == expected
        assert same_params(a, b)
    else:
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)

    # the measured trust region, by literal forwards
    for stats, kl in expected + resumed:
        assert kl <= 1.1 * BOUND, (stats, kl)

    # GradScaler on CPU, with a step of inf gradients (LBFGS takes no scaler: closures only)
    if config.cls is OPT.LBFGS:
        return
    bare_model = lm()
    scaler_kw = dict(init_scale=2.0**8)
    scaler = torch.amp.GradScaler("cpu", **scaler_kw)
    train(bare_model, config.make(bare_model), STEPS, capo=False, scaler=scaler, inf_at=1)
    forms = [] if head_form is None else [(lm(), "head")]
    forms.append((lm(), "loose"))
    for m, form in forms:
        if form == "head":
            opt = CAPO(config.make(m), m.lm_head, **ACCEPT_ALL)
        else:
            opt = CAPO(config.make(m), model=m, max_policy_shift=LOOSE)
        scaler = torch.amp.GradScaler("cpu", **scaler_kw)
        out = train(m, opt, STEPS, scaler=scaler, inf_at=1)
        assert [s["skipped_steps"] for s, _ in out][1:] == [1, 1]
        assert out[2][0]["tokens"] == batch(2)["mask"].sum()
        if fused:  # the fused kernel unscales inside the step: the same step up to rounding
            for p, q in zip(m.parameters(), bare_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        elif within:
            assert same_params(m, bare_model)


@pytest.mark.parametrize("config", configs(exhaustive=False))
def test_every_optimizer_configuration_through_capo(config):
    check(config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [c for c in configs(exhaustive=True) if c.values[0].impl is not None]
)
def test_every_optimizer_implementation_through_capo(config):
    check(config)
