"""The policy: a tiny Qwen2 causal LM, its supervised warm start, and the on-disk cache.

The warm start trains the model from scratch on reference solutions of training problems (teacher
forcing, loss on the completion only) and stops as soon as greedy decoding solves
``target_accuracy`` of a validation sample of *training* problems (checked every 10 steps), so the
model knows the format and part of the arithmetic but leaves room for reinforcement learning. The
stopping rule, not a step count, fixes the starting accuracy: small models learn addition in a
sudden jump whose timing depends on the seed and the hardware. The result is saved with
``save_pretrained`` (model and tokenizer) in a directory named after everything that determines
it, and later runs load it from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from . import arith
from .rollout import greedy_accuracy

__all__ = [
    "WarmStart",
    "build_model",
    "default_cache_dir",
    "load_or_warm_start",
    "load_pretrained",
    "publish",
    "warm_start",
]


@dataclass(frozen=True)
class WarmStart:
    """Everything that determines the warm-started model (its cache key)."""

    digits: int = 2
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    target_accuracy: float = 0.35
    max_steps: int = 2000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    test_size: int = 256

    def key(self) -> str:
        """A short stable name for the cache directory."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return (
            f"arith{self.digits}-h{self.hidden_size}-l{self.layers}-"
            + hashlib.sha1(blob).hexdigest()[:10]
        )


def publish(tmp: Path, path: Path) -> None:
    """Move a finished cache directory ``tmp`` to ``path``, last, so an interrupted save never
    looks cached; when another process (a DDP rank, a parallel study run) got there first, keep
    its copy and drop ``tmp``."""
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """``$CURVOPT_CACHE`` if set, else ``~/.cache/curvopt``."""
    return Path(os.environ.get("CURVOPT_CACHE", Path.home() / ".cache" / "curvopt"))


def build_model(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int, layers: int, heads: int, max_len: int
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for ``tokenizer``.

    Eager attention (forward-mode autodiff and exact double backward work through it) and an
    untied ``lm_head``, so the head CAPO models is the output layer and nothing else.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config)


def _sft_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[int, int]], digits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids of prompt + reference solution + EOS, and labels (-100 outside the completion)."""
    ids, labels = [], []
    for a, b in pairs:
        prompt = tokenizer(arith.make_problem(a, b, digits).prompt).input_ids
        target = [*tokenizer(arith.solution(a, b, digits)).input_ids, tokenizer.eos_token_id]
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, ids))
    # right padding: no generation here, and the labels mask the padding out of the loss
    ids = [x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids]
    labels = [y + [-100] * (width - len(y)) for y in labels]
    return torch.tensor(ids), torch.tensor(labels)


def warm_start(
    spec: WarmStart, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, float]]:
    """Train a fresh model on reference solutions until it reaches ``spec.target_accuracy``.

    Returns the model, its tokenizer and ``{"steps", "validation_accuracy"}``.
    """
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = arith.build_tokenizer()
    model = build_model(tokenizer, spec.hidden_size, spec.layers, spec.heads, max_len=64)
    model.to(device).train()
    task = arith.addition(spec.digits, spec.test_size)
    held_out = set(arith.test_set(spec.digits, spec.test_size))
    validation = task.sample(random.Random(spec.seed + 1), 256)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    accuracy, step = 0.0, 0
    while step < spec.max_steps:
        pairs = arith.sample_train(rng, spec.digits, spec.batch, held_out)
        ids, labels = _sft_batch(tokenizer, pairs, spec.digits)
        loss = model(ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step % 10 == 0:
            accuracy = greedy_accuracy(
                model, tokenizer, validation, task.max_new_tokens, task.check
            )
            if accuracy >= spec.target_accuracy:
                break
    model.eval()
    return model, tokenizer, {"steps": step, "validation_accuracy": accuracy}


def load_or_warm_start(
    spec: WarmStart, cache_dir: Path, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """The warm-started model and tokenizer from ``cache_dir``, trained and saved on a miss."""
    path = Path(cache_dir) / spec.key()
    if not (path / "config.json").exists():
        print(f"warm start: training the starting policy once (cached in {path})")
        model, tokenizer, result = warm_start(spec, device)
        print(
            f"warm start: {result['steps']} steps, validation accuracy "
            f"{result['validation_accuracy']:.1%}"
        )
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warm_start.json").write_text(json.dumps(asdict(spec) | result, indent=2))
        publish(tmp, path)
    # built with eager attention, and kept so: every method runs on it as it always has
    return (*load_pretrained(path, device, attention="eager"), path)


def load_pretrained(
    path: str | Path, device: torch.device, attention: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any local causal LM directory with its tokenizer (left padding, a pad token), in float32
    with ``attention`` as its attention implementation (None: transformers' choice, SDPA where
    the model supports it)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kernel = {} if attention is None else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kernel)
    return model.to(device), tokenizer
