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
    "DEFAULT_MAX_POLICY_SHIFT",
    "MODEL_FORM",
    "CAPOSettings",
    "Direction",
    "Rule",
    "ShiftEstimate",
    "check",
    "help_text",
    "option_types",
    "options_table",
]

Rule = Literal["theorem", "symmetric"]
Direction = Literal["exact", "frozen", "shadow"]
ShiftEstimate = Literal["measured", "jvp"]
Check = Callable[[str, Any], Any]

#: The bound on the policy's mean per-token KL per step that ``CAPO(optimizer, model=model)``
#: applies when none is given (docs/results.md says where it comes from).
DEFAULT_MAX_POLICY_SHIFT = 3e-4


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
            "The trust region: the bound on the policy's mean per-token KL of each optimizer step, "
            "over the kept tokens. Each step is taken at the scale s ≤ 1 of its update that keeps "
            "the KL within the bound (step_scale; step_policy_shift is the KL of the whole step, "
            "policy_shift_realised that of the step taken). None: off.",
        ),
    )
    shift_estimate: ShiftEstimate = field(
        default="measured",
        metadata=_meta(
            _choice(ShiftEstimate),
            "How the step's KL is known. 'measured': exactly, by forwards of the step's own "
            "micro-batches at trial points (the whole policy, any model, kernel, optimizer or "
            "sharding). 'jvp': predicted by the quadratic model ½ΔθᵀF̄Δθ of the tracked "
            "parameters (the head's closed forms, or one forward-mode pass over the model).",
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
        if self.step_reject_frac > 0 and self.shift_estimate != "jvp":
            raise ValueError(
                "step_reject_frac: needs each token's predicted KL under the step, "
                "shift_estimate='jvp'"
            )


DEFAULTS = CAPOSettings()
#: Defaults of the options that depend on how CAPO is built: from the model alone
#: (``CAPO(optimizer, model=model)``, the whole-policy trust region) they are these; with a head
#: (``CAPO(optimizer, head=...)``, the paper's token rejection) they are :data:`DEFAULTS`'.
MODEL_FORM: dict[str, Any] = {"levels": (), "max_policy_shift": DEFAULT_MAX_POLICY_SHIFT}
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
        default = f"`{f.default!r}`"
        if f.name in MODEL_FORM:
            default = f"{default} with a head, `{MODEL_FORM[f.name]!r}` from the model alone"
        rows.append(f"| `{f.name}` | {_type_name(types[f.name])} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"
