"""The GRPO objective as pure functions on tensors: advantages, token log-probabilities, the loss.

Shapes: ``B`` completions, ``T`` completion tokens, ``V`` vocabulary. A ``mask`` is the set of
tokens the loss trains on: the completion mask for GRPO, CAPO's ``keep ⊆ mask`` for CAPO. The
loss never looks at any other mask, so tokens CAPO rejects leave both the numerator and the
normaliser of every ``loss_type``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["LossType", "completion_mask", "group_advantages", "policy_loss", "token_logps"]

LossType = Literal["grpo", "bnpo", "dr_grpo"]


def group_advantages(rewards: Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages ``A_i = (r_i − mean_g r) / (std_g r + eps)``.

    Args:
        rewards: ``[B]`` with the ``group`` completions of each prompt consecutive.
        group: completions per prompt (G).
        scale: divide by the group's standard deviation (unbiased, as TRL); off gives Dr. GRPO's
            mean-centred advantages.
        eps: keeps groups whose completions all scored the same finite (their advantages are 0).

    Returns:
        ``[B]``.
    """
    if rewards.dim() != 1 or rewards.numel() % group:
        raise ValueError(
            f"rewards: expected shape [B] with B a multiple of group={group}, "
            f"got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.flatten()


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """bool ``[B, T]``: the tokens up to and including each completion's first EOS."""
    is_eos = completions == eos_token_id
    # a completion without EOS (truncated) keeps all T tokens
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.shape[1])
    return torch.arange(completions.shape[1], device=completions.device) <= first[:, None]


def token_logps(logits: Tensor, actions: Tensor, temperature: float = 1.0) -> Tensor:
    """``log π(a_t | h_t)`` ``[B, T]`` of the sampling policy ``softmax(logits / temperature)``."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    max_completion_length: int | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""The clipped importance-ratio surrogate of GRPO, averaged over the tokens of ``mask``.

    Per token, with ratio ``ρ_t = exp(logp_t − old_logp_t)``::

        ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β k3_t,
        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1     (KL to the reference, k3 estimator)

    and the loss over the tokens ``t ∈ mask``:

    - ``"grpo"``: each sequence's token mean, then the mean over the ``B`` sequences;
    - ``"bnpo"``: the mean over all tokens of the batch;
    - ``"dr_grpo"``: the sum over tokens divided by ``B · max_completion_length`` (Dr. GRPO).

    Args:
        logps, old_logps: ``[B, T]`` log-probabilities under the current policy (with grad) and
            the policy that sampled the completions.
        advantages: ``[B]`` or ``[B, T]``.
        mask: ``[B, T]`` bool, the tokens to train on.
        max_completion_length: the normaliser's length for ``"dr_grpo"`` (default ``T``).
        ref_logps: ``[B, T]`` reference log-probabilities; needed when ``beta > 0``.

    Returns:
        The scalar loss and detached statistics: ``clip_frac`` (fraction of the tokens of ``mask``
        whose ratio was clipped on the side that matters) and ``kl`` (mean ``k3`` over ``mask``, 0
        without a reference).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    mask_f = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps: required when beta != 0")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask_f
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask_f.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask_f.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        loss = per_token.sum() / (logps.shape[0] * length)
    else:
        raise ValueError(f"loss_type: expected 'grpo', 'bnpo' or 'dr_grpo', got {loss_type!r}")
    n = mask_f.sum().clamp(min=1)
    is_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | (
        (ratio > 1 + epsilon_high) & (advantages > 0)
    )
    stats = {
        "clip_frac": ((is_clipped & mask).sum() / n).detach(),
        "kl": ((kl * mask_f).sum() / n).detach(),
    }
    return loss, stats
