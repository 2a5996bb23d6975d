"""What a study computes from finished runs: collapse, curves, crossings, boundaries, calibration.

Definitions (docs/results.md): a run *collapses* when its final test accuracy is below its
initial accuracy (by more than ``margin``); *completions to target* is the first evaluation at
which a seed-mean accuracy reaches the target; a method's *collapse boundary* in a
learning-rate sweep is the highest learning rate at which at most one of its seeds collapses.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from grpolab.measure import KL_FLOOR
from grpolab.report import moving_average

__all__ = [
    "KL_FLOOR",
    "bound_calibration",
    "boundary",
    "calibration",
    "collapsed",
    "first_crossing",
    "load",
    "mean_curve",
    "mean_std",
    "peak_rejection",
    "step_pairs",
]


def load(where: Path) -> tuple[dict, list[dict]] | None:
    """A finished run's ``summary.json`` entry and its per-step metrics rows (None: unfinished)."""
    path = where / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    (run,) = summary["runs"]
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    return run, rows


def collapsed(run: dict, margin: float = 0.0) -> bool:
    """Final test accuracy below the initial one by more than ``margin``."""
    return run["final_accuracy"] < run["initial_accuracy"] - margin


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """Seed-mean accuracy at the evaluations every run made."""
    points = [dict(map(tuple, r["curve"])) for r in runs]
    common = sorted(set.intersection(*(set(p) for p in points)))
    return [(c, statistics.fmean(p[c] for p in points)) for c in common]


def first_crossing(curve: list[tuple[int, float]], target: float) -> int | None:
    """Completions at the first evaluation with accuracy ≥ ``target`` (None: never)."""
    return next((c for c, a in curve if a >= target), None)


def boundary(rows: list[dict], variant: str, max_collapsed: int = 1) -> float | None:
    """The highest lr of ``variant`` at which at most ``max_collapsed`` seeds collapse."""
    lrs = sorted({r["lr"] for r in rows if r["variant"] == variant})
    ok = [
        lr
        for lr in lrs
        if sum(r["collapsed"] for r in rows if r["variant"] == variant and r["lr"] == lr)
        <= max_collapsed
    ]
    return max(ok) if ok else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def step_pairs(rows: list[dict]) -> list[tuple[float, float]]:
    """(predicted, realised) KL of the tracked parameters' step, for steps above ``KL_FLOOR``:
    the quadratic model of the step taken, and its exact KL on the kept tokens."""
    return [
        (r["policy_shift_step_model"], r["policy_shift_realised"])
        for r in rows
        if r.get("policy_shift_step_model", 0) >= KL_FLOOR and "policy_shift_realised" in r
    ]


def calibration(rows: list[dict]) -> dict | None:
    """Per-step predicted against realised KL of the parameters CAPO tracks (quantiles of their
    ratio), and the median KL per step of the tracked parameters and of the whole model."""
    pairs = step_pairs(rows)
    if not pairs:
        return None
    ratios = sorted(real / pred for pred, real in pairs)
    q = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
    whole = [r["kl_realised"] for r in rows if "kl_realised" in r]
    return {
        "steps": len(pairs),
        "steps_below_floor": sum("policy_shift_step_model" in r for r in rows) - len(pairs),
        "realised_over_predicted_median": statistics.median(ratios),
        "realised_over_predicted_p10": q[0],
        "realised_over_predicted_p90": q[-1],
        "tracked_kl_median": statistics.median(real for _, real in pairs),
        "whole_model_kl_median": statistics.median(whole) if whole else None,
    }


def bound_calibration(rows: list[dict], bound: float) -> dict | None:
    """Per step of a run with a KL bound: the KL of the step taken ÷ the bound — as the trust
    region measured it (``policy_shift_realised``) and by the example's own float64 forwards
    after the step (``kl_exact``) — over the steps where the bound was active (scaled), and how
    often it was, with the median trial forwards per step."""
    active = [r for r in rows if r.get("step_scale", 1.0) < 1.0 and "policy_shift_realised" in r]
    if not rows or "step_scale" not in rows[0]:
        return None

    def quantiles(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        values = sorted(values)
        q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        return {"median": statistics.median(values), "p10": q[0], "p90": q[-1],
                "max": values[-1]}  # fmt: skip

    trials = [r["trust_region_trials"] for r in rows if "trust_region_trials" in r]
    return {
        "steps": len(rows),
        "active_steps": len(active),
        "measured_over_bound": quantiles([r["policy_shift_realised"] / bound for r in active]),
        "exact_over_bound": quantiles([r["kl_exact"] / bound for r in active if "kl_exact" in r]),
        "all_steps_exact_over_bound": quantiles(
            [r["kl_exact"] / bound for r in rows if "kl_exact" in r]
        ),
        "trials_median": statistics.median(trials) if trials else None,
        "trials_mean": statistics.fmean(trials) if trials else None,
        "scale_median": statistics.median(r["step_scale"] for r in rows),
        "head_kl_share_median": (
            statistics.median(r["head_kl_share"] for r in rows if "head_kl_share" in r)
            if any("head_kl_share" in r for r in rows)
            else None
        ),
    }


def peak_rejection(rows: list[dict], window: int) -> float:
    """The highest ``window``-step moving average of the per-step rejection rate."""
    values = [r["rejected_frac"] for r in rows]
    return max(moving_average(values, window), default=0.0)
