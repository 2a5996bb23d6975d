"""The token-level closed forms of each step model equal Δ formed elementwise, row by row."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import elementwise_token_change

from curvopt.heads.rank_one import rows_dot, token_logit_change
from curvopt.optimizers.rules import AdamStep, AffineStep, FrozenAdamStep, SignStep

F64 = torch.float64


def adam_state(rnd, shape, draw) -> dict:
    v = rnd(*shape).abs()
    return dict(
        param=rnd(*shape),
        exp_avg=rnd(*shape),
        exp_avg_sq=v,
        max_exp_avg_sq=v * 1.5,
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-3,
        weight_decay=0.1,
        decoupled=draw(st.booleans()),
        step=draw(st.integers(1, 5)),
        dtype=F64,
    )


@st.composite
def cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    kind = draw(st.sampled_from(["affine", "frozen", "sign", "adam"]))
    n, V = draw(st.integers(1, 4)), draw(st.integers(2, 7))
    H = 1 if kind == "frozen" else draw(st.integers(1, 5))  # one column: see the docstring
    K = draw(st.sampled_from([None, 1, 2]))
    K = None if K is None else min(K, V)
    steps = []
    for shape in ((V, H), (V,)):
        if kind == "affine":
            terms = ((float(rnd(1)), rnd(*shape)),) if draw(st.booleans()) else ()
            steps.append(AffineStep(float(rnd(1)), terms, F64))
        elif kind == "sign":
            steps.append(SignStep(float(rnd(1)), float(rnd(1)), rnd(*shape), F64))
        elif kind == "frozen":
            steps.append(FrozenAdamStep(**adam_state(rnd, shape, draw)))
        else:
            steps.append(AdamStep(**adam_state(rnd, shape, draw)))
    if not draw(st.booleans()):
        steps = steps[:1]
    rows = (
        None if K is None else torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    )
    return rnd(n, H), rnd(n), rnd(n, V if K is None else K), rows, steps


@given(case=cases())
def test_closed_form_equals_elementwise_step(case):
    """For a frozen Adam step the row-level saturation equals the elementwise one when the
    candidate-to-second-moment ratio is the same across the row — with one column, always."""
    h, coef, grad, rows, steps = case
    fast = token_logit_change(h, coef, grad, steps, rows)
    cv = -coef.unsqueeze(1) * grad
    slow = elementwise_token_change(steps[0], h, cv, rows)
    if len(steps) > 1:
        slow = slow + steps[1](cv, rows)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), H=st.integers(1, 6), V=st.integers(2, 6))
def test_frozen_adam_is_bounded_by_its_limit_and_linear_when_unsaturated(seed, n, H, V):
    g = torch.Generator().manual_seed(seed)
    h, coef = torch.randn(n, H, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    grad = torch.randn(n, V, generator=g, dtype=F64)
    hyper = dict(
        max_exp_avg_sq=None,
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=True,
        step=3,
        dtype=F64,
    )
    zero_m = torch.zeros(V, H, dtype=F64)  # no momentum: Δ is the candidate's share alone
    for scale, saturated in ((1e-24, True), (1e12, False)):
        v = torch.rand(V, H, generator=g, dtype=F64) * scale
        step = FrozenAdamStep(torch.randn(V, H, generator=g, dtype=F64), zero_m, v, **hyper)
        u = token_logit_change(h, coef, grad, [step], None)
        reach = step.limit * h.abs().sum(1, keepdim=True)
        assert (u.abs() <= reach * (1 + 1e-12)).all()
        linear = -coef.unsqueeze(1) * grad * rows_dot(step.parts()[0], h * h)
        if saturated:
            torch.testing.assert_close(u.abs(), reach.expand_as(u), rtol=1e-3, atol=0)
        else:
            torch.testing.assert_close(u, linear, rtol=1e-6, atol=0)
