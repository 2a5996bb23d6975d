"""The studies' figures and tables (docs/results.md), from their aggregates."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from grpolab.report import moving_average

from .aggregate import KL_FLOOR, load, mean_std, step_pairs
from .run import Variant, run_dir

__all__ = [
    "COLOURS",
    "accuracy_bands",
    "calibration_table",
    "plot_accuracy",
    "plot_steps",
    "plot_sweep",
    "sweep_table",
    "table",
]

COLOURS = {
    "grpo-conservative": "tab:blue",
    "grpo-aggressive": "tab:red",
    "dr_grpo-aggressive": "tab:pink",
    "capo-symmetric": "tab:green",
    "capo-theorem": "tab:olive",
    "capo_step-head": "tab:orange",
    "capo_step-all": "tab:purple",
    "capo_step-all-reject": "tab:brown",
    "trust_region": "tab:cyan",
    "trust_region-1e-4": "tab:gray",
    "trust_region-3e-4": "teal",
    "trust_region-1e-3": "tab:cyan",
    "trust_region-3e-3": "navy",
}


def accuracy_bands(ax: plt.Axes, result: dict, names: list[str], colours: dict[str, str]) -> None:
    """Per variant of ``names``: its seed-mean test accuracy, and the min–max band of its seeds
    at the evaluations every seed made (``result["variants"][name]["mean_curve"]``)."""
    for name in names:
        info = result["variants"][name]
        runs = [r for r in result["runs"] if r["variant"] == name]
        x = [c for c, _ in info["mean_curve"]]
        per = [dict(map(tuple, r["curve"])) for r in runs]
        lo = [min(p[c] for p in per) for c in x]
        hi = [max(p[c] for p in per) for c in x]
        colour = colours.get(name)
        seeds = len(runs)
        most = max(v["seeds"] for v in result["variants"].values())
        label = info["label"] if seeds == most else f"{info['label']} ({seeds} of {most} seeds)"
        ax.plot(x, [a for _, a in info["mean_curve"]], color=colour, label=label)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)


def plot_accuracy(result: dict, path: Path) -> None:
    """Seed-mean test accuracy with min–max bands: baselines and rejection on the left,
    baselines and the curvature-aware step on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True, constrained_layout=True)
    panels = (
        ("GRPO baselines and CAPO token rejection", ("grpo", "dr_grpo", "capo-")),
        ("GRPO baselines, CAPO's step and the trust region", ("grpo", "capo_step", "trust_region")),
    )
    for ax, (title, prefixes) in zip(axes, panels):
        names = [n for n in result["variants"] if n.startswith(prefixes)]
        accuracy_bands(ax, result, names, COLOURS)
        if "target_accuracy" in result:
            ax.axhline(result["target_accuracy"], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="training completions", title=title, ylim=(0, 1))
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel(f"test accuracy, mean and min–max of {result['seeds']} seeds")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(
    result: dict,
    variants: tuple[Variant, ...],
    out: Path,
    seeds: list[int],
    path: Path,
    window: int = 50,
) -> None:
    """CAPO's rejection rate over training, each step's realised against predicted KL (of the
    parameters CAPO tracks), and every variant's whole-model KL per step."""
    fig, (rej_ax, cal_ax, kl_ax) = plt.subplots(1, 3, figsize=(18, 4.5), constrained_layout=True)
    for v in variants:
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
        if v.rule in ("symmetric", "theorem"):
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


def plot_sweep(result: dict, by_name: dict[str, Variant], path: Path) -> None:
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
            label=by_name[name].label.removesuffix(", aggressive"),
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


def bound_table(result: dict) -> str:
    """Per variant with a KL bound: how often the bound was active, the KL of the step taken ÷
    the bound on those steps — as the trust region measured it and by the example's float64
    forwards after the step — (median, p10–p90, highest), trial forwards per step, the output
    layer's share of a step's KL."""
    lines = [
        "| variant | active steps | measured ÷ bound, median (p10–p90) | by forwards after the "
        "step, median (p10–p90), highest | trials per step, mean | output layer's share |",
        "|---|---|---|---|---|---|",
    ]

    def cell(qs: list[dict | None], highest: bool = False) -> str:
        qs = [q for q in qs if q]
        if not qs:
            return "–"
        out = (
            f"{statistics.median(q['median'] for q in qs):.3f} "
            f"({min(q['p10'] for q in qs):.3f}–{max(q['p90'] for q in qs):.3f})"
        )
        return out + (f", {max(q['max'] for q in qs):.3f}" if highest else "")

    for info in result["variants"].values():
        cal = [c for c in info.get("bound_calibration", []) if c]
        if not cal:
            continue
        trials = [c["trials_mean"] for c in cal if c["trials_mean"] is not None]
        share = [c["head_kl_share_median"] for c in cal if c["head_kl_share_median"] is not None]
        active = sum(c["active_steps"] for c in cal) / max(1, sum(c["steps"] for c in cal))
        lines.append(
            f"| {info['label']} | {100 * active:.0f} % "
            f"| {cell([c['measured_over_bound'] for c in cal])} "
            f"| {cell([c['exact_over_bound'] for c in cal], highest=True)} "
            f"| {f'{statistics.fmean(trials):.2f}' if trials else '–'} "
            f"| {f'1/{1 / statistics.median(share):,.0f}' if share else '–'} |"
        )
    return "\n".join(lines)


def sweep_table(result: dict, by_name: dict[str, Variant]) -> str:
    """Per learning rate and method: collapsed seeds, accuracy at the budget, and completions to
    the target (conservative GRPO's final accuracy) of the seed-mean curve."""
    rows = result.get("lr_sweep", [])
    names = sorted({r["variant"] for r in rows}, key=lambda n: by_name[n].family != "grpo")
    cell = "collapsed, accuracy %, completions to target"
    head = " | ".join(f"{by_name[n].label.removesuffix(', aggressive')}: {cell}" for n in names)
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
