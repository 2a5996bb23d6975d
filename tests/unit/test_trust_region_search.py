"""The scale search: measured KL within the bound, never needlessly small, few measurements."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from curvopt.trust_region.search import Search


def power_law(c, p):
    calls = []

    def measure(s):
        calls.append(s)
        return c * s**p

    return measure, calls


def test_a_step_within_the_bound_is_taken_whole_after_one_measurement():
    measure, calls = power_law(0.9e-3, 2.0)
    result = Search(1e-3).run(measure)
    assert (result.scale, calls) == (1.0, [1.0])
    assert result.kl == pytest.approx(0.9e-3)


def test_within_the_tolerance_is_within_the_bound():
    measure, calls = power_law(1.05e-3, 2.0)
    assert Search(1e-3, tolerance=1.1).run(measure).scale == 1.0
    assert calls == [1.0]


def test_a_quadratic_kl_is_hit_with_one_extrapolation():
    measure, calls = power_law(0.37, 2.0)
    result = Search(1e-3).run(measure)
    assert len(calls) == 2
    assert result.kl == pytest.approx(0.75e-3)
    assert result.scale == pytest.approx(math.sqrt(0.75e-3 / 0.37))
    assert result.unscaled_kl == pytest.approx(0.37)


@given(
    c=st.floats(1.2e-3, 1e3),
    p=st.floats(1.0, 4.0),
    bound=st.sampled_from([1e-5, 1e-3, 1e-1]),
)
def test_power_laws_end_inside_the_window(c, p, bound):
    measure, calls = power_law(c * bound / 1e-3, p)
    search = Search(bound)
    result = search.run(measure)
    assert result.scale is not None and result.scale < 1
    assert 0.5 * bound <= result.kl <= 1.1 * bound
    assert len(calls) <= search.max_trials


def test_the_learnt_exponent_saves_measurements_on_the_next_step():
    search = Search(1e-3)
    first, calls = power_law(50.0, 1.3)
    search.run(first)
    assert len(calls) > 2
    second, calls = power_law(80.0, 1.3)
    result = search.run(second)
    assert len(calls) == 2 and 0.5e-3 <= result.kl <= 1.1e-3
    assert search.state_dict()["exponent"] == pytest.approx(1.3, rel=0.2)


@pytest.mark.parametrize("bad_at", [1.0, "second"])
def test_a_non_finite_measurement_means_no_step(bad_at):
    def measure(s):
        if bad_at == 1.0 or s < 1:
            return math.nan
        return 1.0

    result = Search(1e-3).run(measure)
    assert result.scale is None


def test_without_a_safe_scale_no_step_is_taken():
    # a KL that never comes down (a policy that moves whatever the scale)
    result = Search(1e-3, max_trials=3).run(lambda s: 1.0)
    assert result.scale is None and len(result.trials) == 3


def test_the_largest_safe_scale_is_kept_when_the_window_is_missed():
    # a discontinuous KL: 0.3 of the bound up to s = 0.5, then far above
    def measure(s):
        return 0.3e-3 if s <= 0.5 else 1.0

    result = Search(1e-3, max_trials=6).run(measure)
    assert result.scale is not None and result.scale <= 0.5
    assert result.kl == 0.3e-3
    assert result.scale == max(s for s, m in result.trials if m <= 1.1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"bound": 0.0}, {"bound": -1.0}, {"bound": math.inf}, {"bound": math.nan},
     {"bound": 1e-3, "floor": 0.9, "target": 0.8}, {"bound": 1e-3, "tolerance": 0.9},
     {"bound": 1e-3, "max_trials": 1}],
)  # fmt: skip
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        Search(**kwargs)
