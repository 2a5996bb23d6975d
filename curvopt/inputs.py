"""What the tracker is given (:class:`Inputs`) and what it works on (:class:`Batch`).

Every entry point (``CAPO.select``, ``SampleRejector.select``, ``CurvatureTracker.quadratic_model``,
``prepare`` and ``step_model``) takes the same completion tokens; they travel together as one
:class:`Inputs`, and :meth:`Batch.gather` flattens the masked-in ones once for every level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Forward", "HeadInput", "Inputs", "LogitsForward", "PolicyOutput"]


@dataclass(frozen=True)
class HeadInput:
    """The policy's logits given by the states entering a linear head, formed in chunks.

    ``logits = hidden @ weight.T + bias``: ``hidden [B, T, H]``, ``weight [V, H]``, ``bias [V]``
    or None. Used instead of a ``[B, T, V]`` tensor wherever curvopt measures a policy.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


PolicyOutput = Tensor | HeadInput

# The policy beyond the head: maps the model to the raw logits [B, T, V] of the completion tokens
# (or, for the trust region, the states entering its linear head).
Forward = Callable[[nn.Module], PolicyOutput]
# What forward-mode AD over the model differentiates: the logits themselves.
LogitsForward = Callable[[nn.Module], Tensor]


@dataclass(frozen=True)
class Inputs:
    """One call's completion tokens, as the caller passed them.

    Attributes:
        hidden: ``[B, T, H]`` states entering the head (None with whole-model tracking).
        actions: ``[B, T]`` sampled token ids.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` bool (or 0/1): the tokens to model.
        logits: optional ``[B, T, V]`` raw head outputs for ``hidden``.
        forward: with whole-model tracking, the policy's logits as a function of the model.
    """

    hidden: Tensor | None
    actions: Tensor
    advantages: Tensor
    mask: Tensor
    logits: Tensor | None = None
    forward: Forward | None = None


@dataclass
class Batch:
    """Validated, flattened masked-in tokens of one ``select``/``quadratic_model`` call.

    N masked-in tokens, in row-major order of ``mask``:
    ``positions [N]`` flat indices into ``[B*T]``, ``seq [N]`` sequence index, ``h [N, H]`` hidden
    states (compute dtype), ``actions [N]``, ``adv [N]`` advantages, ``logits`` an optional
    ``[B, T, V]`` caller's logits, ``topk_idx/topk_logits [N, K]`` when ``top_k`` is set;
    ``lse``/``top`` are caches of the linear head's full-vocabulary pass.
    """

    shape: tuple[int, int]
    mask: Tensor
    positions: Tensor
    seq: Tensor
    h: Tensor
    actions: Tensor
    adv: Tensor
    vocab: int
    logits: Tensor | None
    topk_idx: Tensor | None = None
    topk_logits: Tensor | None = None
    lse: Tensor | None = None
    top: Tensor | None = None
    forward: Forward | None = None

    @property
    def n(self) -> int:
        return self.positions.numel()

    @classmethod
    def gather(
        cls, inputs: Inputs, mask: Tensor, dtype: torch.dtype, device: torch.device
    ) -> Batch:
        """The masked-in tokens of validated ``inputs`` (``mask`` as bool), hidden states and
        advantages in ``dtype``; ``vocab`` is left 0 for the caller to set."""
        B, T = inputs.actions.shape
        positions = mask.reshape(-1).nonzero().squeeze(1)
        seq = torch.div(positions, T, rounding_mode="floor")
        if inputs.hidden is None:
            h = torch.zeros(positions.numel(), 0, dtype=dtype, device=device)
        else:
            h = inputs.hidden.detach().reshape(B * T, inputs.hidden.shape[-1])[positions].to(dtype)
        actions = inputs.actions.reshape(-1)[positions].long()
        adv = inputs.advantages.detach()
        adv = (adv[seq] if adv.dim() == 1 else adv.reshape(-1)[positions]).to(dtype)
        # kept [B, T, V] and indexed by (sequence, position): logits sliced out of a longer
        # output are not contiguous, and a reshape would copy them whole
        logits = None if inputs.logits is None else inputs.logits.detach()
        batch = cls((B, T), mask, positions, seq, h, actions, adv, 0, logits)
        batch.forward = inputs.forward
        return batch

    def at(self, values: Tensor, tokens: slice | Tensor) -> Tensor:
        """``values [B, T, ...]`` at the given tokens of the batch (``[n, ...]``)."""
        return values[self.seq[tokens], self.positions[tokens] % self.shape[1]]
