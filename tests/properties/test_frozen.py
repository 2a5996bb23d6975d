"""The frozen direction's error against the exact candidate update, on trained Adam states."""

from __future__ import annotations

import pytest
from frozen_error import compare


@pytest.mark.parametrize(
    "setting",
    [
        dict(V=64, H=32, n_tokens=256, steps=20, lr=1e-3, scale=1.0),
        dict(V=256, H=32, n_tokens=256, steps=20, lr=1e-3, scale=4.0),
    ],
)
def test_frozen_policy_shift_is_close_to_exact_after_training(setting):
    r = compare(**setting)
    assert 0.95 < r["mF_ratio_median"] < 1.1
    assert 0.9 < r["mF_ratio_p10"] and r["mF_ratio_p90"] < 1.5
    assert r["mH_relerr_median"] < 0.05
    assert r["rule_disagreement"] < 0.02


def test_frozen_first_step_is_adams_sign_step():
    r = compare(V=256, H=32, n_tokens=128, steps=0, lr=1e-3, scale=4.0)
    assert 0.99 < r["mF_ratio_p10"] and r["mF_ratio_p90"] < 1.01
