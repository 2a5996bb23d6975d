"""The stability study: GRPO and CAPO variants on the toy GRPO example, and a learning-rate sweep.

Calls the example (``grpolab``, full mode) once per variant and seed, each in its own process
(one torch thread each, ``--jobs`` at a time), then writes ``benchmarks/results/stability.json``,
the figures of ``docs/results.md`` and a terminal table. Finished runs (their ``summary.json``)
are reused, so an interrupted study resumes where it stopped.

    python benchmarks/stability.py                        # everything: variants, then the sweep
    python benchmarks/stability.py --stage variants       # the variants only
    python benchmarks/stability.py --stage report         # re-aggregate what has run

The variants include the measured trust region at four bounds (1e-4 to 3e-3): the evidence for
its default. The learning-rate sweep runs GRPO and each ``--sweep-variants`` variant.

Definitions (docs/results.md; :mod:`.aggregate` for collapse, crossings and boundaries): the
*target* is conservative GRPO's mean final accuracy; the *efficiency ratio* is conservative GRPO's
completions to target ÷ the best CAPO variant's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .aggregate import (
    bound_calibration,
    boundary,
    calibration,
    collapsed,
    first_crossing,
    load,
    mean_curve,
    mean_std,
    peak_rejection,
)
from .report import (
    bound_table,
    calibration_table,
    plot_accuracy,
    plot_steps,
    plot_sweep,
    sweep_table,
    table,
)
from .run import Job, Variant, example_args, execute, run_dir

__all__ = ["BY_NAME", "LRS", "VARIANTS", "aggregate", "main"]

VARIANTS = (
    Variant("grpo-conservative", "grpo", "none", "-", "GRPO, conservative",
            ("--methods", "grpo-conservative")),
    Variant("grpo-aggressive", "grpo", "none", "-", "GRPO, aggressive",
            ("--methods", "grpo-aggressive")),
    Variant("dr_grpo-aggressive", "grpo", "none", "-", "Dr.GRPO, aggressive",
            ("--methods", "grpo-aggressive", "--loss-type", "dr_grpo", "--no-scale-rewards")),
    Variant("capo-symmetric", "capo", "symmetric", "head",
            "CAPO symmetric (δ_H 1e-2, δ_F 1e-4), aggressive",
            ("--methods", "capo-aggressive", "--capo-rule", "symmetric",
             "--delta-h", "1e-2", "--delta-f", "1e-4")),
    Variant("capo-theorem", "capo", "theorem", "head",
            "CAPO theorem (δ_H 0, δ_F 1e-4), aggressive",
            ("--methods", "capo-aggressive", "--capo-rule", "theorem",
             "--delta-h", "0", "--delta-f", "1e-4")),
    Variant("capo_step-head", "capo", "max_policy_shift", "head",
            "CAPO step, head KL ≤ 1e-7, aggressive",
            ("--methods", "capo_step-aggressive", "--capo-params", "head",
             "--max-policy-shift", "1e-7"), 1e-7),
    Variant("capo_step-all", "capo", "max_policy_shift", "all",
            "CAPO step, whole-model predicted KL ≤ 3e-4, aggressive",
            ("--methods", "capo_step-aggressive", "--capo-params", "all",
             "--max-policy-shift", "3e-4"), 3e-4),
    Variant("capo_step-all-reject", "capo", "max_policy_shift", "all",
            "CAPO step, whole-model predicted KL ≤ 3e-4, ≤ 5 % largest-shift tokens rejected "
            "first, aggressive",
            ("--methods", "capo_step-aggressive", "--capo-params", "all",
             "--max-policy-shift", "3e-4", "--step-reject-frac", "0.05"), 3e-4),
    *(
        Variant(f"trust_region-{b}", "capo", "trust_region", "all",
                f"Trust region, measured policy KL ≤ {b}, aggressive",
                ("--methods", "trust_region-aggressive", "--max-policy-shift", b), float(b))
        for b in ("1e-4", "3e-4", "1e-3", "3e-3")
    ),
)  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
LRS = (3e-5, 1e-4, 3e-4, 6e-4, 9e-4, 3e-3)  # 100×, around the aggressive 3e-4
CONSERVATIVE = "grpo-conservative"


def aggregate(
    out: Path, seeds: list[int], lrs: list[float], sweep_variants: list[str], window: int = 50
) -> dict:
    """Everything the JSON and the docs report, from the run directories under ``out``."""
    variants: dict[str, dict] = {}
    runs = []
    for v in VARIANTS:
        loaded = [load(run_dir(out, v.name, s)) for s in seeds]
        loaded = [x for x in loaded if x is not None]
        if not loaded:
            continue
        entries = []
        for run, rows in loaded:
            entry = dict(run)
            entry.update(
                method=v.family,
                variant=v.name,
                rule=v.rule,
                params=v.params,
                collapsed=collapsed(run),
                peak_rejected_frac=peak_rejection(rows, window),
                calibration=calibration(rows),
                bound=v.bound,
                bound_calibration=None if v.bound is None else bound_calibration(rows, v.bound),
            )
            entries.append(entry)
        runs += entries
        finals = [e["final_accuracy"] for e in entries]
        bests = [e["best_accuracy"] for e in entries]
        variants[v.name] = {
            "label": v.label,
            "seeds": len(entries),
            "collapsed": sum(e["collapsed"] for e in entries),
            "initial": mean_std([e["initial_accuracy"] for e in entries]),
            "final": mean_std(finals),
            "best": mean_std(bests),
            "lowest": mean_std([min(a for _, a in e["curve"]) for e in entries]),
            "rejected_mean": statistics.fmean(e["rejected_frac"] for e in entries),
            "rejected_peak": max(e["peak_rejected_frac"] for e in entries),
            "seconds_per_run": statistics.fmean(e.get("seconds", 0.0) for e in entries),
            "mean_curve": mean_curve(entries),
            "calibration": [e["calibration"] for e in entries],
            "bound": v.bound,
            "bound_calibration": [e["bound_calibration"] for e in entries],
        }
    result: dict = {"seeds": len(seeds), "variants": variants, "runs": runs}
    if CONSERVATIVE in variants:
        target = variants[CONSERVATIVE]["final"][0]
        result["target_accuracy"] = target
        for info in variants.values():
            info["completions_to_target"] = first_crossing(info["mean_curve"], target)
    capo = [n for n in variants if BY_NAME[n].family == "capo"]
    if capo:
        # the best CAPO variant: fewest collapses, then the highest mean final accuracy
        best = min(capo, key=lambda n: (variants[n]["collapsed"], -variants[n]["final"][0]))
        result["capo_variant"] = best
        result["capo_max_rejected_frac"] = max(
            r["rejected_frac"] for r in runs if r["variant"] == best
        )
        base = variants.get(CONSERVATIVE, {}).get("completions_to_target")
        mine = variants[best].get("completions_to_target")
        result["efficiency_ratio"] = base / mine if base and mine else None
    sweep, curves = [], {}
    for name in ("grpo-aggressive", *sweep_variants):
        for lr in lrs:
            for s in seeds:
                loaded = load(run_dir(out, name, s, lr))
                if loaded is None:
                    continue
                run, _ = loaded
                curves.setdefault((name, lr), []).append(run)
                sweep.append(
                    {
                        "method": BY_NAME[name].family,
                        "variant": name,
                        "lr": lr,
                        "seed": s,
                        "collapsed": collapsed(run),
                        "initial_accuracy": run["initial_accuracy"],
                        "accuracy_at_budget": run["final_accuracy"],
                        "best_accuracy": run["best_accuracy"],
                        "completions": run["completions"],
                        "seconds": run.get("seconds", 0.0),
                    }
                )
    if sweep:
        result["lr_sweep"] = sweep
        names = sorted({r["variant"] for r in sweep})
        bounds = {n: boundary(sweep, n) for n in names}
        result["collapse_boundary"] = bounds
        grpo = bounds.get("grpo-aggressive")
        result["stable_lr_ratio"] = {
            n: (b / grpo if b and grpo else None)
            for n, b in bounds.items()
            if n != "grpo-aggressive"
        }
        result["sweep_variants"] = list(sweep_variants)
        target = result.get("target_accuracy")
        result["sweep_completions_to_target"] = [
            {
                "variant": name,
                "lr": lr,
                "completions": None if target is None else first_crossing(mean_curve(runs), target),
            }
            for (name, lr), runs in curves.items()
        ]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "variants", "sweep", "report"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v.name for v in VARIANTS],
        choices=[v.name for v in VARIANTS],
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument(
        "--sweep-variants",
        nargs="*",
        default=["capo_step-all", "trust_region-3e-4"],
        choices=[v.name for v in VARIANTS if v.family == "capo"],
        help="the CAPO variants swept against GRPO",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/evidence", help="the runs' directories")
    parser.add_argument("--json", default="benchmarks/results/stability.json")
    parser.add_argument("--figures", default="docs/img", help="where the figures go")
    parser.add_argument("grpo_args", nargs="*", help="after --: more options of the example")
    args = parser.parse_args(argv)
    out = Path(args.out)
    began = time.time()
    if args.stage in ("all", "variants"):
        jobs = []
        for s in args.seeds:
            for name in args.variants:
                where = run_dir(out, name, s)
                jobs.append(Job(example_args(BY_NAME[name], s, where, None, args.grpo_args), where))
        execute(jobs, args.jobs)
    if args.stage in ("all", "sweep"):
        jobs = []
        for lr in args.lrs:
            for s in args.seeds:
                for name in ("grpo-aggressive", *args.sweep_variants):
                    where = run_dir(out, name, s, lr)
                    jobs.append(
                        Job(example_args(BY_NAME[name], s, where, lr, args.grpo_args), where)
                    )
        execute(jobs, args.jobs)
    result = aggregate(out, args.seeds, args.lrs, args.sweep_variants)
    result["command"] = " ".join(["python", "benchmarks/stability.py", *(argv or sys.argv[1:])])
    result["this_invocation_seconds"] = time.time() - began
    # the runs' own time, one thread each (wall time is about half with --jobs 2)
    result["runs_seconds_total"] = sum(r.get("seconds", 0.0) for r in result["runs"]) + sum(
        r["seconds"] for r in result.get("lr_sweep", [])
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    if result["variants"]:
        plot_accuracy(result, figures / "stability-accuracy.png")
        plot_steps(result, VARIANTS, out, args.seeds, figures / "stability-steps.png")
        print(table(result))
        print(calibration_table(result))
        print(bound_table(result))
    if result.get("lr_sweep"):
        plot_sweep(result, BY_NAME, figures / "stability-lr.png")
        print(sweep_table(result, BY_NAME))
    for key in (
        "target_accuracy",
        "capo_variant",
        "efficiency_ratio",
        "capo_max_rejected_frac",
        "collapse_boundary",
        "stable_lr_ratio",
    ):
        if key in result:
            print(f"{key}: {result[key]}")
    print(f"wrote {args.json} and figures in {figures}")
    return result


if __name__ == "__main__":
    main()
