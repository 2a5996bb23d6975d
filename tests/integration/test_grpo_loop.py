"""The GRPO example end to end: two optimizer steps with and without CAPO, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from grpolab import arith, cli, config, policy

TINY = [
    "--seeds", "0",
    "--steps", "2",
    "--group", "4",
    "--aggressive-prompts", "2",
    "--conservative-prompts", "4",
    "--test-size", "8",
    "--warm-target", "0",
    "--device", "cpu",
]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, *args: str) -> tuple[dict, list[dict], Path]:
    out = tmp_path / "out"
    summary = cli.main([*TINY, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args])
    return summary, _rows(out), out


def test_two_steps_with_and_without_capo_write_the_outputs(tmp_path):
    methods = ["grpo-conservative", "grpo-aggressive", "capo-aggressive", "capo_step-aggressive"]
    summary, rows, out = _run(tmp_path, "--methods", *methods)
    assert [(r["method"], r["variant"], r["regime"]) for r in summary["runs"]] == [
        ("grpo", "grpo", "conservative"),
        ("grpo", "grpo", "aggressive"),
        ("capo", "capo", "aggressive"),
        ("capo", "capo_step", "aggressive"),
    ]
    for run in summary["runs"]:
        assert run["seed"] == 0
        assert run["completions"] == 2 * 2 * 4  # the aggressive budget, for every run
        assert run["curve"][0] == [0, run["initial_accuracy"]]
        assert run["curve"][-1] == [run["completions"], run["final_accuracy"]]
        assert run["best_accuracy"] == max(a for _, a in run["curve"])
        assert 0.0 <= run["rejected_frac"] <= 1.0
        assert run["method"] != "grpo" or run["rejected_frac"] == 0.0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["runs"] == summary["runs"]
    assert (out / "accuracy.png").stat().st_size > 0
    assert len(rows) == 1 + 2 + 2 + 2  # the conservative run takes one step of 4 prompts
    capo_rows = [r for r in rows if r["variant"] == "capo"]
    for row in capo_rows:
        for key in ("rejected_frac", "objective_shift_mean", "policy_shift_mean"):
            assert key in row
        assert row["policy_shift_realised"] >= 0.0
    for row in rows:
        assert row["kl_realised"] >= 0.0 and 0.0 <= row["reward_mean"] <= 1.0
    for row in rows:
        if row["variant"] == "capo_step":
            assert row["rejected_frac"] == 0.0 and 0.0 < row["step_scale"] <= 1.0
        else:
            assert "step_scale" not in row


def test_whole_model_step_control(tmp_path):
    """CAPO's step bound over every parameter (per-token models through torch.func)."""
    _, rows, _ = _run(
        tmp_path,
        "--methods", "capo_step-aggressive",
        "--capo-params", "all",
        "--capo-levels", "batch",
        "--max-policy-shift", "1e-6",
    )  # fmt: skip
    for row in rows:
        assert row["step_policy_shift"] >= 0.0 and 0.0 < row["step_scale"] <= 1.0
        if row["step_policy_shift"] > 1e-6:
            assert row["step_scale"] < 1.0


def test_step_rejection_in_the_loop(tmp_path, monkeypatch):
    """The largest-shift tokens of the actual update rejected before scaling, over micro-batches:
    the loop's closure re-evaluates every micro-batch with the masks the step left."""
    # an untrained model earns no reward: reward the completions' length parity instead, so
    # advantages (and updates) are not zero
    monkeypatch.setattr(arith, "check", lambda text, answer: float(len(text) % 2))
    _, rows, _ = _run(
        tmp_path,
        "--methods", "capo_step-aggressive",
        "--capo-params", "all",
        "--max-policy-shift", "1e-6",
        "--step-reject-frac", "0.25",
        "--micro-batch", "4",
    )  # fmt: skip
    for row in rows:
        assert 0 < row["step_rejected"] <= 0.25 * row["tokens"]
        assert row["kept_tokens"] == row["tokens"] - row["step_rejected"]
        assert row["rejected_frac"] == pytest.approx(row["step_rejected"] / row["tokens"])
        assert 0.0 < row["step_scale"] < 1.0


def test_capo_without_rejection_is_grpo(tmp_path):
    """With thresholds nothing reaches CAPO keeps every token: the loop is GRPO, step for step."""
    _, rows, _ = _run(
        tmp_path,
        "--methods", "grpo-aggressive", "capo-aggressive",
        "--delta-h", "1e30",
        "--delta-f", "1e30",
    )  # fmt: skip
    grpo_rows = [r for r in rows if r["method"] == "grpo"]
    capo_rows = [r for r in rows if r["method"] == "capo"]
    assert all(r["rejected_frac"] == 0.0 for r in capo_rows)
    for g, c in zip(grpo_rows, capo_rows, strict=True):
        for key in ("loss", "reward_mean", "grad_norm", "kl_realised"):
            assert g[key] == c[key], key
        assert g.get("test_accuracy") == c.get("test_accuracy")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_loop_options(tmp_path, loss_type):
    summary, rows, _ = _run(
        tmp_path,
        "--methods", "capo-aggressive",
        "--loss-type", loss_type,
        "--num-iterations", "2",
        "--micro-batch", "4",
        "--beta", "0.1",
        "--top-k", "5",
        "--temperature", "0.9",
        "--no-scale-rewards",
    )  # fmt: skip
    assert len(rows) == 2 and all(r["kl_ref"] >= 0.0 for r in rows)
    assert summary["config"]["loss_type"] == loss_type


def test_local_checkpoint_and_jsonl_data(tmp_path):
    tokenizer = arith.build_tokenizer()
    model = policy.build_model(tokenizer, hidden_size=16, layers=1, heads=2, max_len=64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(20))
    )
    summary, rows, _ = _run(
        tmp_path,
        "--methods", "grpo-aggressive", "capo-aggressive",
        "--model", str(tmp_path / "model"),
        "--data", str(data),
        "--max-new-tokens", "6",
    )  # fmt: skip
    assert summary["policy"] == str(tmp_path / "model")
    assert len(summary["runs"]) == 2 and len(rows) == 4
    assert not (tmp_path / "cache").exists()  # no warm start for a given model


def test_warm_start_is_cached(tmp_path, monkeypatch):
    spec = policy.WarmStart(max_steps=10, test_size=8)
    model, tokenizer, path = policy.load_or_warm_start(spec, tmp_path, torch.device("cpu"))
    assert (path / "warm_start.json").exists() and path.parent == tmp_path
    monkeypatch.setattr(policy, "warm_start", lambda *a: pytest.fail("cache not reused"))
    again, _, same = policy.load_or_warm_start(spec, tmp_path, torch.device("cpu"))
    assert same == path
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    assert tokenizer("12+34=").input_ids == arith.build_tokenizer()("12+34=").input_ids


def test_quick_defaults_yield_to_explicit_options():
    QUICK = config.PROFILES["toy"]["quick"]
    quick = config.parse(["--quick"])
    assert quick.seeds == QUICK["seeds"] and quick.steps == QUICK["steps"]
    assert config.parse(["--quick", "--steps", "7"]).steps == 7
    assert config.parse([]).steps != QUICK["steps"]
    with pytest.raises(SystemExit):
        config.parse(["--methods", "ppo-aggressive"])


def test_every_run_gets_the_same_completion_budget():
    cfg = config.parse(["--steps", "120", "--methods", *config.METHODS])
    runs = config.plan(cfg)
    budgets = {r.steps * r.prompts * cfg.group for r in runs}
    assert budgets == {120 * cfg.aggressive_prompts * cfg.group}
    aggressive = next(r for r in runs if r.regime == "aggressive")
    conservative = next(r for r in runs if r.regime == "conservative")
    assert aggressive.lr == pytest.approx(cfg.aggressive_lr_mult * conservative.lr)
