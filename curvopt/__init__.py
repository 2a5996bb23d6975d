"""curvopt: Curvature-Aware Policy Optimization (CAPO) for PyTorch.

Public API:

- :class:`CAPO`: the optimizer wrapper (``CAPO(AdamW(...), head=model.lm_head)``, ``select``).
- :class:`CurvatureTracker`: the quadratic model of every candidate update of the output layer.
- :class:`SampleRejector`: the acceptance rules and levels.
- :class:`QuadraticModel`: what the tracker returns.
"""

from .capo import CAPO
from .quadratic import QuadraticModel
from .rejector import SampleRejector
from .tracker import CurvatureTracker

__all__ = ["CAPO", "CurvatureTracker", "QuadraticModel", "SampleRejector"]
# The one version source: pyproject.toml reads it (``dynamic = ["version"]``).
__version__ = "0.1.0"
