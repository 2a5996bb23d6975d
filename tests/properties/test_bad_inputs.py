"""Generated bad inputs to ``CAPO.select`` (and the step after it), on every form of CAPO: each gets
a clear error naming the argument, or the right answer (the one of the equivalent well-formed
input, or an empty selection) — and the parameters, the optimizer's state and, after an error,
the statistics are unchanged either way."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import TinyPolicy, policy_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvopt import CAPO

ACCEPT_SOME = dict(rule="symmetric", delta_h=1e300, delta_f=1e-3)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


# form → (builder, whether the head's models see the inputs, whether hidden reaches a head);
# the forms built with ``model=`` are given the policy's forward
LEVELS = ("token", "sequence", "batch")
FORMS: dict[str, tuple[Callable[[TinyPolicy], CAPO], bool, bool]] = {
    "linear": (lambda m: CAPO(adamw(m), m.lm_head, levels=LEVELS, **ACCEPT_SOME), True, True),
    "linear-topk-exact": (
        lambda m: CAPO(adamw(m), m.lm_head, top_k=2, direction="exact", **ACCEPT_SOME),
        True,
        True,
    ),
    "functional": (
        lambda m: CAPO(adamw(m), nn.Sequential(m.lm_head), levels=LEVELS[:2], **ACCEPT_SOME),
        True,
        True,
    ),
    "whole-model": (
        lambda m: CAPO(adamw(m), m.lm_head, params="all", model=m, **ACCEPT_SOME),
        True,
        False,
    ),
    "jvp": (
        lambda m: CAPO(adamw(m), m.lm_head, levels=(), max_policy_shift=1e-3, shift_estimate="jvp"),
        True,
        True,
    ),
    "trust-region": (lambda m: CAPO(adamw(m), model=m, max_policy_shift=1e-3), False, False),
    "trust-region-head": (
        lambda m: CAPO(adamw(m), m.lm_head, levels=(), max_policy_shift=1e-3),
        False,
        True,
    ),
}


@dataclass
class Case:
    args: dict[str, Any]
    model: TinyPolicy
    opt: CAPO
    form: str

    @property
    def models_inputs(self) -> bool:
        return FORMS[self.form][1]

    @property
    def head_reads_hidden(self) -> bool:
        return FORMS[self.form][2]


def run(opt: CAPO, model: TinyPolicy, args: dict[str, Any], good: dict[str, Any]) -> Any:
    """select on ``args``, then a step on the kept tokens with the loss of the well-formed
    ``good``; the mask and the statistics."""
    keep = opt.select(**{k: v for k, v in args.items() if k != "_x"})
    _, logits = model(good["_x"])
    policy_loss(logits, good["actions"], good["advantages"], keep).backward()
    opt.step()
    opt.zero_grad()
    return keep, dict(opt.stats)


def state_of(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def unchanged(model, opt, state) -> bool:
    params, saved = state
    if not all(torch.equal(p, q) for p, q in zip(model.parameters(), params)):
        return False
    now = opt.state_dict()
    return all(
        torch.equal(v, now["state"][k][n])
        if isinstance(v, torch.Tensor)
        else v == now["state"][k][n]
        for k, s in saved["state"].items()
        for n, v in s.items()
    )


def nan_at_masked(t, mask):
    t = t.clone()
    index = mask.nonzero()[0]
    t[tuple(index)] = float("nan")
    return t


def masked(args):
    return bool(args["mask"].any())


def unmasked(args):
    return bool((~args["mask"].bool()).any())


# (argument, corruption, expected: "error", "same" (the well-formed answer) or "empty", and a
# precondition on the case). ``expected`` may be a function of the case.
def E(case):  # an error if the head's models read the argument, else the same answer
    return "error" if case.models_inputs else "same"


def H(case):  # an error if a head reads the hidden states
    return "error" if case.head_reads_hidden else "same"


def L(case):  # logits of another width: refused where a head forms the policy; the policy's
    # forward then disagrees with them at the step (the whole model's models use its own)
    if case.form == "trust-region":
        return "step error: forward"
    return H(case)


def ANY(a):
    return True


def has_rows(a):
    return a["mask"].shape[0] > 0


def has_cols(a):
    return a["mask"].shape[1] > 0


def wider(t):
    return torch.cat([t, t[..., :1]], -1)


CORRUPTIONS: dict[str, tuple[str, Callable, Any, Callable]] = {
    "hidden 2-D": ("hidden", lambda a: a["hidden"][0], "error", ANY),
    "hidden wider": ("hidden", lambda a: wider(a["hidden"]), H, ANY),
    "hidden integer": ("hidden", lambda a: a["hidden"].long(), "error", ANY),
    "hidden NaN": ("hidden", lambda a: nan_at_masked(a["hidden"], a["mask"]), "error", masked),
    "hidden a list": ("hidden", lambda a: a["hidden"].tolist(), "error", ANY),
    "hidden non-contiguous": (
        "hidden",
        lambda a: a["hidden"].transpose(0, 1).contiguous().transpose(0, 1),
        "same",
        ANY,
    ),
    "actions float": ("actions", lambda a: a["actions"].float(), "error", ANY),
    "actions bool": ("actions", lambda a: a["actions"] > 0, "error", ANY),
    "actions int8": ("actions", lambda a: a["actions"].to(torch.int8), "same", ANY),
    "actions uint8": ("actions", lambda a: a["actions"].to(torch.uint8), "same", ANY),
    "actions int16": ("actions", lambda a: a["actions"].to(torch.int16), "same", ANY),
    "actions too large": (
        "actions",
        lambda a: torch.where(a["mask"], 11, a["actions"]),
        "error",
        masked,
    ),
    "actions negative": (
        "actions",
        lambda a: torch.where(a["mask"], -1, a["actions"]),
        "error",
        masked,
    ),
    "actions out of range unmasked": (
        "actions",
        lambda a: torch.where(a["mask"], a["actions"], -100),
        "same",
        unmasked,
    ),
    "actions wrong shape": ("actions", lambda a: a["actions"][:, :-1], "error", has_cols),
    "advantages NaN": ("advantages", lambda a: a["advantages"] * float("nan"), "error", ANY),
    "advantages inf": ("advantages", lambda a: a["advantages"] + float("inf"), "error", ANY),
    "advantages 1e30": ("advantages", lambda a: torch.full_like(a["advantages"], 1e30), E, masked),
    "advantages integer": ("advantages", lambda a: a["advantages"].long(), "error", ANY),
    "advantages wrong shape": ("advantages", lambda a: a["advantages"][:-1], "error", has_rows),
    "advantages per token": (
        "advantages",
        lambda a: a["advantages"][:, None].expand(a["mask"].shape).contiguous(),
        "same",
        ANY,
    ),
    "mask float": ("mask", lambda a: a["mask"].float(), "error", ANY),
    "mask wrong shape": ("mask", lambda a: a["mask"][:-1], "error", has_rows),
    "mask integer": ("mask", lambda a: a["mask"].long(), "same", ANY),
    "mask uint8": ("mask", lambda a: a["mask"].to(torch.uint8), "same", ANY),
    "mask empty": ("mask", lambda a: torch.zeros_like(a["mask"]), "empty", ANY),
    "logits wider": ("logits", lambda a: wider(a["logits"]), L, masked),
    "logits NaN": ("logits", lambda a: nan_at_masked(a["logits"], a["mask"]), "error", masked),
    "logits NaN unmasked": (
        "logits",
        lambda a: nan_at_masked(a["logits"], ~a["mask"]),
        "same",
        unmasked,
    ),
    "logits integer": ("logits", lambda a: a["logits"].long(), "error", ANY),
    "logits wrong shape": ("logits", lambda a: a["logits"][:, :-1], "error", has_cols),
    "no rows": ("*", lambda a: "B=0", "empty", ANY),
    "no tokens per row": ("*", lambda a: "T=0", "empty", ANY),
}


@st.composite
def cases(draw, form: str):
    seed = draw(st.integers(0, 2**16))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    torch.manual_seed(seed)
    model = TinyPolicy()
    opt = FORMS[form][0](model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g)
    h, logits = model(x)
    args = dict(
        hidden=h.detach(),
        actions=torch.randint(0, 11, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        mask=torch.rand(B, T, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0])),
        logits=logits.detach(),
        forward=(lambda m: m(x)[1]) if opt.model is model else None,
        _x=x,
    )
    return Case(args, model, opt, form)


def restricted(args: dict, rows: slice, cols: slice) -> dict:
    x = args["_x"][rows, cols]
    out = {
        k: v[rows, cols] for k, v in args.items() if k in ("hidden", "actions", "mask", "logits")
    }
    forward = None if args["forward"] is None else (lambda m: m(x)[1])
    return out | dict(advantages=args["advantages"][rows], forward=forward, _x=x)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
# a twentieth of the profile's examples for each of the forms × corruptions (2 in CI, 50 thorough)
@settings(max_examples=max(2, settings.default.max_examples // 20))
@given(data=st.data())
def test_a_bad_input_gets_a_clear_error_or_the_right_answer(form, corruption, data):
    case = data.draw(cases(form))
    name, corrupt, expected, applies = CORRUPTIONS[corruption]
    if not applies(case.args):
        return
    if callable(expected):
        expected = expected(case)
    good = dict(case.args)
    if name == "*":
        rows, cols = (0, None) if corrupt(good) == "B=0" else (None, 0)
        good = restricted(good, slice(rows), slice(cols))
        args = dict(good)
    else:
        args = dict(good, **{name: corrupt(good)})
    twin_model, twin_opt = copy.deepcopy((case.model, case.opt))
    before, stats = state_of(case.model, case.opt), dict(case.opt.stats)
    if expected == "error":
        with pytest.raises((TypeError, ValueError), match=rf"^{name}: "):
            run(case.opt, case.model, args, good)
        assert unchanged(case.model, case.opt, before)
        assert case.opt.stats == stats
        return
    if expected.startswith("step error"):
        with pytest.raises(ValueError, match=rf"^{expected.split(': ')[1]}: "):
            run(case.opt, case.model, args, good)
        assert unchanged(case.model, case.opt, before)
        return
    keep, stats = run(case.opt, case.model, args, good)
    assert keep.dtype == torch.bool and keep.shape == tuple(args["actions"].shape)
    if expected == "empty":
        assert not keep.any() and stats["tokens"] == 0 and stats["skipped_steps"] == 1
        assert unchanged(case.model, case.opt, before)
        return
    # the same answer as the well-formed input, on a twin
    want_keep, want_stats = run(twin_opt, twin_model, good, good)
    assert torch.equal(keep, want_keep)
    assert stats == want_stats
    assert all(torch.equal(p, q) for p, q in zip(case.model.parameters(), twin_model.parameters()))
