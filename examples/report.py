"""The comparison's figure and terminal table, from ``summary.json`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot", "table"]

NAMES = {
    "grpo": "GRPO",
    "capo": "CAPO (token rejection)",
    "capo_step": "CAPO step (max_policy_shift)",
}
COLOURS = {
    ("grpo", "conservative"): "tab:blue",
    ("grpo", "aggressive"): "tab:red",
    ("capo", "aggressive"): "tab:green",
    ("capo", "conservative"): "tab:purple",
    ("capo_step", "aggressive"): "tab:orange",
    ("capo_step", "conservative"): "tab:brown",
}


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step statistics of a few hundred tokens are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(summary: dict, metrics: Path, path: Path, window: int = 20) -> None:
    """Three panels against training completions: test accuracy of every run, CAPO's token
    rejection rate, and the policy's realised KL per step (both ``window``-step averages)."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    fig, (acc_ax, rej_ax, kl_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    labelled = set()
    for run in summary["runs"]:
        key = (run["variant"], run["regime"])
        label = None if key in labelled else f"{NAMES.get(key[0], key[0])} {key[1]}"
        labelled.add(key)
        style = {"color": COLOURS.get(key), "alpha": 0.8, "label": label}
        acc_ax.plot(*zip(*run["curve"]), **style)
        steps = [r for r in rows if (r["variant"], r["regime"], r["seed"]) == (*key, run["seed"])]
        x = [r["completions"] for r in steps]
        if run["variant"] != "grpo":
            rej_ax.plot(x, _smooth([100 * r["rejected_frac"] for r in steps], window), **style)
        if steps and "kl_realised" in steps[0]:
            kl_ax.plot(x, _smooth([r["kl_realised"] for r in steps], window), **style)
    acc_ax.set(xlabel="training completions", ylabel="test accuracy (greedy)", ylim=(0, 1))
    acc_ax.set_title("Test accuracy")
    rej_ax.set(xlabel="training completions", ylabel="completion tokens rejected (%)")
    rej_ax.set_title(f"CAPO token rejection rate ({window}-step average)")
    kl_ax.set(xlabel="training completions", ylabel="KL(before ‖ after) per token")
    if any(max(line.get_ydata(), default=0) > 0 for line in kl_ax.lines):
        kl_ax.set_yscale("log")  # steps span orders of magnitude
    kl_ax.set_title(f"Policy change per optimizer step ({window}-step average)")
    for ax in (acc_ax, rej_ax, kl_ax):
        if ax.lines:
            ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """One line per method and regime, mean ± std over seeds (in %): test accuracy at the start,
    at the end, at its best and at its lowest after the start, and CAPO's token rejection rate."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in summary["runs"]:
        groups[(run["variant"], run["regime"])].append(run)

    def stat(values: list[float]) -> str:
        values = [100 * v for v in values]
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    columns = ["initial", "final", "best", "lowest", "rejected"]
    header = f"{'method':<9} {'regime':<13} {'lr':>8} {'compl/step':>10} {'seeds':>5} " + " ".join(
        f"{c + ' %':>12}" for c in columns
    )
    lines = [header, "-" * len(header)]
    for (method, regime), runs in groups.items():
        cells = [
            stat([r["initial_accuracy"] for r in runs]),
            stat([r["final_accuracy"] for r in runs]),
            stat([r["best_accuracy"] for r in runs]),
            stat([min(a for _, a in r["curve"][1:]) for r in runs]),
            stat([r["rejected_frac"] for r in runs]),
        ]
        lines.append(
            f"{method:<9} {regime:<13} {runs[0]['lr']:>8.1e} {runs[0]['completions_per_step']:>10} "
            f"{len(runs):>5} " + " ".join(f"{c:>12}" for c in cells)
        )
    return "\n".join(lines)
