"""SampleRejector: the rules, and levels applied in order on the survivors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import problems

from curvopt import CurvatureTracker, QuadraticModel, SampleRejector


def model(m_h, m_f):
    m_h, m_f = torch.tensor(m_h), torch.tensor(m_f)
    cand = torch.ones_like(m_h, dtype=torch.bool)
    return QuadraticModel(m_h, torch.zeros_like(m_h), m_f, cand, "token")


def test_theorem_rule_keeps_m_h_at_least_delta_h_and_m_f_at_most_delta_f():
    r = SampleRejector("theorem", delta_h=0.0, delta_f=1e-4)
    qm = model([0.0, 1.0, -1e-9, 1.0], [1e-4, 0.0, 0.0, 2e-4])
    assert r.accept(qm).tolist() == [True, True, False, False]


def test_symmetric_rule_is_strict_on_both_sides():
    r = SampleRejector("symmetric", delta_h=1e-2, delta_f=1e-4)
    qm = model([0.0, -0.005, 1e-2, 0.0], [0.0, 5e-5, 0.0, 1e-4])
    assert r.accept(qm).tolist() == [True, True, False, False]


def test_non_candidates_are_never_accepted():
    qm = model([0.0, 0.0], [0.0, 0.0])
    qm.candidates[1] = False
    assert SampleRejector().accept(qm).tolist() == [True, False]


@given(
    problem=problems(kinds=("adam", "adamw")),
    levels=st.permutations(["token", "sequence", "batch"]).map(tuple),
    delta_f=st.sampled_from([1e-6, 1e-3, 1.0]),
)
def test_levels_apply_in_order_on_the_survivors(problem, levels, delta_f):
    p = problem
    tracker = CurvatureTracker(p.head, p.optimizer, direction="exact")
    args = (p.hidden, p.actions, p.advantages)
    rejector = SampleRejector("theorem", delta_h=-1e-3, delta_f=delta_f, levels=levels)
    selection = rejector.select(tracker, *args, p.mask)
    keep = p.mask.clone()
    for level, (qm, _) in zip(levels, selection.models, strict=True):
        direct = tracker.quadratic_model(*args, keep, level=level)
        torch.testing.assert_close(qm.policy_shift, direct.policy_shift)
        assert torch.equal(qm.candidates, direct.candidates)
        ok = rejector.accept(direct)
        keep = keep & (ok.unsqueeze(1) if level == "sequence" else ok)
    assert torch.equal(selection.keep, keep)
    assert not (selection.keep & ~p.mask).any()


@given(problem=problems(kinds=("adamw",)))
def test_a_rejected_sequence_removes_all_its_tokens(problem):
    p = problem
    tracker = CurvatureTracker(p.head, p.optimizer, direction="exact")
    rejector = SampleRejector("theorem", delta_h=0.0, delta_f=-1.0, levels=("sequence",))
    keep = rejector.select(tracker, p.hidden, p.actions, p.advantages, p.mask).keep
    assert not keep.any()


@given(problem=problems(kinds=("adamw",)))
def test_no_levels_keeps_the_mask_and_still_validates(problem):
    p = problem
    tracker = CurvatureTracker(p.head, p.optimizer)
    selection = SampleRejector(levels=()).select(tracker, p.hidden, p.actions, p.advantages, p.mask)
    assert torch.equal(selection.keep, p.mask.bool()) and selection.models == []
    actions = p.actions.clone()
    actions[0, 0] = -1
    mask = p.mask.clone()
    mask[0, 0] = True
    with pytest.raises(ValueError, match="actions"):
        SampleRejector(levels=()).select(tracker, p.hidden, actions, p.advantages, mask)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(rule="strict"), ValueError, "rule"),
        (dict(delta_h=float("nan")), ValueError, "delta_h"),
        (dict(delta_f="1e-4"), TypeError, "delta_f"),
        (dict(levels="token"), TypeError, "levels"),
        (dict(levels=("token", "token")), ValueError, "levels"),
        (dict(levels=("tokens",)), ValueError, "levels"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        SampleRejector(**kwargs)
