"""The backends of :class:`~curvopt.CurvatureTracker`, behind one protocol (:class:`Head`).

- :class:`LinearHead`: ``nn.Linear`` by logit-space closed forms (token candidates over the full
  vocabulary by row blocks or over each token's top-K rows; sequence and batch candidates by
  their ``ΔW``), with the fused block computations of :mod:`~curvopt.heads.blocks`.
- :class:`FunctionalHead`: any other head module, exactly, through ``torch.func``.
- :class:`WholeModel`: any set of a model's parameters, through forward-mode AD over the model.
"""

from .base import Head, OutputLayer
from .functional import FunctionalHead
from .linear import LinearHead
from .whole import WholeModel

__all__ = ["FunctionalHead", "Head", "LinearHead", "OutputLayer", "WholeModel"]
