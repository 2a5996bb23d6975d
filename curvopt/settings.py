"""CAPO's options, declared once: type, default, check and help text of each.

:class:`CAPOSettings` is the single declaration. :class:`curvopt.CAPO` validates its keyword
arguments through it (and :class:`~curvopt.SampleRejector`, :class:`~curvopt.CurvatureTracker` and
the logit transform check theirs with the same per-option checks); integrations derive their
command-line fields from it (:class:`curvopt.integrations.trl.CAPOConfig` has ``capo_<name>`` for
each option it exposes) and docs/api.md carries :func:`options_table`.

Help texts may refer to another option as ``{p}name``: ``{p}`` is the prefix the consumer gives
its options (``capo_`` on TRL's command line, nothing for ``CAPO``'s own arguments).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from .quadratic import LEVELS, Fisher, Level
from .validation import (
    check_choice,
    check_distinct,
    check_finite,
    check_fraction,
    check_optional_positive,
    check_positive,
    check_positive_bound,
    check_top_k,
)

__all__ = [
    "DEFAULTS",
    "CAPOSettings",
    "Direction",
    "Rule",
    "check",
    "help_text",
    "option_types",
    "options_table",
]

Rule = Literal["theorem", "symmetric"]
Direction = Literal["exact", "frozen", "shadow"]
Check = Callable[[str, Any], Any]


def _meta(check: Check, help: str) -> dict[str, Any]:
    return {"check": check, "help": help}


def _choice(literal: Any) -> Check:
    return lambda name, value: check_choice(name, value, get_args(literal))


def _levels(name: str, value: Any) -> tuple[Level, ...]:
    return check_distinct(name, value, LEVELS)


def _flag(name: str, value: Any) -> bool:
    return bool(value)


@dataclass(frozen=True)
class CAPOSettings:
    """The options of :class:`curvopt.CAPO` (all but the objects: optimizer, head, model,
    params, process group), validated and normalised on construction. See the ``help`` of each
    field (:func:`help_text`), or the table in docs/api.md."""

    rule: Rule = field(
        default="theorem",
        metadata=_meta(
            _choice(Rule),
            "Acceptance rule. 'theorem': keep a candidate when its objective shift m_H >= "
            "{p}delta_h and its policy shift m_F <= {p}delta_f (Theorem 5.1 of Melo et al., "
            "https://arxiv.org/abs/2510.00819). 'symmetric': keep when |m_H| < {p}delta_h and "
            "m_F < {p}delta_f (the paper's experiments, with {p}delta_h=1e-2 and {p}delta_f=1e-4).",
        ),
    )
    delta_h: float = field(
        default=0.0,
        metadata=_meta(check_finite, "Threshold on the predicted objective shift m_H (δ_H)."),
    )
    delta_f: float = field(
        default=1e-4,
        metadata=_meta(
            check_finite, "Threshold on the predicted policy shift m_F, about a KL (δ_F)."
        ),
    )
    levels: Sequence[Level] = field(
        default=("token",),
        metadata=_meta(
            _levels,
            "Candidate levels, applied in turn to the survivors of the previous one: any of "
            "'token', 'sequence', 'batch'. None of them: nothing is modelled or rejected (the "
            "curvature-aware step alone, with {p}max_policy_shift).",
        ),
    )
    top_k: int | None = field(
        default=None,
        metadata=_meta(
            check_top_k,
            "Restrict each token's softmax to its K largest logits in the quadratic model (the "
            "paper's reference code used 50); None for the full vocabulary.",
        ),
    )
    fisher: Fisher = field(
        default="empirical",
        metadata=_meta(
            _choice(Fisher),
            "Fisher matrix of the policy shift: 'empirical' (the score outer product, as the "
            "paper's code) or 'true' (the softmax Fisher: the second-order KL of the update).",
        ),
    )
    direction: Direction = field(
        default="frozen",
        metadata=_meta(
            _choice(Direction),
            "How a candidate's update is formed: 'exact' (a copy of the real optimizer step), "
            "'frozen' (Adam's second moment held fixed, exact on each token's action and top "
            "rows) or 'shadow' (frozen, over Adam moments curvopt keeps itself, for optimizers "
            "other than torch SGD/Adam/AdamW).",
        ),
    )
    temperature: float = field(
        default=1.0,
        metadata=_meta(
            check_positive,
            "The policy is softmax(φ(head(h))) with φ(z) = softcap·tanh(logit_scale·z/softcap)/"
            "temperature: the temperature the loss divides the logits by.",
        ),
    )
    logit_scale: float = field(
        default=1.0,
        metadata=_meta(
            check_positive, "The multiplier the model applies to its head's outputs (φ)."
        ),
    )
    softcap: float | None = field(
        default=None,
        metadata=_meta(
            check_optional_positive, "The model's logit soft-cap (φ); None: no soft-cap."
        ),
    )
    track_realised: bool = field(
        default=False,
        metadata=_meta(
            _flag,
            "After each step, measure the update's exact KL on the kept tokens "
            "(policy_shift_realised) beside its quadratic model (policy_shift_step_model).",
        ),
    )
    max_policy_shift: float | None = field(
        default=None,
        metadata=_meta(
            check_positive_bound,
            "The curvature-aware step: scale each step's learning rate so that the predicted mean "
            "KL of the update about to be taken, over the kept tokens, stays within this bound "
            "(step_policy_shift, step_scale). None: off.",
        ),
    )
    step_reject_frac: float = field(
        default=0.0,
        metadata=_meta(
            check_fraction,
            "With {p}max_policy_shift, before scaling a step whose predicted shift exceeds the "
            "bound, reject at most this fraction of each micro-batch's kept tokens: those whose "
            "own predicted KL is above the bound, largest first (needs step(closure); "
            "step_rejected).",
        ),
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        if self.step_reject_frac > 0 and self.max_policy_shift is None:
            raise ValueError(
                "step_reject_frac: rejects tokens of the step that max_policy_shift would scale; "
                "set max_policy_shift too"
            )


DEFAULTS = CAPOSettings()
_FIELDS = {f.name: f for f in fields(CAPOSettings)}


def check(name: str, value: Any) -> Any:
    """Option ``name``'s check: ``value`` normalised, or the error naming it."""
    return _FIELDS[name].metadata["check"](name, value)


def help_text(name: str, prefix: str = "") -> str:
    """Option ``name``'s help, naming the other options with ``prefix``."""
    return str(_FIELDS[name].metadata["help"]).format(p=prefix)


def option_types() -> dict[str, Any]:
    """The options' types, resolved."""
    return typing.get_type_hints(CAPOSettings)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " \\| ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (tuple, list, Sequence):
        return f"sequence of {_type_name(get_args(tp)[0])}"
    args = get_args(tp)
    if args:
        return " \\| ".join(_type_name(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def options_table() -> str:
    """The options as a Markdown table (name, type, default, meaning), as in docs/api.md."""
    types = option_types()
    rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(CAPOSettings):
        assert f.default is not MISSING
        meaning = help_text(f.name).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_type_name(types[f.name])} | `{f.default!r}` | {meaning} |")
    return "\n".join(rows) + "\n"
