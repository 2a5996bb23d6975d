"""The real-model study's bookkeeping: resuming, the JSON's fields, collapse with its margin, the
table and the figure (on synthetic run directories; the runs themselves are the example's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study import real_model
from study.aggregate import collapsed
from study.run import Job, done, execute, run_dir


def fake_run(where: Path, variant: str, seed: int, curve: list[list[float]], **extra) -> None:
    """A finished run directory as the example writes it for ``--model smollm2``."""
    where.mkdir(parents=True, exist_ok=True)
    accuracies = [a for _, a in curve]
    bounded = variant.startswith("trust_region")
    run = {
        "method": "grpo" if variant.startswith("grpo") else "capo",
        "variant": variant.split("-")[0],
        "regime": variant.split("-")[1],
        "seed": seed,
        "test_size": 100,
        "completions": curve[-1][0],
        "steps": 10,
        "lr": 1e-5,
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "rejected_frac": 0.03 if variant.startswith("capo") else 0.0,
        "curve": curve,
        "seconds": 100.0 + seed,
        "max_policy_shift": 1e-3 if bounded else None,
        "realised_over_bound": 0.9 + 0.01 * seed if bounded else None,
        "head_kl_share": 1e-3 * (seed + 1),
    } | extra
    summary = {"model": "SmolLM2-135M-Instruct", "runs": [run]}
    (where / "summary.json").write_text(json.dumps(summary))
    (where / "metrics.jsonl").write_text(json.dumps({"completions": curve[-1][0]}) + "\n")


def test_execute_skips_finished_runs_and_retries_failed_ones(tmp_path, capsys):
    jobs = [Job(("--seeds", str(s)), tmp_path / f"seed{s}") for s in range(3)]
    fake_run(jobs[0].where, "grpo-aggressive", 0, [[0, 0.5], [10, 0.5]])
    called = []

    def target(argv):
        called.append(argv)
        if argv[-1] == "2":
            raise RuntimeError("out of memory")
        print("training")
        fake_run(Path(jobs[int(argv[-1])].where), "grpo-aggressive", 1, [[0, 0.5], [10, 0.6]])

    ran = execute(jobs, workers=0, target=target)
    assert ran == jobs[1:] and called == [("--seeds", "1"), ("--seeds", "2")]
    assert done(jobs[1].where) and not done(jobs[2].where)
    assert "training" in (jobs[1].where / "log.txt").read_text()
    assert "out of memory" in (jobs[2].where / "log.txt").read_text()
    assert "FAILED" in capsys.readouterr().out
    called.clear()
    assert execute(jobs, workers=0, target=target) == jobs[2:]  # only the failed one again


def test_collapse_needs_more_than_noise():
    run = {"initial_accuracy": 0.5, "final_accuracy": 0.45, "test_size": 100}
    assert real_model.margin(run) == pytest.approx(0.1)  # two standard errors of 0.5 on 100
    assert not collapsed(run, real_model.margin(run))
    assert collapsed(run | {"final_accuracy": 0.39}, real_model.margin(run))


def test_report_writes_every_field(tmp_path):
    out = tmp_path / "runs"
    seeds = [0, 1, 2]
    shapes = {
        "grpo-conservative": [0.42, 0.45, 0.5],
        "grpo-aggressive": [0.42, 0.6, 0.1],
        "capo-aggressive": [0.42, 0.3, 0.05],
        "trust_region-aggressive": [0.42, 0.55, 0.7],
    }
    for name, accs in shapes.items():
        for s in seeds:
            curve = [[c, a] for c, a in zip((0, 100, 200), accs, strict=True)]
            fake_run(run_dir(out, name, s), name, s, curve)
    path = tmp_path / "real-model.json"
    figure = tmp_path / "img" / "real-model.png"
    result = real_model.main(
        ["--stage", "report", "--out", str(out), "--json", str(path), "--figure", str(figure)]
    )
    written = json.loads(path.read_text())
    assert written["model"] == "SmolLM2-135M-Instruct" and written["seeds"] == seeds
    assert len(written["runs"]) == 12
    fields = {
        "method", "variant", "regime", "seed", "initial_accuracy", "final_accuracy",
        "best_accuracy", "collapsed", "rejected_frac", "realised_over_bound", "head_kl_share",
    }  # fmt: skip
    assert all(fields <= set(r) for r in written["runs"])
    trust = [r for r in written["runs"] if "trust_region" in r["variant"]]
    assert len(trust) == 3 and all(r["method"] == "capo" for r in trust)
    assert [r["realised_over_bound"] for r in trust] == pytest.approx([0.9, 0.91, 0.92])
    assert all(r["realised_over_bound"] is None for r in written["runs"] if r not in trust)
    fell = {r["variant"] for r in written["runs"] if r["collapsed"]}
    assert fell == {"grpo-aggressive", "capo-aggressive"}
    info = written["variants"]["trust_region-aggressive"]
    assert info["collapsed"] == 0 and info["realised_over_bound_median"] == pytest.approx(0.91)
    assert info["head_kl_share_median"] == pytest.approx(2e-3)
    assert info["final"][0] == pytest.approx(0.7)
    assert "| Trust region (policy KL ≤ 3e-4), aggressive | 0 of 3 |" in real_model.table(result)
    assert "| CAPO token rejection (paper), aggressive | 3 of 3 |" in real_model.table(result)
    assert figure.stat().st_size > 10_000


def test_a_partial_study_reports_what_finished(tmp_path):
    out = tmp_path / "runs"
    fake_run(run_dir(out, "grpo-aggressive", 1), "grpo-aggressive", 1, [[0, 0.4], [50, 0.5]])
    result = real_model.aggregate(out, [0, 1, 2], list(real_model.BY_NAME))
    assert [r["seed"] for r in result["runs"]] == [1]
    assert list(result["variants"]) == ["grpo-aggressive"]
    assert real_model.aggregate(tmp_path / "none", [0], ["grpo-aggressive"])["runs"] == []


def test_the_committed_study_has_the_fields_and_seeds_the_evidence_needs():
    # benchmarks/results/real-model.json as docs/results.md reports it: every run with its
    # fields, at least 3 seeds of the aggressive variants, the trust region's realised ÷ bound
    path = Path(__file__).resolve().parents[2] / "benchmarks/results/real-model.json"
    result = json.loads(path.read_text())
    assert result["model"] == "SmolLM2-135M-Instruct"
    fields = {"method", "variant", "regime", "seed", "initial_accuracy", "final_accuracy",
              "best_accuracy", "collapsed", "rejected_frac", "realised_over_bound"}  # fmt: skip
    for run in result["runs"]:
        assert fields <= run.keys()
        assert (run["realised_over_bound"] is not None) == ("trust_region" in run["variant"])
    for name in ("grpo-aggressive", "capo-aggressive", "trust_region-aggressive"):
        seeds = {r["seed"] for r in result["runs"] if r["variant"] == name}
        assert len(seeds) >= 3, name
    assert "grpo-conservative" in {r["variant"] for r in result["runs"]}


def test_the_reference_runs_only_its_seeds():
    names = list(real_model.BY_NAME)
    runs = real_model.plan([0, 1, 2], names, 1)
    assert len(runs) == 10
    assert [s for s, n in runs if n == "grpo-conservative"] == [0]
    assert all(len([1 for s, n in runs if n == name]) == 3 for name in names[1:])
    assert len(real_model.plan([0, 1, 2], names, 3)) == 12
