"""The token-level closed forms of each step model equal Δ formed elementwise, row by row."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt.directions import AdamStep, AffineStep, FrozenAdamStep, SignStep
from curvopt.tracker import _elementwise_token_change, _token_logit_change


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    n, H, V = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(2, 7))
    K = draw(st.sampled_from([None, 1, 2]))
    K = None if K is None else min(K, V)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kind = draw(st.sampled_from(["affine-scalar", "affine-tensor", "frozen", "sign", "adam"]))
    if kind == "frozen":
        H = 1  # one column: the row-level saturation is the elementwise one
    drift = draw(st.booleans())
    steps = []
    for shape in ((V, H), (V,)):
        d = rnd(*shape) if drift else None
        if kind == "affine-scalar":
            steps.append(AffineStep(d, float(rnd(1))))
        elif kind == "affine-tensor":
            steps.append(AffineStep(d, rnd(*shape)))
        elif kind == "frozen":
            steps.append(FrozenAdamStep(d, rnd(*shape), float(rnd(1).abs()) + 0.1))
        elif kind == "sign":
            steps.append(SignStep(d, float(rnd(1))))
        else:
            v = rnd(*shape).abs()
            steps.append(
                AdamStep(
                    rnd(*shape),
                    rnd(*shape),
                    v,
                    v * 1.5,
                    0.1,
                    0.9,
                    0.99,
                    1e-3,
                    0.1,
                    draw(st.booleans()),
                    draw(st.integers(0, 5)),
                )
            )
    if not draw(st.booleans()):
        steps = steps[:1]
    h, coef = rnd(n, H), rnd(n)
    rows = (
        None if K is None else torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    )
    v = rnd(n, V if K is None else K)
    return h, coef, v, rows, steps


@given(case=cases())
def test_closed_form_equals_elementwise_step(case):
    h, coef, v, rows, steps = case
    fast = _token_logit_change(h, coef, v, rows, steps)
    cv = -coef.unsqueeze(1) * v
    slow = _elementwise_token_change(steps[0], h, cv, rows)
    if len(steps) > 1:
        slow = slow + steps[1](cv, slice(None) if rows is None else rows)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@given(case=cases(), limit=st.sampled_from([1e-3, 1.0, 1e3]))
def test_frozen_adam_saturation_is_bounded_and_linear_when_unsaturated(case, limit):
    h, coef, v, rows, _ = case
    V = v.shape[1] if rows is None else int(rows.max()) + 1
    step = FrozenAdamStep(None, torch.rand(V, h.shape[1], dtype=torch.float64) + 0.1, limit)
    u = _token_logit_change(h, coef, v, rows, [step])
    reach = limit * h.abs().sum(1, keepdim=True)
    assert (u.abs() <= reach * (1 + 1e-12)).all()
    linear = AffineStep(None, step.coef)
    small = FrozenAdamStep(None, step.coef, 1e12)
    torch.testing.assert_close(
        _token_logit_change(h, coef, v, rows, [small]),
        _token_logit_change(h, coef, v, rows, [linear]),
    )
