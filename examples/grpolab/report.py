"""The comparison's figure and terminal table, from ``summary.json`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .methods import METHODS

__all__ = ["label", "moving_average", "plot", "table"]

COLOURS = {
    ("grpo", "conservative"): "tab:blue",
    ("grpo", "aggressive"): "tab:red",
    ("capo", "aggressive"): "tab:green",
    ("capo", "conservative"): "tab:purple",
    ("trust_region", "aggressive"): "tab:orange",
    ("trust_region", "conservative"): "tab:olive",
    ("capo_step", "aggressive"): "tab:brown",
    ("capo_step", "conservative"): "tab:pink",
}


def label(run: dict) -> str:
    """How tables and figures name a run's method: the paper's token rejection and the trust
    region by name, with the run's KL bound where it has one."""
    name = METHODS[run["variant"]].label if run["variant"] in METHODS else run["variant"]
    bound = run.get("max_policy_shift")
    if not bound:
        return name
    mantissa, exponent = f"{bound:.2e}".split("e")
    return name.replace("bound", f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}")


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as
    ``values`` (per-step statistics of a few hundred tokens are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(summary: dict, metrics: Path, path: Path, window: int = 20) -> None:
    """Three panels against training completions: test accuracy of every run, the share of tokens
    the paper's token rejection drops, and the policy's KL per step (sampled-token estimate) with
    the trust region's bound (both ``window``-step averages)."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    fig, (acc_ax, rej_ax, kl_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    labelled = set()
    for run in summary["runs"]:
        key = (run["variant"], run["regime"])
        name = None if key in labelled else f"{label(run)}, {key[1]}"
        labelled.add(key)
        style = {"color": COLOURS.get(key), "alpha": 0.8, "label": name}
        acc_ax.plot(*zip(*run["curve"]), **style)
        steps = [r for r in rows if (r["variant"], r["regime"], r["seed"]) == (*key, run["seed"])]
        x = [r["completions"] for r in steps]
        if run["variant"] == "capo":
            rej_ax.plot(
                x, moving_average([100 * r["rejected_frac"] for r in steps], window), **style
            )
        if steps and "kl_realised" in steps[0]:
            kl_ax.plot(x, moving_average([r["kl_realised"] for r in steps], window), **style)
        if run["variant"] == "trust_region" and run.get("max_policy_shift") and name:
            kl_ax.axhline(run["max_policy_shift"], color=style["color"], linestyle=":")
    acc_ax.set(xlabel="training completions", ylabel="test accuracy (greedy)", ylim=(0, 1))
    acc_ax.set_title("Test accuracy")
    rej_ax.set(xlabel="training completions", ylabel="completion tokens rejected (%)")
    rej_ax.set_title(f"Paper's token rejection: tokens dropped ({window}-step average)")
    kl_ax.set(xlabel="training completions", ylabel="KL(before ‖ after) per token")
    if any(max(line.get_ydata(), default=0) > 0 for line in kl_ax.lines):
        kl_ax.set_yscale("log")  # steps span orders of magnitude
    kl_ax.set_title(f"Policy change per step ({window}-step average; dotted: bound)")
    for ax in (acc_ax, rej_ax, kl_ax):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """One line per method and regime, mean ± std over seeds (in %): test accuracy at the start,
    at the end, at its best and at its lowest after the start, the tokens rejected, and for the
    bounded methods the median realised KL of a step ÷ its bound."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in summary["runs"]:
        groups[(run["variant"], run["regime"])].append(run)

    def stat(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
        values = [scale * v for v in values]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    names = {key: label(runs[0]) for key, runs in groups.items()}
    width = max(len("method"), *map(len, names.values()))
    columns = ["initial %", "final %", "best %", "lowest %", "rejected %", "KL ÷ bound"]
    header = (
        f"{'method':<{width}} {'regime':<13} {'lr':>8} {'compl/step':>10} {'seeds':>5} "
        + " ".join(f"{c:>12}" for c in columns)
    )
    lines = [header, "-" * len(header)]
    for key, runs in groups.items():
        ratios = [
            r["realised_over_bound"] for r in runs if r.get("realised_over_bound") is not None
        ]
        cells = [
            stat([r["initial_accuracy"] for r in runs]),
            stat([r["final_accuracy"] for r in runs]),
            stat([r["best_accuracy"] for r in runs]),
            stat([min(a for _, a in r["curve"][1:]) for r in runs]),
            stat([r["rejected_frac"] for r in runs]),
            stat(ratios, scale=1.0, digits=2),
        ]
        lines.append(
            f"{names[key]:<{width}} {key[1]:<13} {runs[0]['lr']:>8.1e} "
            f"{runs[0]['completions_per_step']:>10} {len(runs):>5} "
            + " ".join(f"{c:>12}" for c in cells)
        )
    return "\n".join(lines)
