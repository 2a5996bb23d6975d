"""What an optimizer does with a gradient.

- :mod:`~curvopt.optimizers.adam`: Adam's update, written once.
- :mod:`~curvopt.optimizers.rules`: update rules, one class per kind of step (SGD's affine step,
  Adam's exact, frozen and first steps), each restrictable to rows of a parameter.
- :mod:`~curvopt.optimizers.readers`: the rules of a real ``torch.optim`` optimizer, from its state,
  and the update it is about to take.
- :mod:`~curvopt.optimizers.shadow`: Adam moments of curvopt's own, for optimizers whose state
  cannot be read.
"""

from .readers import (
    SUPPORTED_OPTIMIZERS,
    OptimizerReader,
    RuleSource,
    loss_gradients,
    planned_update,
    read_rules,
    unwrap_optimizer,
)
from .rules import AdamStep, AffineStep, FrozenAdamStep, Restricted, SignStep, UpdateRule
from .shadow import ShadowAdam

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "AdamStep",
    "AffineStep",
    "FrozenAdamStep",
    "OptimizerReader",
    "Restricted",
    "RuleSource",
    "ShadowAdam",
    "SignStep",
    "UpdateRule",
    "loss_gradients",
    "planned_update",
    "read_rules",
    "unwrap_optimizer",
]
