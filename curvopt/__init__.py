"""curvopt: Curvature-Aware Policy Optimization (CAPO) for PyTorch.

Public API:

- :class:`CAPO`: the optimizer wrapper — the whole-policy trust region
  (``CAPO(AdamW(...), model=model)``) and the paper's token rejection
  (``CAPO(AdamW(...), head=model.lm_head)``), with ``select``.
- :class:`HeadInput`: a policy's logits given by the states entering a linear head, for a
  ``forward`` that should not materialise ``[B, T, V]`` logits.
- :class:`CurvatureTracker`: the quadratic model of every candidate update of the output layer.
- :class:`SampleRejector`: the acceptance rules and levels.
- :class:`QuadraticModel`: what the tracker returns.
"""

from .capo import CAPO
from .quadratic import QuadraticModel
from .rejector import SampleRejector
from .tracker import CurvatureTracker
from .trust_region import HeadInput

__all__ = ["CAPO", "CurvatureTracker", "HeadInput", "QuadraticModel", "SampleRejector"]
# The one version source: pyproject.toml reads it (``dynamic = ["version"]``).
__version__ = "0.1.0"
