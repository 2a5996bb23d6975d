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

COLOURS = {
    ("grpo", "conservative"): "tab:blue",
    ("grpo", "aggressive"): "tab:red",
    ("capo", "aggressive"): "tab:green",
    ("capo", "conservative"): "tab:purple",
}


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step rejection rates are noisy at a few tokens a step)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(summary: dict, metrics: Path, path: Path) -> None:
    """Test accuracy against training completions for every run, and CAPO's rejection rate."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    fig, (acc_ax, rej_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    labelled = set()
    for run in summary["runs"]:
        key = (run["method"], run["regime"])
        x, y = zip(*run["curve"])
        label = None if key in labelled else f"{key[0].upper()} {key[1]}"
        labelled.add(key)
        acc_ax.plot(x, y, color=COLOURS.get(key), alpha=0.85, label=label)
        if run["method"] == "capo":
            steps = [
                r for r in rows if (r["method"], r["regime"], r["seed"]) == (*key, run["seed"])
            ]
            rej_ax.plot(
                [r["completions"] for r in steps],
                _smooth([100 * r["rejected_frac"] for r in steps], 20),
                color=COLOURS.get(key),
                alpha=0.85,
                label=f"{key[1]}, seed {run['seed']}",
            )
    acc_ax.set(xlabel="training completions", ylabel="test accuracy (greedy)", ylim=(0, 1))
    acc_ax.set_title("Test accuracy")
    acc_ax.legend()
    rej_ax.set(xlabel="training completions", ylabel="tokens rejected by CAPO (%)")
    rej_ax.set_title("CAPO token rejection rate (20-step average)")
    if rej_ax.lines:
        rej_ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    """One line per method and regime: accuracies (mean ± std over seeds) and rejection rate."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in summary["runs"]:
        groups[(run["method"], run["regime"])].append(run)

    def stat(runs: list[dict], key: str, scale: float = 100.0) -> str:
        values = [scale * r[key] for r in runs]
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    header = (
        f"{'method':<6} {'regime':<13} {'lr':>8} {'compl/step':>10} {'seeds':>5} "
        f"{'initial %':>11} {'final %':>11} {'best %':>11} {'rejected %':>11}"
    )
    lines = [header, "-" * len(header)]
    for (method, regime), runs in groups.items():
        accuracies = [
            stat(runs, key) for key in ("initial_accuracy", "final_accuracy", "best_accuracy")
        ]
        lines.append(
            f"{method:<6} {regime:<13} {runs[0]['lr']:>8.1e} {runs[0]['completions_per_step']:>10} "
            f"{len(runs):>5} "
            + " ".join(f"{a:>11}" for a in accuracies)
            + f" {stat(runs, 'rejected_frac'):>11}"
        )
    return "\n".join(lines)
