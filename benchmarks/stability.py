"""The stability study: GRPO and CAPO variants on the GRPO example, and a learning-rate sweep.

Runs ``examples/grpo.py`` (full mode) once per variant and seed, in parallel subprocesses (one
torch thread each), then writes ``benchmarks/results/stability.json``, the figures of
``docs/results.md`` and a terminal table. Finished runs (their ``summary.json``) are reused, so an
interrupted study resumes where it stopped.

    python benchmarks/stability.py                        # everything: variants, then the sweep
    python benchmarks/stability.py --stage variants       # the variants only
    python benchmarks/stability.py --stage report         # re-aggregate what has run

Definitions (docs/results.md): a run *collapses* when its final test accuracy is below its
initial accuracy; the *target* is conservative GRPO's mean final accuracy; *completions to
target* is the first evaluation at which a variant's seed-mean accuracy reaches it; the
*efficiency ratio* is conservative GRPO's completions to target ÷ the best CAPO variant's; a
method's *collapse boundary* in the sweep is the highest learning rate at which at most one of
its seeds collapses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "examples" / "grpo.py"


@dataclass(frozen=True)
class Variant:
    """A method as the study names it: ``examples/grpo.py`` options and how to describe it."""

    name: str
    family: str  # "grpo" or "capo"
    rule: str  # "none", "symmetric", "theorem" or "max_policy_shift"
    params: str  # what CAPO models: "-", "head" or "all"
    label: str
    args: tuple[str, ...]


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
             "--max-policy-shift", "1e-7")),
    Variant("capo_step-all", "capo", "max_policy_shift", "all",
            "CAPO step, whole-model KL ≤ 3e-4, aggressive",
            ("--methods", "capo_step-aggressive", "--capo-params", "all",
             "--max-policy-shift", "3e-4")),
    Variant("capo_step-all-reject", "capo", "max_policy_shift", "all",
            "CAPO step, whole-model KL ≤ 3e-4, ≤ 5 % largest-shift tokens rejected first, "
            "aggressive",
            ("--methods", "capo_step-aggressive", "--capo-params", "all",
             "--max-policy-shift", "3e-4", "--step-reject-frac", "0.05")),
)  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
LRS = (3e-5, 1e-4, 3e-4, 6e-4, 9e-4, 3e-3)  # 100×, around the aggressive 3e-4
CONSERVATIVE = "grpo-conservative"


# ---------------------------------------------------------------------------- running


def run_dir(out: Path, variant: str, seed: int, lr: float | None = None) -> Path:
    """Where one run writes: ``variants/NAME/seedS`` or ``sweep/NAME/lrX/seedS``."""
    if lr is None:
        return out / "variants" / variant / f"seed{seed}"
    return out / "sweep" / variant / f"lr{lr:g}" / f"seed{seed}"


def command(variant: Variant, seed: int, where: Path, lr: float | None, extra: list[str]):
    """The ``examples/grpo.py`` command line of one run (``lr``: the aggressive lr itself)."""
    cmd = [sys.executable, str(GRPO), *variant.args, "--seeds", str(seed), "--out", str(where)]
    if lr is not None:
        cmd += ["--lr", repr(lr), "--aggressive-lr-mult", "1"]
    return cmd + extra


def execute(jobs: list[tuple[list[str], Path]], workers: int) -> None:
    """Run the commands whose directory has no ``summary.json`` yet, ``workers`` at a time."""
    todo = [(cmd, where) for cmd, where in jobs if not (where / "summary.json").exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")

    def one(job: tuple[list[str], Path]) -> None:
        cmd, where = job
        where.mkdir(parents=True, exist_ok=True)
        began = time.time()
        with (where / "log.txt").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        state = "ok" if rc == 0 else f"FAILED (rc {rc}, see {where / 'log.txt'})"
        print(
            f"{where.relative_to(where.parents[2])}: {time.time() - began:.0f} s {state}",
            flush=True,
        )

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, todo))


# ---------------------------------------------------------------------------- aggregation


def load(where: Path) -> tuple[dict, list[dict]] | None:
    """A finished run's ``summary.json`` entry and its per-step metrics rows."""
    path = where / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    (run,) = summary["runs"]
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    return run, rows


def collapsed(run: dict) -> bool:
    """Final test accuracy below the initial one."""
    return run["final_accuracy"] < run["initial_accuracy"]


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """Seed-mean accuracy at the evaluations every run made."""
    points = [dict(map(tuple, r["curve"])) for r in runs]
    common = sorted(set.intersection(*(set(p) for p in points)))
    return [(c, statistics.fmean(p[c] for p in points)) for c in common]


def first_crossing(curve: list[tuple[int, float]], target: float) -> int | None:
    """Completions at the first evaluation with accuracy ≥ ``target`` (None: never)."""
    return next((c for c, a in curve if a >= target), None)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as
    ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def boundary(rows: list[dict], method: str, max_collapsed: int = 1) -> float | None:
    """The highest lr of ``method`` at which at most ``max_collapsed`` seeds collapse."""
    lrs = sorted({r["lr"] for r in rows if r["method"] == method})
    ok = [
        lr
        for lr in lrs
        if sum(r["collapsed"] for r in rows if r["method"] == method and r["lr"] == lr)
        <= max_collapsed
    ]
    return max(ok) if ok else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


#: steps whose predicted KL is below this are left out of the calibration: there the measured
#: KL of the step is float32 rounding of the logits, not the step
KL_FLOOR = 1e-12


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


def peak_rejection(rows: list[dict], window: int) -> float:
    """The highest ``window``-step moving average of the per-step rejection rate."""
    values = [r["rejected_frac"] for r in rows]
    return max(moving_average(values, window), default=0.0)


def aggregate(
    out: Path, seeds: list[int], lrs: list[float], sweep_variant: str | None, window: int = 50
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
    for name in ("grpo-aggressive", sweep_variant):
        if name is None:
            continue
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
        bounds = {m: boundary(sweep, m) for m in ("grpo", "capo")}
        result["collapse_boundary"] = bounds
        result["stable_lr_ratio"] = (
            bounds["capo"] / bounds["grpo"] if bounds["capo"] and bounds["grpo"] else None
        )
        result["sweep_variant"] = sweep_variant
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


# ---------------------------------------------------------------------------- reporting


COLOURS = {
    "grpo-conservative": "tab:blue",
    "grpo-aggressive": "tab:red",
    "dr_grpo-aggressive": "tab:pink",
    "capo-symmetric": "tab:green",
    "capo-theorem": "tab:olive",
    "capo_step-head": "tab:orange",
    "capo_step-all": "tab:purple",
    "capo_step-all-reject": "tab:brown",
}


def plot_accuracy(result: dict, path: Path) -> None:
    """Seed-mean test accuracy with min–max bands: baselines and rejection on the left,
    baselines and the curvature-aware step on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True, constrained_layout=True)
    panels = (
        ("GRPO baselines and CAPO token rejection", ("grpo", "dr_grpo", "capo-")),
        ("GRPO baselines and CAPO's curvature-aware step", ("grpo", "capo_step")),
    )
    for ax, (title, prefixes) in zip(axes, panels):
        for name, info in result["variants"].items():
            if not name.startswith(prefixes):
                continue
            runs = [r for r in result["runs"] if r["variant"] == name]
            x = [c for c, _ in info["mean_curve"]]
            per = [dict(map(tuple, r["curve"])) for r in runs]
            lo = [min(p[c] for p in per) for c in x]
            hi = [max(p[c] for p in per) for c in x]
            colour = COLOURS.get(name)
            ax.plot(x, [a for _, a in info["mean_curve"]], color=colour, label=info["label"])
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        if "target_accuracy" in result:
            ax.axhline(result["target_accuracy"], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="training completions", title=title, ylim=(0, 1))
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel(f"test accuracy, mean and min–max of {result['seeds']} seeds")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(result: dict, out: Path, seeds: list[int], path: Path, window: int = 50) -> None:
    """CAPO's rejection rate over training, each step's realised against predicted KL (of the
    parameters CAPO tracks), and every variant's whole-model KL per step."""
    fig, (rej_ax, cal_ax, kl_ax) = plt.subplots(1, 3, figsize=(18, 4.5), constrained_layout=True)
    for v in VARIANTS:
        if v.name not in result["variants"]:
            continue
        colour = COLOURS.get(v.name)
        rejection, kl, labelled, x = [], [], False, []
        for s in seeds:
            loaded = load(run_dir(out, v.name, s))
            if loaded is None:
                continue
            _, rows = loaded
            x = x if len(x) >= len(rows) else [r["completions"] for r in rows]
            rejection.append(moving_average([100 * r["rejected_frac"] for r in rows], window))
            kl.append(moving_average([r.get("kl_realised", 0.0) for r in rows], window))
            pairs = step_pairs(rows)
            if pairs:
                label = None if labelled else v.label
                cal_ax.scatter(*zip(*pairs), s=3, alpha=0.3, color=colour, label=label)
                labelled = True
        if not kl:
            continue
        n = min(map(len, kl))
        mean = [statistics.fmean(col) for col in zip(*(k[:n] for k in kl))]
        kl_ax.plot(x[:n], mean, color=colour, label=v.label)
        if v.family == "capo" and v.rule != "max_policy_shift":
            mean = [statistics.fmean(col) for col in zip(*(r[:n] for r in rejection))]
            rej_ax.plot(x[:n], mean, color=colour, label=v.label)
    rej_ax.set(
        xlabel="training completions",
        ylabel="completion tokens rejected (%)",
        title=f"CAPO token rejection ({window}-step average, mean of seeds)",
    )
    cal_ax.set(
        xscale="log",
        yscale="log",
        xlabel="predicted KL of the step (quadratic model), tracked parameters",
        ylabel="realised KL of the step",
        title=f"Each step: realised against predicted (≥ {KL_FLOOR:g})",
    )
    if cal_ax.collections:
        lo, hi = cal_ax.get_xlim()
        cal_ax.plot((lo, hi), (lo, hi), color="grey", linestyle=":", linewidth=1)
    kl_ax.set(
        yscale="log",
        xlabel="training completions",
        ylabel="KL(before ‖ after) per token, whole model",
        title=f"The policy's change per step ({window}-step average, mean of seeds)",
    )
    for ax in (rej_ax, cal_ax, kl_ax):
        if ax.lines or ax.collections:
            ax.legend(fontsize=7, markerscale=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(result: dict, path: Path) -> None:
    """Accuracy at the completion budget against the learning rate, every seed and the mean."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for name in sorted({r["variant"] for r in result.get("lr_sweep", [])}):
        rows = [r for r in result["lr_sweep"] if r["variant"] == name]
        lrs = sorted({r["lr"] for r in rows})
        colour = COLOURS.get(name)
        means = [
            statistics.fmean(r["accuracy_at_budget"] for r in rows if r["lr"] == lr) for lr in lrs
        ]
        ax.plot(
            lrs,
            means,
            color=colour,
            marker="o",
            label=BY_NAME[name].label.removesuffix(", aggressive"),
        )
        for r in rows:
            ax.scatter(
                r["lr"],
                r["accuracy_at_budget"],
                color=colour,
                s=14,
                marker="x" if r["collapsed"] else ".",
            )
    initial = [r["initial_accuracy"] for r in result.get("lr_sweep", [])]
    if initial:
        ax.axhline(
            statistics.fmean(initial),
            color="grey",
            linestyle=":",
            linewidth=1,
            label="initial accuracy (below: collapsed, ×)",
        )
    ax.set(
        xscale="log",
        xlabel="learning rate (batch of 16 completions)",
        ylabel="test accuracy at the budget",
        ylim=(0, 1),
        title="Robustness to the learning rate",
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    """The docs' table: one row per variant."""
    lines = [
        "| variant | collapsed | final % | best % | lowest % | completions to target "
        "| rejected %, mean / peak | realised ÷ predicted KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for info in result["variants"].values():
        cal = [c for c in info["calibration"] if c]
        ratio = (
            f"{statistics.median(c['realised_over_predicted_median'] for c in cal):.2f}"
            if cal
            else "–"
        )
        reach = info.get("completions_to_target")
        lines.append(
            f"| {info['label']} | {info['collapsed']} of {info['seeds']} "
            f"| {100 * info['final'][0]:.1f} ± {100 * info['final'][1]:.1f} "
            f"| {100 * info['best'][0]:.1f} ± {100 * info['best'][1]:.1f} "
            f"| {100 * info['lowest'][0]:.1f} "
            f"| {'never' if reach is None else f'{reach:,}'} "
            f"| {100 * info['rejected_mean']:.1f} / {100 * info['rejected_peak']:.1f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def calibration_table(result: dict) -> str:
    """Per variant: realised ÷ predicted KL of the tracked parameters' steps (median of the runs'
    medians, the lowest 10th and highest 90th percentile), and median KL per step."""
    lines = [
        "| variant | steps | realised ÷ predicted, median (p10–p90) | tracked KL per step "
        "| whole-model KL per step |",
        "|---|---|---|---|---|",
    ]
    for info in result["variants"].values():
        cal = [c for c in info["calibration"] if c]
        if not cal:
            continue
        whole = [c["whole_model_kl_median"] for c in cal if c["whole_model_kl_median"] is not None]
        lines.append(
            f"| {info['label']} | {sum(c['steps'] for c in cal):,} "
            f"| {statistics.median(c['realised_over_predicted_median'] for c in cal):.3f} "
            f"({min(c['realised_over_predicted_p10'] for c in cal):.3f}–"
            f"{max(c['realised_over_predicted_p90'] for c in cal):.3f}) "
            f"| {statistics.median(c['tracked_kl_median'] for c in cal):.2e} "
            f"| {f'{statistics.median(whole):.2e}' if whole else '–'} |"
        )
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """Per learning rate and method: collapsed seeds, accuracy at the budget, and completions to
    the target (conservative GRPO's final accuracy) of the seed-mean curve."""
    rows = result.get("lr_sweep", [])
    names = sorted({r["variant"] for r in rows}, key=lambda n: BY_NAME[n].family != "grpo")
    cell = "collapsed, accuracy %, completions to target"
    head = " | ".join(f"{BY_NAME[n].label.removesuffix(', aggressive')}: {cell}" for n in names)
    lines = [f"| lr | {head} |", "|---" * (len(names) + 1) + "|"]
    for lr in sorted({r["lr"] for r in rows}):
        cells = []
        for n in names:
            mine = [r for r in rows if r["variant"] == n and r["lr"] == lr]
            if not mine:
                cells.append("–")
                continue
            mean, std = mean_std([100 * r["accuracy_at_budget"] for r in mine])
            reach = next(
                (
                    c["completions"]
                    for c in result.get("sweep_completions_to_target", [])
                    if (c["variant"], c["lr"]) == (n, lr)
                ),
                None,
            )
            cells.append(
                f"{sum(r['collapsed'] for r in mine)} of {len(mine)}, {mean:.1f} ± {std:.1f}, "
                f"{'never' if reach is None else f'{reach:,}'}"
            )
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        "--sweep-variant",
        default="capo_step-all",
        choices=[v.name for v in VARIANTS if v.family == "capo"],
        help="the CAPO variant swept against GRPO (the best one)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/evidence", help="the runs' directories")
    parser.add_argument("--json", default="benchmarks/results/stability.json")
    parser.add_argument("--figures", default="docs/img", help="where the figures go")
    parser.add_argument("grpo_args", nargs="*", help="after --: more examples/grpo.py options")
    args = parser.parse_args(argv)
    out = Path(args.out)
    began = time.time()
    if args.stage in ("all", "variants"):
        jobs = []
        for s in args.seeds:
            for name in args.variants:
                where = run_dir(out, name, s)
                jobs.append((command(BY_NAME[name], s, where, None, args.grpo_args), where))
        execute(jobs, args.jobs)
    if args.stage in ("all", "sweep"):
        jobs = []
        for lr in args.lrs:
            for s in args.seeds:
                for name in ("grpo-aggressive", args.sweep_variant):
                    where = run_dir(out, name, s, lr)
                    jobs.append((command(BY_NAME[name], s, where, lr, args.grpo_args), where))
        execute(jobs, args.jobs)
    result = aggregate(out, args.seeds, args.lrs, args.sweep_variant)
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
        plot_steps(result, out, args.seeds, figures / "stability-steps.png")
        print(table(result))
        print(calibration_table(result))
    if result.get("lr_sweep"):
        plot_sweep(result, figures / "stability-lr.png")
        print(sweep_table(result))
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
