"""What a step did, measured: the policy's change per step, the output layer's share of it, and
whether the step had any learning signal.

KLs are mean per-token ``KL(π_before ‖ π_after)`` over the batch's completion tokens, of the
sampling policy ``softmax(logits / temperature)``:

- ``kl_realised``: the k3 estimate ``r − 1 − log r`` (``r = π_after / π_before`` of the sampled
  token): unbiased because the tokens are samples of π_before (with ``top_k=0``); no ``[B, T, V]``;
- ``kl_exact``: the exact KL over the vocabulary (in float64);
- ``kl_head_only``: the exact KL had only the output layer moved (the states entering it before
  the step, through the output layer after it); ``head_kl_share = kl_head_only / kl_exact``, the
  share of the step's KL a model of the last layer sees (recorded when ``kl_exact ≥ KL_FLOOR``).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .loss import token_logps
from .rollout import Rollout, forward

__all__ = ["KL_FLOOR", "Before", "SignalMonitor", "StepInputs", "step_kl", "summarise_steps"]

#: below this the measured KL of a step is float32 rounding of the logits, not the step
KL_FLOOR = 1e-12


@dataclass
class Before:
    """The policy on the batch before the step, micro-batch by micro-batch (the first iteration's
    forward: the policy that sampled the batch).

    ``logps`` ``[b, T]``: log-probabilities of the sampled tokens; with ``keep``: the logits
    ``[b, T, V]`` and the states entering the output layer ``[b, T, H]``, and ``head_ok``: the
    output layer applied to those states gives those logits, so its share of the step is
    measurable.
    """

    keep: bool
    logps: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)
    head_ok: bool = False

    @torch.no_grad()
    def add(self, logps: Tensor, logits: Tensor, hidden: Tensor | None, head: nn.Module) -> None:
        """Record one micro-batch (detached)."""
        self.logps.append(logps.detach())
        if not self.keep:
            return
        self.logits.append(logits.detach())
        self.hidden.append(hidden.detach())
        if len(self.logits) == 1:
            # models that transform the output layer's logits (a soft-cap) have no head-only policy
            self.head_ok = head is not None and torch.allclose(
                head(hidden[:1]), logits[:1], rtol=1e-4, atol=1e-4
            )


@dataclass
class StepInputs:
    """The batch, its micro-batches and the policy before the step."""

    batch: Rollout
    chunks: list[slice]
    before: Before


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p ‖ q)`` per position from log-probabilities ``[..., V]``."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def step_kl(model: nn.Module, inputs: StepInputs, temperature: float) -> dict[str, float]:
    """``kl_realised``, ``kl_exact`` and, where measurable, ``kl_head_only`` and
    ``head_kl_share`` of the step just taken (one forward per micro-batch)."""
    batch, before = inputs.batch, inputs.before
    head = model.get_output_embeddings()
    after, exact, head_only = [], [], []
    for rows, logits, hidden in zip(inputs.chunks, before.logits, before.hidden):
        new = forward(model, batch, rows, hidden=False)[0]
        after.append(token_logps(new, batch.completions[rows], temperature))
        # float64: a step's KL can be 1e-9 per token, below float32's rounding of log-softmax
        old = torch.log_softmax(logits.double() / temperature, -1)
        exact.append(_kl(old, torch.log_softmax(new.double() / temperature, -1)))
        if before.head_ok:
            moved = head(hidden).double() / temperature
            head_only.append(_kl(old, torch.log_softmax(moved, -1)))
    mask = batch.mask
    n = mask.sum().clamp(min=1)
    log_r = torch.cat(after) - torch.cat(before.logps)
    k3 = (torch.exp(log_r) - 1 - log_r) * mask
    out = {"kl_realised": (k3.sum() / n).item()}
    out["kl_exact"] = ((torch.cat(exact) * mask).sum() / n).item()
    if head_only:
        out["kl_head_only"] = ((torch.cat(head_only) * mask).sum() / n).item()
        if out["kl_exact"] >= KL_FLOOR:
            out["head_kl_share"] = out["kl_head_only"] / out["kl_exact"]
    return out


class SignalMonitor:
    """Steps running without a learning signal: every completion empty, or every reward of the
    step equal (then every advantage is zero). When ``limit`` steps run so (``limit ≤ 0``: never),
    a loud warning on stderr, once per run; :meth:`report` says when and why."""

    def __init__(self, limit: int, name: str, seed: int) -> None:
        self.limit, self.name, self.seed = limit, name, seed
        self.streak = self.longest = 0
        self.first: int | None = None
        self.reason = ""
        self.solved = False

    def update(self, step: int, batch: Rollout) -> dict[str, float]:
        """Count step ``step`` (1-based); returns its row fields ``empty_frac`` and
        ``rewards_equal``."""
        empty = sum(not t.strip() for t in batch.texts) / max(1, len(batch.texts))
        equal = bool(batch.rewards.min() == batch.rewards.max())
        self.streak = self.streak + 1 if empty == 1.0 or equal else 0
        self.longest = max(self.longest, self.streak)
        if self.limit > 0 and self.streak == self.limit and self.first is None:
            self.first = step
            reward = batch.rewards[0].item()
            self.reason = "every completion empty" if empty == 1.0 else f"every reward {reward:g}"
            self.solved = empty < 1.0 and reward > 0
            tqdm.write(f"\n{'!' * 78}\nWARNING: {self.message()}\n{'!' * 78}", file=sys.stderr)
        return {"empty_frac": empty, "rewards_equal": float(equal)}

    def message(self) -> str:
        advice = (
            "the policy solves these prompts: a harder task or more prompts per step"
            if self.solved
            else "check the prompt format, the chat template (--chat-template), the answer "
            "extraction (--answer-regex) and --max-new-tokens"
        )
        return (
            f"{self.name} seed {self.seed}: no learning signal for {self.limit} steps running "
            f"at step {self.first} ({self.reason}): {advice}"
        )

    def report(self) -> dict | None:
        """``{"step", "reason", "longest", "message"}`` once the warning fired, else None."""
        if self.first is None:
            return None
        return {
            "step": self.first,
            "reason": self.reason,
            "longest": self.longest,
            "message": self.message(),
        }


def summarise_steps(rows: list[dict], bound: float | None) -> dict[str, float | None]:
    """A run's step medians: ``realised_over_bound`` (the realised KL of each step taken ÷ the
    bound; None without a bound or without the statistic) and ``head_kl_share``."""
    ratios = [
        r["policy_shift_realised"] / bound for r in rows if bound and "policy_shift_realised" in r
    ]
    shares = [r["head_kl_share"] for r in rows if "head_kl_share" in r]
    return {
        "max_policy_shift": bound,
        "realised_over_bound": statistics.median(ratios) if ratios else None,
        "head_kl_share": statistics.median(shares) if shares else None,
    }
