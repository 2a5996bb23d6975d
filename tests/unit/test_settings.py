"""CAPO's options are declared once: every signature, the TRL config and the docs derive from it."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from curvopt import CAPO, CurvatureTracker, SampleRejector
from curvopt.settings import (
    DEFAULT_MAX_POLICY_SHIFT,
    DEFAULTS,
    MODEL_FORM,
    CAPOSettings,
    options_table,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cls", [CAPO, CurvatureTracker, SampleRejector])
def test_signature_defaults_are_the_declared_ones(cls):
    parameters = inspect.signature(cls).parameters
    shared = [f.name for f in fields(CAPOSettings) if f.name in parameters]
    assert shared
    for name in shared:
        if cls is CAPO and name in MODEL_FORM:
            continue  # resolved by the form CAPO is built in: see the next test
        assert parameters[name].default == getattr(DEFAULTS, name), name


def test_capo_defaults_follow_the_form_it_is_built_in():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    opt = torch.optim.AdamW(model.parameters())
    with_head = CAPO(opt, head=model[1]).settings
    assert (with_head.levels, with_head.max_policy_shift) == (("token",), None)
    alone = CAPO(opt, model=model).settings
    assert (alone.levels, alone.max_policy_shift) == ((), DEFAULT_MAX_POLICY_SHIFT)
    assert {k: getattr(alone, k) for k in MODEL_FORM} == MODEL_FORM
    explicit = CAPO(opt, model=model, levels=(), max_policy_shift=None).settings
    assert explicit.max_policy_shift is None


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
    from curvopt.integrations.trl import CONFIG_DEFAULTS, OPTIONS, CAPOConfig

    derived = {f.name: f for f in fields(CAPOConfig) if f.name.startswith("capo_")}
    for name in OPTIONS:
        f = derived["capo_" + name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        # TRL has the model: its defaults are the model form's (the trust region); a sequence
        # option is a list on the command line
        assert CONFIG_DEFAULTS[name] == MODEL_FORM.get(name, getattr(DEFAULTS, name))
        expected = list(CONFIG_DEFAULTS[name]) if name == "levels" else CONFIG_DEFAULTS[name]
        assert default == expected
        assert f.metadata["help"]
