"""Choosing a step's scale from measurements of its KL (a backtracking line search on a KL
constraint, as in TRPO: Schulman et al., 2015, arXiv 1502.05477).

``m(s)`` is the measured mean per-token KL of the policy after the step at scale ``s`` (the
update ``s·Δθ``). Near ``s = 0``, ``m(s) = ½s²·ΔθᵀF̄Δθ + O(s³)``; further out it grows like some
power ``s^p``, with ``p`` below 2 far out where the softmax saturates. The search measures
``m(1)``; if it is within ``tolerance × bound`` the step is taken whole. Otherwise it aims at
``target × bound`` by a power law, ``s' = s·(target·bound / m(s))^(1/p)``: first from ``s = 1``
with the exponent the last scaled step had between ``s = 1`` and its scale (2 at first: steps are
alike, so this usually lands), then from the trial nearest the aim with the exponent between the
last two trials. It accepts the first scale whose KL lies in ``[floor, tolerance] × bound``: never
over the bound by more than the tolerance, never needlessly small. A non-finite measurement ends
the search: the step must not be taken.
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
        exponent: the power ``p`` the first extrapolation from ``s = 1`` assumes; after each
            scaled step, ``log(m(1) / m(s)) / log(1 / s)`` of its accepted scale.
    """

    bound: float
    tolerance: float = 1.1
    floor: float = 0.5
    target: float = 0.75
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
        aim = self.target * self.bound
        trials = [(1.0, float(measure(1.0)))]
        if not math.isfinite(trials[0][1]):
            return SearchResult(None, math.nan, trials)
        if trials[0][1] <= high:
            return SearchResult(1.0, trials[0][1], trials)
        # from the whole step, by the exponent the last scaled step had from s = 1 to its scale
        base, p = trials[0], self.exponent
        while len(trials) < self.max_trials:
            s, m = base
            nxt = min(1.0, s * (aim / m) ** (1.0 / p)) if m > 0 else 1.0
            if any(nxt == t for t, _ in trials):
                break
            kl = float(measure(nxt))
            trials.append((nxt, kl))
            if not math.isfinite(kl):
                return SearchResult(None, math.nan, trials)
            if low <= kl <= high:
                break
            # on: from the trial nearest the aim, by the exponent between the last two trials
            (s0, m0), (s1, m1) = trials[-2:]
            if m0 > 0 and m1 > 0 and s0 != s1:
                p = min(4.0, max(1.0, math.log(m1 / m0) / math.log(s1 / s0)))
            base = min(trials, key=lambda t: abs(math.log(t[1] / aim)) if t[1] > 0 else math.inf)
        safe = [(s, m) for s, m in trials if m <= high]
        if not safe:
            return SearchResult(None, math.nan, trials)
        s, m = max(safe)
        if s < 1 and m > 0:
            self.exponent = min(4.0, max(1.0, math.log(trials[0][1] / m) / math.log(1 / s)))
        return SearchResult(s, m, trials)

    def state_dict(self) -> dict[str, float]:
        """What is learnt across steps (the exponent), for bit-exact resumption."""
        return {"exponent": self.exponent}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.exponent = float(state["exponent"])
