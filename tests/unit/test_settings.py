"""CAPO's options are declared once: every signature, the TRL config and the docs derive from it."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from curvopt import CAPO, CurvatureTracker, SampleRejector
from curvopt.settings import DEFAULTS, CAPOSettings, options_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cls", [CAPO, CurvatureTracker, SampleRejector])
def test_signature_defaults_are_the_declared_ones(cls):
    parameters = inspect.signature(cls).parameters
    shared = [f.name for f in fields(CAPOSettings) if f.name in parameters]
    assert shared
    for name in shared:
        assert parameters[name].default == getattr(DEFAULTS, name), name


def test_capo_takes_every_option():
    parameters = inspect.signature(CAPO).parameters
    assert {f.name for f in fields(CAPOSettings)} <= set(parameters)


def test_the_docs_carry_the_generated_options_table():
    assert options_table() in (ROOT / "docs" / "api.md").read_text()


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(rule="paper"), ValueError, "rule"),
        (dict(delta_f=float("nan")), ValueError, "delta_f"),
        (dict(levels="token"), TypeError, "levels"),
        (dict(levels=("token", "token")), ValueError, "levels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(max_policy_shift=-1.0), ValueError, "max_policy_shift"),
        (dict(step_reject_frac=0.1), ValueError, "step_reject_frac"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        CAPOSettings(**kwargs)


def test_the_trl_config_derives_its_capo_fields():
    pytest.importorskip("trl")
    from curvopt.integrations.trl import OPTIONS, CAPOConfig

    declared = {f.name: f for f in fields(CAPOSettings)}
    derived = {f.name: f for f in fields(CAPOConfig) if f.name.startswith("capo_")}
    for name in OPTIONS:
        f = derived["capo_" + name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        # a sequence option is a list on the command line
        expected = list(declared[name].default) if name == "levels" else declared[name].default
        assert default == expected
        assert f.metadata["help"]
