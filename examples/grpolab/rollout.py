"""Sampling completions with ``model.generate``, scoring them, the policy's logits on them, and
greedy test accuracy."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .loss import completion_mask
from .task import Problem

__all__ = [
    "Rollout",
    "completion_logits",
    "forward",
    "greedy_accuracy",
    "micro_batches",
    "rollout",
]


@dataclass
class Rollout:
    """A batch of prompts with one completion each.

    ``input_ids``/``attention_mask``/``position_ids`` ``[B, P + T]`` cover prompt and completion
    (prompts left-padded to width ``P``); ``completions`` and ``mask`` ``[B, T]`` are the sampled
    tokens and the tokens up to and including EOS (``T ≤ max_new_tokens``: generation stops when
    every completion has ended); ``rewards`` ``[B]``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompt_width: int
    max_new_tokens: int
    completions: Tensor
    mask: Tensor
    rewards: Tensor
    texts: list[str]


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    **sampling: float | int | bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt ids ``[B, P]``, prompt mask ``[B, P]`` and completions ``[B, T]``."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    return enc.input_ids, enc.attention_mask, out[:, enc.input_ids.shape[1] :]


def _decode(tokenizer: PreTrainedTokenizerBase, completions: Tensor, mask: Tensor) -> list[str]:
    """Each completion's text up to its EOS, special tokens dropped."""
    return [
        tokenizer.decode(ids[keep], skip_special_tokens=True)
        for ids, keep in zip(completions, mask)
    ]


@torch.no_grad()
def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    group: int,
    max_new_tokens: int,
    check: Callable[[str, str], float],
    temperature: float = 1.0,
    top_k: int = 0,
) -> Rollout:
    """``group`` sampled completions per problem (consecutive), scored by ``check(text, answer)``.

    Prompts are text (rendered). ``top_k=0`` samples from the full
    ``softmax(logits / temperature)``.
    """
    repeated = [p for p in problems for _ in range(group)]
    prompt_ids, prompt_mask, completions = _generate(
        model,
        tokenizer,
        [p.prompt for p in repeated],
        max_new_tokens,
        # explicit, so a checkpoint's generation_config (top_p, repetition penalty...) cannot
        # make the sampler differ from the policy the loss optimises
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
    )
    mask = completion_mask(completions, tokenizer.eos_token_id)
    texts = _decode(tokenizer, completions, mask)
    rewards = torch.tensor(
        [check(t, p.answer) for t, p in zip(texts, repeated)], device=completions.device
    )
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    # the positions generate used: counted over real tokens, so left padding does not shift them
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completions], 1),
        attention_mask=attention_mask,
        position_ids=position_ids,
        prompt_width=prompt_ids.shape[1],
        max_new_tokens=max_new_tokens,
        completions=completions,
        mask=mask,
        rewards=rewards,
        texts=texts,
    )


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    max_new_tokens: int,
    check: Callable[[str, str], float],
    batch: int = 256,
) -> float:
    """Fraction of ``problems`` whose greedy completion is correct (``check(text, answer)``)."""
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        _, _, completions = _generate(
            model, tokenizer, [p.prompt for p in chunk], max_new_tokens, do_sample=False
        )
        mask = completion_mask(completions, tokenizer.eos_token_id)
        texts = _decode(tokenizer, completions, mask)
        correct += sum(check(t, p.answer) for t, p in zip(texts, chunk))
    model.train(was_training)
    return correct / len(problems)


@functools.cache
def _keeps_logits(kind: type) -> bool:
    """Whether ``kind.forward`` takes ``logits_to_keep`` (the head on the last positions only)."""
    return "logits_to_keep" in inspect.signature(kind.forward).parameters


def forward(
    model: nn.Module, batch: Rollout, rows: slice, hidden: bool
) -> tuple[Tensor, Tensor | None]:
    """Head logits ``[b, T, V]`` at the positions that predict the completion tokens of
    ``batch[rows]``, and the states entering the head ``[b, T, H]`` when ``hidden``."""
    # position t predicts token t + 1: the last T + 1 positions but the very last
    width = batch.completions.shape[1] + 1
    # the head over the prompt's positions is a fifth of a small model's forward, and unused
    keep = {"logits_to_keep": width} if _keeps_logits(type(model)) else {}
    out = model(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        output_hidden_states=hidden,
        **keep,
    )
    states = out.hidden_states[-1][:, -width:-1] if hidden else None
    return out.logits[:, -width:-1], states


def completion_logits(model: nn.Module, batch: Rollout, rows: slice) -> Tensor:
    """The head logits ``[b, T, V]`` of ``batch[rows]``'s completion tokens under ``model``."""
    return forward(model, batch, rows, hidden=False)[0]


def micro_batches(batch: Rollout, size: int) -> list[slice]:
    """Row ranges of ``size`` completions (one range for ``size=0``: no micro-batching)."""
    n = batch.completions.shape[0]
    width = size or n
    return [slice(i, i + width) for i in range(0, n, width)]
