"""Bad input gets a clear error naming the argument, raised before any state changes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyPolicy, make_batch, train_step

from curvopt import CAPO, CurvatureTracker


def inputs():
    torch.manual_seed(0)
    model = TinyPolicy()
    batch = make_batch(0)
    with torch.no_grad():
        h, logits = model(batch["x"])
    return model, dict(
        hidden=h,
        actions=batch["actions"],
        advantages=batch["advantages"],
        mask=batch["mask"],
        logits=logits,
    )


def nan_at(t, index=(0, 0)):
    t = t.clone()
    t[index] = float("nan")
    return t


CASES = [
    ("hidden", lambda a: a["hidden"][0], ValueError),
    ("hidden", lambda a: a["hidden"].long(), TypeError),
    ("hidden", lambda a: nan_at(a["hidden"]), ValueError),
    ("actions", lambda a: a["actions"][:, :-1], ValueError),
    ("actions", lambda a: a["actions"].float(), TypeError),
    ("actions", lambda a: torch.where(a["mask"], 11, a["actions"]), ValueError),
    ("actions", lambda a: torch.where(a["mask"], -1, a["actions"]), ValueError),
    ("advantages", lambda a: a["advantages"][:-1], ValueError),
    ("advantages", lambda a: nan_at(a["advantages"], (0,)), ValueError),
    ("advantages", lambda a: a["advantages"].long(), TypeError),
    ("mask", lambda a: a["mask"][:-1], ValueError),
    ("mask", lambda a: a["mask"].float(), TypeError),
    ("logits", lambda a: a["logits"][..., :-1][:, :-1], ValueError),
    ("logits", lambda a: torch.where(a["mask"][..., None], float("inf"), a["logits"]), ValueError),
    ("hidden", lambda a: [[0.0]], TypeError),
]


@pytest.mark.parametrize("name, corrupt, error", CASES)
def test_bad_input_names_the_argument_and_changes_nothing(name, corrupt, error):
    model, args = inputs()
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        head=model.lm_head,
        rule="symmetric",
        delta_h=1e300,
        delta_f=1e300,
    )
    train_step(model, opt, make_batch(1))
    stats, state = opt.stats, copy.deepcopy(opt.state_dict())
    args[name] = corrupt(args)
    logits = args.pop("logits")
    with pytest.raises(error, match=name):
        opt.select(**args, logits=logits)
    assert opt.stats == stats
    after = opt.state_dict()
    for p, s in state["state"].items():
        assert all(torch.equal(s[k], after["state"][p][k]) for k in s)


def test_actions_outside_the_mask_are_not_checked():
    model, args = inputs()
    tracker = CurvatureTracker(model.lm_head, torch.optim.AdamW(model.parameters()))
    args["actions"] = torch.where(args["mask"], args["actions"], -100)
    qm = tracker.quadratic_model(**args)
    assert (qm.policy_shift[~args["mask"]] == 0).all()


def test_integer_mask_is_accepted():
    model, args = inputs()
    tracker = CurvatureTracker(model.lm_head, torch.optim.AdamW(model.parameters()))
    a = tracker.quadratic_model(**args)
    args["mask"] = args["mask"].long()
    b = tracker.quadratic_model(**args)
    torch.testing.assert_close(a.policy_shift, b.policy_shift)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(fisher="exact"), ValueError, "fisher"),
        (dict(direction="adam"), ValueError, "direction"),
    ],
)
def test_bad_tracker_settings_name_the_argument(kwargs, error, name):
    model = TinyPolicy()
    with pytest.raises(error, match=name):
        CurvatureTracker(model.lm_head, torch.optim.AdamW(model.parameters()), **kwargs)


def test_top_k_larger_than_the_vocabulary_is_rejected():
    model, args = inputs()
    tracker = CurvatureTracker(model.lm_head, torch.optim.AdamW(model.parameters()), top_k=12)
    with pytest.raises(ValueError, match="top_k"):
        tracker.quadratic_model(**args)


def test_unknown_level_is_rejected():
    model, args = inputs()
    tracker = CurvatureTracker(model.lm_head, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="level"):
        tracker.quadratic_model(**args, level="tokens")
