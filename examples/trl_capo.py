"""Train a tiny model to add numbers with TRL's GRPO and CAPO (``CAPOGRPOTrainer``).

Everything is built here, offline: problems such as ``12+34=`` with answer ``46``, a
character-level tokenizer (``tokenizers`` wrapped in ``PreTrainedTokenizerFast``), a small
``Qwen2ForCausalLM`` from a config, and a reward that parses the completion (1 for the right sum,
partial credit for another number, 0 for anything else). Every ``CAPOConfig`` option parses from
the command line::

    python examples/trl_capo.py --smoke                      # 2 steps on CPU, prints the metrics
    python examples/trl_capo.py --max_steps 300 --capo_rule symmetric --capo_delta_h 1e-2
"""

from __future__ import annotations

import gc
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from curvopt.integrations.trl import CAPOConfig, CAPOGRPOTrainer

CHARACTERS = "0123456789+="
PAD, EOS = "<pad>", "<eos>"
ANSWER = re.compile(r"\d+")

# Defaults for this task, before the user's flags (argparse keeps the last occurrence of a flag).
# The CAPO thresholds are looser than the paper's (|m_H| < 1e-2, m_F < 1e-4) because the learning
# rate of this tiny model is about a thousand times larger than that of a 7B model.
TASK_ARGS = [
    "--max_steps", "300",
    "--per_device_train_batch_size", "32",
    "--num_generations", "8",
    "--max_completion_length", "4",
    "--learning_rate", "1e-3",
    "--warmup_steps", "10",
    "--logging_steps", "10",
    "--bf16", "false",
    "--use_vllm", "false",
    "--report_to", "none",
    "--save_strategy", "no",
    "--capo_rule", "symmetric",
    "--capo_delta_h", "0.1",
    "--capo_delta_f", "1e-2",
    "--capo_track_realised", "true",
]  # fmt: skip
# --smoke: 2 tiny steps on CPU.
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
    """The arithmetic task and the model size."""

    smoke: bool = field(default=False, metadata={"help": "2 tiny steps on CPU, offline."})
    digits: int = field(default=2, metadata={"help": "Digits of each operand."})
    problems: int = field(default=2048, metadata={"help": "Training problems."})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    layers: int = field(default=2, metadata={"help": "Decoder layers."})


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARACTERS``, plus padding and end-of-sequence."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, *CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def make_problems(n: int, digits: int, seed: int) -> Dataset:
    """``n`` problems ``"a+b="`` with ``answer`` the decimal sum."""
    rng = random.Random(seed)
    high = 10**digits - 1
    pairs = [(rng.randint(0, high), rng.randint(0, high)) for _ in range(n)]
    return Dataset.from_dict(
        {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )


def arithmetic_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1 for the exact sum; for another number, 0.1 plus up to 0.5 for the digits it gets right
    (aligned from the units); 0 for anything that is not a number."""
    rewards = []
    for text, target in zip(completions, answer):
        text = text.strip()
        if text == target:
            rewards.append(1.0)
        elif ANSWER.fullmatch(text):
            right = sum(a == b for a, b in zip(reversed(text), reversed(target)))
            rewards.append(0.1 + 0.5 * right / max(len(text), len(target)))
        else:
            rewards.append(0.0)
    return rewards


def make_model(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int, layers: int
) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config)


def main(argv: list[str] | None = None) -> CAPOGRPOTrainer:
    """Parse the command line, train, print the last CAPO metrics; return the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = TASK_ARGS + (SMOKE_ARGS if "--smoke" in argv else []) + argv
    if not any(a.startswith("--output_dir") for a in argv):
        argv += ["--output_dir", tempfile.mkdtemp(prefix="trl_capo_")]
    task, config = HfArgumentParser((TaskArguments, CAPOConfig)).parse_args_into_dataclasses(argv)
    torch.manual_seed(config.seed)
    tokenizer = make_tokenizer()
    trainer = CAPOGRPOTrainer(
        model=make_model(tokenizer, task.hidden_size, task.layers),
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=make_problems(task.problems, task.digits, config.seed),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "capo/rejected_frac" in h]
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
