"""A tiny transformers causal LM (from a config, offline) and a batch of completions for it."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM

V, P, T = 40, 3, 5


def tiny_qwen(
    seed: int = 0,
    *,
    tied: bool = True,
    attention: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with tied embeddings and SDPA attention by default, like the real ones."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation=attention,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    model.eval()  # no dropout: the policy that samples is the one trained
    return model


def completions(seed: int, B: int = 4) -> dict[str, Tensor]:
    """Prompt + completion ids ``[B, P + T]``, the completion tokens, advantages and a mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, P + T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False  # a completion that ended early
    return {
        "ids": ids,
        "actions": ids[:, P:],
        "advantages": torch.randn(B, generator=g),
        "mask": mask,
    }


def completion_logits(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """The logits ``[B, T, V]`` that predict the completion tokens (position t predicts t + 1)."""
    return model(ids).logits[:, P - 1 : -1]


def policy_loss(logits: Tensor, batch: dict[str, Tensor], keep: Tensor) -> Tensor:
    """Token-mean REINFORCE loss over the kept tokens (log-probabilities in float32)."""
    logp = torch.log_softmax(logits.float(), -1)
    logp = logp.gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)
    return -(logp * batch["advantages"][:, None] * keep).sum() / keep.sum().clamp(min=1)


def literal_kl(before: Tensor, after: Tensor, keep: Tensor) -> float:
    """Mean over kept tokens of KL(softmax(before) ‖ softmax(after)), in float64."""
    lp0 = torch.log_softmax(before.double(), -1)[keep]
    lp1 = torch.log_softmax(after.double(), -1)[keep]
    return float((lp0.exp() * (lp0 - lp1)).sum(-1).mean())
