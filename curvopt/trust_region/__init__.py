"""The measured whole-policy trust region (see :mod:`curvopt.trust_region.region`)."""

from .kl import HeadInput, PolicyOutput, policy_kl
from .region import Measured, TrustRegion, autocast_state
from .search import Search, SearchResult
from .step import PlannedStep, TakenStep, Transaction, begin, can_plan

__all__ = [
    "HeadInput",
    "Measured",
    "PlannedStep",
    "PolicyOutput",
    "Search",
    "SearchResult",
    "TakenStep",
    "Transaction",
    "TrustRegion",
    "autocast_state",
    "begin",
    "can_plan",
    "policy_kl",
]
