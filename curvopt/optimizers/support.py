"""Which optimizers curvopt models, and how: the support rule.

Every ``torch.optim.Optimizer`` works with the measured trust region (it only needs the step the
optimizer takes). The models of the output layer's candidate updates (token rejection, the
``"jvp"`` estimate) need the update rule of the optimizer, which curvopt reads from its state for
the torch optimizers it *recognises*: an instance of a torch class, or of a subclass that does not
override ``step`` (``class MyAdamW(torch.optim.AdamW): pass``), with the class's own update:

- closed forms (:mod:`~curvopt.optimizers.rules`): :data:`CLOSED_FORM` = SGD, Adam, AdamW;
- elementwise (:mod:`~curvopt.optimizers.copied`, exact by stepping a copy of the optimizer on the
  rows needed): :data:`ELEMENTWISE` = Adadelta, Adagrad, Adamax, ASGD, NAdam, RAdam, RMSprop,
  Rprop.

Any other optimizer (LBFGS, Adafactor, Muon, SparseAdam, a subclass overriding ``step``, a class of
another library) is not modelled: asking for a model of it raises :class:`TypeError` naming
``optimizer`` and pointing to the trust region, except with ``direction="shadow"``, which models
Adam's update with moments curvopt keeps itself (:func:`check_shadow`).
"""

from __future__ import annotations

import inspect
import math
from numbers import Real
from typing import Any

import torch

__all__ = [
    "CLOSED_FORM",
    "ELEMENTWISE",
    "check_modelled",
    "check_shadow",
    "describe",
    "is_modelled",
    "recognised",
]

CLOSED_FORM: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)
ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adadelta,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
)
_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def _step_of(cls: type[torch.optim.Optimizer]) -> Any:
    # torch wraps ``step`` (profiling hooks, no_grad): compare the functions underneath
    return inspect.unwrap(cls.step)


def recognised(optimizer: torch.optim.Optimizer) -> type[torch.optim.Optimizer] | None:
    """The torch class whose update ``optimizer`` takes (its own class or the first torch class
    above it that curvopt models, provided ``step`` is that class's), else None."""
    cls = type(optimizer)
    for known in cls.__mro__:
        if known in CLOSED_FORM or known in ELEMENTWISE:
            return known if _step_of(cls) is _step_of(known) else None
    return None


def is_modelled(optimizer: torch.optim.Optimizer) -> bool:
    """Whether curvopt reads ``optimizer``'s update rule from its state."""
    return recognised(optimizer) is not None


def describe(optimizer: torch.optim.Optimizer) -> str:
    """``module.Class`` of ``optimizer``."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(c.__name__ for c in classes)


TRUST_REGION_HINT = (
    "For any optimizer, bound the whole policy's measured KL per step instead: "
    "CAPO(optimizer, model=model) (the measured trust region, levels=(), max_policy_shift=...)"
)


def check_modelled(optimizer: torch.optim.Optimizer, why: str) -> None:
    """Raise :class:`TypeError` naming ``optimizer`` if its update rule cannot be read; ``why``
    says what needs it."""
    if is_modelled(optimizer):
        return
    raise TypeError(
        f"optimizer: {why} needs the update rule of the optimizer, which curvopt reads from the "
        f"state of torch.optim.{_names(CLOSED_FORM)} (closed forms) and {_names(ELEMENTWISE)} "
        "(and of subclasses that do not override step); got "
        f"{describe(optimizer)}. {TRUST_REGION_HINT}. (direction='shadow' models Adam's update "
        "for an Adam whose state curvopt cannot read.)"
    )


def check_shadow(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`TypeError` naming ``optimizer`` unless Adam moments of curvopt's own can model
    its update: a torch Adam/AdamW, or a class curvopt does not recognise whose param groups carry
    Adam's hyperparameters (``betas`` a pair of numbers, ``eps`` a number). Whether its update
    really is Adam's is then checked at every step (see :class:`~curvopt.CAPO`)."""
    known = recognised(optimizer)
    if known is not None and known not in _ADAM:
        raise TypeError(
            f"optimizer: direction='shadow' models Adam's update, and {describe(optimizer)} is "
            f"not Adam (its update is torch.optim.{known.__name__}'s). curvopt reads its state: "
            "use direction='exact' (or 'frozen')."
        )
    if known is None and isinstance(optimizer, torch.optim.Optimizer):
        torch_class = next(
            (c for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim.")), None
        )
        if torch_class is not None and torch_class is not torch.optim.Optimizer:
            if torch_class not in _ADAM:
                raise TypeError(
                    f"optimizer: direction='shadow' models Adam's update, and "
                    f"{describe(optimizer)} (a torch.optim.{torch_class.__name__}) is not Adam. "
                    f"{TRUST_REGION_HINT}."
                )
    for group in optimizer.param_groups:
        betas, eps = group.get("betas"), group.get("eps")
        ok = (
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(_number(b) for b in betas)
            and _number(eps)
        )
        if not ok:
            raise TypeError(
                f"optimizer: direction='shadow' models Adam's update, but {describe(optimizer)}'s "
                f"param group has betas={betas!r}, eps={eps!r}, not Adam's (a pair of numbers and "
                f"a number). {TRUST_REGION_HINT}."
            )


def _number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and bool(torch.isfinite(x).all())
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))
