"""The stability study's bookkeeping: collapse, crossings, boundaries, the JSON and the figures
(on synthetic run directories; the runs themselves are the example's, tested elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study import aggregate, report, stability
from study.run import run_dir


def fake_run(
    where: Path, variant: str, seed: int, curve: list[list[float]], rejected=0.0, extra=None
):
    """A run directory as the example writes it (``extra``: more fields of every step's row)."""
    where.mkdir(parents=True)
    accuracies = [a for _, a in curve]
    run = {
        "method": "capo" if variant.startswith("capo") else "grpo",
        "variant": variant.split("-")[0],
        "regime": "aggressive",
        "seed": seed,
        "completions": curve[-1][0],
        "lr": 3e-4,
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "rejected_frac": rejected,
        "curve": curve,
        "seconds": 1.0,
    }
    (where / "summary.json").write_text(json.dumps({"runs": [run]}))
    rows = [
        {
            "completions": c,
            "rejected_frac": rejected,
            "kl_realised": 1e-3,
            **(
                {"policy_shift_step_model": 1e-7, "policy_shift_realised": 2e-7}
                if variant.startswith("capo")
                else {}
            ),
            **(extra or {}),
        }
        for c, _ in curve[1:]
    ]
    (where / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_collapse_crossing_and_boundary():
    assert aggregate.collapsed({"initial_accuracy": 0.4, "final_accuracy": 0.39})
    assert not aggregate.collapsed({"initial_accuracy": 0.4, "final_accuracy": 0.4})
    curve = [(0, 0.4), (100, 0.6), (200, 0.8), (300, 0.7)]
    assert aggregate.first_crossing(curve, 0.7) == 200
    assert aggregate.first_crossing(curve, 0.9) is None
    rows = [
        {"variant": "grpo-aggressive", "lr": lr, "collapsed": c}
        for lr, cs in ((1e-4, (0, 0, 0)), (3e-4, (0, 1, 0)), (9e-4, (1, 1, 0)))
        for c in cs
    ]
    assert aggregate.boundary(rows, "grpo-aggressive") == 3e-4
    assert aggregate.boundary(rows, "capo_step-all") is None
    # a stable lr above an unstable one still counts: the highest lr that holds
    rows.append({"variant": "grpo-aggressive", "lr": 2e-3, "collapsed": False})
    assert aggregate.boundary(rows, "grpo-aggressive") == 2e-3


def test_realised_over_bound_counts_the_active_steps_only():
    rows = [
        {"step_scale": 1.0, "policy_shift_realised": 2e-4, "kl_exact": 2e-4,
         "trust_region_trials": 1, "head_kl_share": 1e-3},
        {"step_scale": 0.5, "policy_shift_realised": 9e-4, "kl_exact": 9.5e-4,
         "trust_region_trials": 2, "head_kl_share": 3e-3},
        {"step_scale": 0.2, "policy_shift_realised": 7e-4, "kl_exact": 7.5e-4,
         "trust_region_trials": 3},
    ]  # fmt: skip
    cal = aggregate.bound_calibration(rows, 1e-3)
    assert (cal["steps"], cal["active_steps"]) == (3, 2)
    assert cal["measured_over_bound"]["median"] == pytest.approx(0.8)
    assert cal["exact_over_bound"]["max"] == pytest.approx(0.95)
    assert cal["all_steps_exact_over_bound"]["median"] == pytest.approx(0.75)
    assert cal["trials_mean"] == pytest.approx(2.0)
    assert cal["head_kl_share_median"] == pytest.approx(2e-3)
    assert aggregate.bound_calibration([{"kl_exact": 1e-3}], 1e-3) is None


def test_mean_curve_uses_the_common_evaluations():
    runs = [{"curve": [[0, 0.2], [10, 0.4], [20, 0.6]]}, {"curve": [[0, 0.4], [20, 0.8]]}]
    assert aggregate.mean_curve(runs) == [(0, pytest.approx(0.3)), (20, pytest.approx(0.7))]


def test_aggregate_writes_the_json_fields_and_figures(tmp_path):
    out = tmp_path / "runs"
    seeds = [0, 1, 2]
    grid = [0, 100, 200, 300, 400]
    shapes = {
        "grpo-conservative": [0.4, 0.5, 0.6, 0.7, 0.8],
        "grpo-aggressive": [0.4, 0.7, 0.3, 0.1, 0.2],
        "capo-symmetric": [0.4, 0.6, 0.2, 0.0, 0.0],
        "capo_step-head": [0.4, 0.85, 0.9, 0.9, 0.9],
        "trust_region-1e-3": [0.4, 0.8, 0.85, 0.9, 0.9],
    }
    trust = {"step_scale": 0.5, "policy_shift_realised": 9e-4, "kl_exact": 9e-4,
             "trust_region_trials": 2}  # fmt: skip
    for name, accs in shapes.items():
        for s in seeds:
            rejected = 0.02 if name == "capo-symmetric" else 0.0
            curve = [[c, a + 0.01 * s] for c, a in zip(grid, accs, strict=True)]
            extra = trust if name.startswith("trust_region") else None
            fake_run(run_dir(out, name, s), name, s, curve, rejected, extra)
    for name, finals in (("grpo-aggressive", (0.8, 0.2, 0.1)), ("capo_step-head", (0.9,) * 3)):
        for lr, final in zip((1e-4, 3e-4, 9e-4), finals, strict=True):
            for s in seeds:
                curve = [[0, 0.4], [400, final]]
                fake_run(run_dir(out, name, s, lr), name, s, curve)
    result = stability.main(
        ["--stage", "report", "--out", str(out), "--json", str(tmp_path / "s.json"),
         "--figures", str(tmp_path / "img"), "--lrs", "1e-4", "3e-4", "9e-4",
         "--sweep-variants", "capo_step-head"]
    )  # fmt: skip
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["seeds"] == 3
    assert written["target_accuracy"] == pytest.approx(0.81)
    assert written["capo_variant"] == "capo_step-head"
    # conservative GRPO reaches 0.81 at 400 completions, the step at 100
    assert written["efficiency_ratio"] == pytest.approx(4.0)
    assert written["capo_max_rejected_frac"] == 0.0
    assert written["collapse_boundary"] == {"grpo-aggressive": 1e-4, "capo_step-head": 9e-4}
    assert written["stable_lr_ratio"] == {"capo_step-head": pytest.approx(9.0)}
    runs = written["runs"]
    assert {r["variant"] for r in runs} == set(shapes) and len(runs) == 15
    assert all({"rule", "collapsed", "curve", "final_accuracy"} <= set(r) for r in runs)
    assert sum(r["collapsed"] for r in runs) == 6  # the aggressive GRPO and rejection runs
    assert {r["method"] for r in written["lr_sweep"]} == {"grpo", "capo"}
    step = next(r for r in runs if r["variant"] == "capo_step-head")
    assert step["calibration"]["realised_over_predicted_median"] == pytest.approx(2.0)
    for name in ("stability-accuracy.png", "stability-steps.png", "stability-lr.png"):
        assert (tmp_path / "img" / name).stat().st_size > 10_000
    assert "capo_step-head" in result["variants"]
    assert "| GRPO, conservative | 0 of 3 |" in report.table(result)
    trust = next(r for r in runs if r["variant"] == "trust_region-1e-3")
    assert trust["bound_calibration"]["measured_over_bound"]["median"] == pytest.approx(0.9)
    assert "| Trust region, measured policy KL ≤ 1e-3, aggressive | 100 % | 0.900" in (
        report.bound_table(result)
    )
    # the step reaches the target (0.81) at 400 completions at every lr; GRPO only at 1e-4
    assert "| 0.0001 | 0 of 3, 80.0 ± 0.0, never | 0 of 3, 90.0 ± 0.0, 400 |" in (
        report.sweep_table(result, stability.BY_NAME)
    )
