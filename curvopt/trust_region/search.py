"""Choosing a step's scale from measurements of its KL (a backtracking line search on a KL
constraint, as in TRPO: Schulman et al., 2015, arXiv 1502.05477).

``m(s)`` is the measured mean per-token KL of the policy after the step at scale ``s`` (the
update ``s·Δθ``). Near ``s = 0``, ``m(s) = ½s²·ΔθᵀF̄Δθ + O(s³)``; further out it grows like some
power ``s^p``. The search measures ``m(1)``; if it is within ``tolerance × bound`` the step is
taken whole. Otherwise it aims at ``target × bound`` by the power law ``s' = s·(target·bound /
m(s))^(1/p)`` (``p`` starts at the exponent learnt on earlier steps, 2 at first, and is re-fitted
from the last two measurements), and accepts the first scale whose KL lies in
``[floor, tolerance] × bound``: never over the bound by more than the tolerance, never needlessly
small. A non-finite measurement ends the search: the step must not be taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Search", "SearchResult"]


@dataclass
class SearchResult:
    """The outcome of one search.

    Attributes:
        scale: the scale to take the step at (None: the step must not be taken — a measurement
            was non-finite, or no scale tried was within the bound).
        kl: the measured KL at ``scale`` (``nan`` when ``scale`` is None).
        trials: every ``(scale, kl)`` measured, in order (the first is the whole step).
    """

    scale: float | None
    kl: float
    trials: list[tuple[float, float]] = field(default_factory=list)

    @property
    def unscaled_kl(self) -> float:
        """``m(1)``, the KL of the whole step."""
        return self.trials[0][1]


@dataclass
class Search:
    """The scale search for a bound on the measured KL (see the module docstring).

    Args:
        bound: the KL bound per token, > 0.
        tolerance: a step's KL may exceed the bound by this factor (≥ 1).
        floor: when the step is scaled, its KL is at least this fraction of the bound.
        target: the fraction of the bound each extrapolation aims at (within [floor, tolerance]).
        max_trials: measurements per step, the whole step's included.
        exponent: the power ``p`` the first extrapolation assumes; after a step that needed
            two or more measurements, the exponent last fitted on it.
    """

    bound: float
    tolerance: float = 1.1
    floor: float = 0.5
    target: float = 0.8
    max_trials: int = 5
    exponent: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound: expected a finite number > 0, got {self.bound!r}")
        if not 0 < self.floor <= self.target <= 1 <= self.tolerance:
            raise ValueError(
                "expected 0 < floor ≤ target ≤ 1 ≤ tolerance, got "
                f"floor={self.floor}, target={self.target}, tolerance={self.tolerance}"
            )
        if self.max_trials < 2:
            raise ValueError(f"max_trials: expected ≥ 2, got {self.max_trials}")

    def run(self, measure: Callable[[float], float]) -> SearchResult:
        """Measure ``m(1)``, then scales in turn until one is acceptable (or the trials run out).

        ``measure(s)`` returns the mean KL of the step at scale ``s``. If no scale is in the
        window after ``max_trials``, the largest one measured within the bound (×tolerance) is
        taken; if there is none, no scale is.
        """
        high, low = self.tolerance * self.bound, self.floor * self.bound
        trials = [(1.0, float(measure(1.0)))]
        if not math.isfinite(trials[0][1]):
            return SearchResult(None, math.nan, trials)
        if trials[0][1] <= high:
            return SearchResult(1.0, trials[0][1], trials)
        p = self.exponent
        fitted = []
        while len(trials) < self.max_trials:
            s, m = trials[-1]
            nxt = min(1.0, s * (self.target * self.bound / m) ** (1.0 / p)) if m > 0 else 1.0
            if any(nxt == t for t, _ in trials):
                break
            kl = float(measure(nxt))
            trials.append((nxt, kl))
            if not math.isfinite(kl):
                return SearchResult(None, math.nan, trials)
            if kl > 0 and m > 0 and nxt != s:
                p = min(4.0, max(1.0, math.log(kl / m) / math.log(nxt / s)))
                fitted.append(p)
            if low <= kl <= high:
                break
        if fitted:
            self.exponent = fitted[-1]
        safe = [(s, m) for s, m in trials if m <= high]
        if not safe:
            return SearchResult(None, math.nan, trials)
        s, m = max(safe)
        return SearchResult(s, m, trials)

    def state_dict(self) -> dict[str, float]:
        """What is learnt across steps (the exponent), for bit-exact resumption."""
        return {"exponent": self.exponent}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.exponent = float(state["exponent"])
