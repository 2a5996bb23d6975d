"""The closed forms equal the torch.func generic path and the autograd + deepcopy definition."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import oracle
from problems import problems
from torch import nn

from curvopt import CurvatureTracker

LEVELS = st.sampled_from(["token", "sequence", "batch"])
TOL = dict(rtol=1e-8, atol=1e-10)


def at_candidates(qm, cands, key_tokens):
    """The tracker's values in the oracle's candidate order."""
    values = []
    for c in cands:
        b, t = c["tokens"][0]
        if qm.level == "token":
            idx = (b, t)
        elif qm.level == "sequence":
            idx = (b,)
        else:
            idx = ()
        values.append(torch.stack([getattr(qm, k)[idx] for k in key_tokens]))
    return torch.stack(values) if values else torch.zeros(0, len(key_tokens), dtype=torch.float64)


def expected(cands, fisher):
    key = "policy_empirical" if fisher == "empirical" else "policy_true"
    rows = [torch.stack([c["first_order"], c["second_order"], c[key]]) for c in cands]
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


@given(
    problem=problems(),
    level=LEVELS,
    fisher=st.sampled_from(["empirical", "true"]),
    top_k=st.sampled_from([None, 1, 2, 3]),
)
def test_exact_closed_forms_match_oracle_and_generic_path(problem, level, fisher, top_k):
    p = problem
    top_k = None if top_k is None else min(top_k, p.head.out_features)
    fast = CurvatureTracker(p.head, p.optimizer, top_k=top_k, fisher=fisher, direction="exact")
    generic = CurvatureTracker(
        nn.Sequential(p.head), p.optimizer, top_k=top_k, fisher=fisher, direction="exact"
    )
    assert fast.linear and not generic.linear
    args = (p.hidden, p.actions, p.advantages, p.mask)
    q_fast = fast.quadratic_model(*args, level=level)
    q_generic = generic.quadratic_model(*args, level=level)
    cands = oracle(p.head, p.optimizer, *args, level=level, top_k=top_k)
    keys = ("first_order", "second_order", "policy_shift")
    want = expected(cands, fisher)
    torch.testing.assert_close(at_candidates(q_fast, cands, keys), want, **TOL)
    torch.testing.assert_close(at_candidates(q_generic, cands, keys), want, **TOL)
    assert int(q_fast.candidates.sum()) == len(cands)


@given(
    # shadow moments model Adam: curvopt refuses them for SGD (test_optimizer_support.py)
    problem=problems(kinds=("adam", "adamw")),
    level=st.sampled_from(["sequence", "batch"]),
    top_k=st.sampled_from([None, 2]),
)
def test_shadow_closed_forms_match_generic_path(problem, level, top_k):
    p = problem
    top_k = None if top_k is None else min(top_k, p.head.out_features)
    fast = CurvatureTracker(p.head, p.optimizer, top_k=top_k, direction="shadow")
    generic = CurvatureTracker(nn.Sequential(p.head), p.optimizer, top_k=top_k, direction="shadow")
    for tracker in (fast, generic):
        for param in p.head.parameters():
            param.grad = torch.ones_like(param)
        tracker.observe_step()
    p.optimizer.zero_grad()
    args = (p.hidden, p.actions, p.advantages, p.mask)
    a = fast.quadratic_model(*args, level=level)
    b = generic.quadratic_model(*args, level=level)
    for key in ("first_order", "second_order", "policy_shift"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), **TOL)


@given(problem=problems(kinds=("sgd",)), level=LEVELS)
def test_frozen_is_exact_for_sgd(problem, level):
    p = problem
    args = (p.hidden, p.actions, p.advantages, p.mask)
    exact = CurvatureTracker(p.head, p.optimizer, direction="exact").quadratic_model(
        *args, level=level
    )
    frozen = CurvatureTracker(p.head, p.optimizer, direction="frozen").quadratic_model(
        *args, level=level
    )
    for key in ("first_order", "second_order", "policy_shift"):
        torch.testing.assert_close(getattr(exact, key), getattr(frozen, key), **TOL)


class SoftCapHead(nn.Module):
    """A non-linear head: logits = c·tanh((W h + b)/c) (a logit soft-cap)."""

    def __init__(self, linear: nn.Linear, cap: float) -> None:
        super().__init__()
        self.linear, self.cap = linear, cap

    def forward(self, h):
        return self.cap * torch.tanh(self.linear(h) / self.cap)


@given(problem=problems(), level=LEVELS, top_k=st.sampled_from([None, 2]))
def test_generic_path_is_exact_for_a_nonlinear_head(problem, level, top_k):
    """The second logit derivative (v·r) enters the Hessian term for a non-linear head."""
    p = problem
    head = SoftCapHead(p.head, cap=1.5)
    top_k = None if top_k is None else min(top_k, p.head.out_features)
    tracker = CurvatureTracker(head, p.optimizer, top_k=top_k, fisher="true", direction="exact")
    args = (p.hidden, p.actions, p.advantages, p.mask)
    qm = tracker.quadratic_model(*args, level=level)
    cands = oracle(head, p.optimizer, *args, level=level, top_k=top_k)
    keys = ("first_order", "second_order", "policy_shift")
    torch.testing.assert_close(at_candidates(qm, cands, keys), expected(cands, "true"), **TOL)


class TransformedHead(nn.Module):
    """φ(W h + b) with φ(z) = c·tanh(s·z/c)/τ (or s·z/τ): the policy a trainer samples from."""

    def __init__(self, linear: nn.Linear, scale: float, softcap: float | None, temperature: float):
        super().__init__()
        self.linear, self.scale, self.softcap, self.temperature = (
            linear,
            scale,
            softcap,
            temperature,
        )

    def forward(self, h):
        z = self.linear(h) * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


@given(
    problem=problems(),
    level=LEVELS,
    fisher=st.sampled_from(["empirical", "true"]),
    top_k=st.sampled_from([None, 2]),
    transform=st.sampled_from(
        [(1.0, None, 0.7), (2.0, None, 1.3), (1.0, 1.5, 1.0), (0.5, 2.0, 0.6)]
    ),
    direction=st.sampled_from(["exact", "frozen"]),
)
def test_logit_transform_matches_the_transformed_policy(
    problem, level, fisher, top_k, transform, direction
):
    """Temperature, logit scale and soft-cap: the fast path equals the generic path and (exact)
    the oracle, both run on a head that applies the transform itself."""
    p = problem
    scale, softcap, temperature = transform
    top_k = None if top_k is None else min(top_k, p.head.out_features)
    kw = dict(top_k=top_k, fisher=fisher, direction="exact")
    fast = CurvatureTracker(
        p.head, p.optimizer, temperature=temperature, logit_scale=scale, softcap=softcap, **kw
    )
    wrapped = TransformedHead(p.head, scale, softcap, temperature)
    generic = CurvatureTracker(wrapped, p.optimizer, **kw)
    args = (p.hidden, p.actions, p.advantages, p.mask)
    a = fast.quadratic_model(*args, level=level)
    b = generic.quadratic_model(*args, level=level)
    cands = oracle(wrapped, p.optimizer, *args, level=level, top_k=top_k)
    keys = ("first_order", "second_order", "policy_shift")
    torch.testing.assert_close(at_candidates(a, cands, keys), expected(cands, fisher), **TOL)
    torch.testing.assert_close(at_candidates(b, cands, keys), expected(cands, fisher), **TOL)
