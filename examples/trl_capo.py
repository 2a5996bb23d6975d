"""GRPO with CAPO in TRL (``CAPOGRPOTrainer``) on the main example's arithmetic task.

The task, tokenizer and policy are those of ``examples/grpo.py`` (``grpolab/arith.py``,
``grpolab/policy.py``):
prompts such as ``23+58=``, worked completions ending ``#81``, reward 1 for the right final answer;
the policy is the warm-started 2-layer Qwen2, trained once (about 30 s) and cached. By default
every optimizer step is bounded by the measured whole-policy trust region (mean per-token KL of
the policy per step at most ``capo_max_policy_shift``, 3e-4). Every ``CAPOConfig`` option parses
from the command line::

    python examples/trl_capo.py --smoke                # 2 steps on CPU, prints the metrics
    python examples/trl_capo.py --max_steps 300 --capo_max_policy_shift 3e-4
    # the paper's token rejection instead of the trust region
    python examples/trl_capo.py --capo_levels token --capo_max_policy_shift none \
        --capo_rule symmetric --capo_delta_h 1e-2 --capo_delta_f 1e-4
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from datasets import Dataset
from grpolab import arith, policy
from transformers import HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase

from curvopt.integrations.trl import CAPOConfig, CAPOGRPOTrainer

# Defaults for this task, before the user's flags (argparse keeps the last occurrence of a flag):
# the main example's aggressive regime (32 completions per step at 5× its conservative lr), where
# the trust region (CAPOConfig's default) keeps training stable.
TASK_ARGS = [
    "--max_steps", "300",
    "--per_device_train_batch_size", "32",
    "--num_generations", "8",
    "--max_completion_length", str(arith.addition(2, 1).max_new_tokens),
    "--learning_rate", "3e-4",
    "--warmup_steps", "10",
    "--logging_steps", "10",
    "--bf16", "false",
    "--use_vllm", "false",
    "--report_to", "none",
    "--save_strategy", "no",
]  # fmt: skip
# --smoke: 2 small steps on CPU.
SMOKE_ARGS = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "8",
    "--num_generations", "4",
    "--warmup_steps", "0",
    "--logging_steps", "1",
    "--use_cpu", "true",
]  # fmt: skip


@dataclass
class TaskArguments:
    """The arithmetic task and the policy."""

    smoke: bool = field(default=False, metadata={"help": "2 tiny steps on CPU, offline."})
    digits: int = field(default=2, metadata={"help": "Digits of each operand."})
    problems: int = field(default=2048, metadata={"help": "Training problems."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Warm-start cache (default: $CURVOPT_CACHE or ~/.cache/curvopt)."},
    )


def make_tokenizer() -> PreTrainedTokenizerBase:
    """The task's character-level tokenizer."""
    return arith.build_tokenizer()


def make_model(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int, layers: int
) -> PreTrainedModel:
    """An untrained policy of the main example's architecture, sized ``hidden_size × layers``."""
    return policy.build_model(tokenizer, hidden_size, layers, heads=4, max_len=64)


def make_problems(n: int, digits: int, seed: int) -> Dataset:
    """``n`` training problems (never from the held-out test set): ``prompt`` and ``answer``."""
    held_out = min(256, 10 ** (2 * digits) // 4)  # the main example's test set (256 at 2 digits)
    problems = arith.addition(digits, held_out).sample(random.Random(seed), n)
    return Dataset.from_dict(
        {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
    )


def arithmetic_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """The task's reward: 1 for a completion whose final answer is right, else 0."""
    return [arith.check(c, a) for c, a in zip(completions, answer)]


def main(argv: list[str] | None = None) -> CAPOGRPOTrainer:
    """Parse the command line, train, print the last CAPO metrics; return the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = TASK_ARGS + (SMOKE_ARGS if "--smoke" in argv else []) + argv
    if not any(a.startswith("--output_dir") for a in argv):
        argv += ["--output_dir", tempfile.mkdtemp(prefix="trl_capo_")]
    task, config = HfArgumentParser((TaskArguments, CAPOConfig)).parse_args_into_dataclasses(argv)
    torch.manual_seed(config.seed)
    cache = Path(task.cache_dir) if task.cache_dir else policy.default_cache_dir()
    spec = policy.WarmStart(digits=task.digits)
    model, tokenizer, _ = policy.load_or_warm_start(spec, cache, torch.device("cpu"))
    trainer = CAPOGRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=make_problems(task.problems, task.digits, config.seed),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "capo/skipped_frac" in h]
    last = logged[-1] if logged else {}
    for key in sorted(k for k in last if k.startswith("capo/") or k == "reward"):
        print(f"{key:32s} {last[key]:.6g}")
    if not logged or not all(math.isfinite(v) for k, v in last.items() if k.startswith("capo/")):
        raise SystemExit("CAPO metrics missing or not finite")
    return trainer


def teardown(trainer: CAPOGRPOTrainer) -> None:
    """Under torch.distributed: release DDP's reducer before its process group, then destroy the
    group (left to interpreter exit, the order can be wrong and gloo aborts the process)."""
    if not torch.distributed.is_initialized():
        return
    accelerator = trainer.accelerator
    del trainer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    teardown(main())
