"""The compared methods: the only place they differ.

Every method trains the same policy on the same clipped-ratio GRPO loss with AdamW; a method
decides the optimizer and the tokens the loss sees.

- ``grpo``: AdamW; the loss on every completion token.
- ``capo``: **the paper's token rejection** (Melo, Abate, Gal, ICLR 2026, arXiv 2510.00819):
  ``CAPO(AdamW, head=...)`` with the rule, thresholds and levels of the config; the loss only on
  the tokens ``opt.select`` keeps; full steps.
- ``trust_region``: **the measured whole-policy trust region**: no token rejected; every step is
  scaled so the policy's KL per token of the step actually taken is at most ``max_policy_shift``
  (default 3e-4), measured with forwards of the step's batch.
- ``capo_step``: CAPO's curvature-aware step on a *predicted* KL: no rejection; each step scaled so
  the quadratic model of its KL over the parameters CAPO models (``--capo-params``; the head by
  default, bound 1e-7) stays within the bound (``shift_estimate="jvp"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import curvopt
from curvopt.capo import STEP_STATS

if TYPE_CHECKING:
    from .config import Config

__all__ = ["METHODS", "STATS", "Method", "candidate_memory"]

#: what the per-step metrics keep of ``CAPO.stats`` (those present: some need options): CAPO's
#: step statistics, with the window's token counts after the rejected fraction
STATS = (*STEP_STATS[:1], "tokens", "kept_tokens", *STEP_STATS[1:])


def _rejection(model: nn.Module, cfg: Config, bound: float | None) -> dict[str, Any]:
    return dict(
        head=model.get_output_embeddings(),
        rule=cfg.capo_rule,
        delta_h=cfg.delta_h,
        delta_f=cfg.delta_f,
        levels=tuple(cfg.capo_levels),
        direction=cfg.capo_direction,
        fisher=cfg.capo_fisher,
        # the loss optimises softmax(logits / temperature): tell CAPO which policy it models
        temperature=cfg.temperature,
        track_realised=True,
        params=cfg.capo_params,
        model=model,
    )


def _predicted_step(model: nn.Module, cfg: Config, bound: float | None) -> dict[str, Any]:
    # the step controller alone: no candidate models, no rejection
    return _rejection(model, cfg, bound) | dict(
        levels=(),
        max_policy_shift=bound,
        shift_estimate="jvp",
        step_reject_frac=cfg.step_reject_frac,
    )


def _trust_region(model: nn.Module, cfg: Config, bound: float | None) -> dict[str, Any]:
    # built from the model alone: no rejection, the policy's KL per step measured and bounded
    return dict(model=model, max_policy_shift=bound, temperature=cfg.temperature)


@dataclass(frozen=True)
class Method:
    """One compared method.

    ``capo`` maps ``(model, cfg, bound)`` to ``curvopt.CAPO``'s keyword arguments (None: plain
    AdamW); ``hidden``: ``select`` gets the states entering the head; ``default_bound``: the
    ``max_policy_shift`` when ``--max-policy-shift`` is not given (None: the method has none).
    """

    name: str
    label: str
    capo: Callable[[nn.Module, Config, float | None], dict[str, Any]] | None
    hidden: bool = False
    default_bound: float | None = None

    @property
    def family(self) -> str:
        """``"grpo"``, or ``"capo"`` for the methods that wrap the optimizer in CAPO."""
        return "grpo" if self.capo is None else "capo"

    def bound(self, cfg: Config) -> float | None:
        """The KL bound per step this method runs with (None: none)."""
        if self.default_bound is None:
            return None
        return cfg.max_policy_shift if cfg.max_policy_shift is not None else self.default_bound

    def eager(self, cfg: Config) -> bool:
        """Whether the method differentiates forward-mode through the model (no SDPA kernel)."""
        if self.name == "trust_region":
            return False  # forwards only: any attention kernel
        return self.capo is not None and cfg.capo_params == "all"

    def reevaluates(self, cfg: Config) -> bool:
        """Whether ``step`` may reject tokens of the step itself and need ``step(closure)``."""
        return self.name == "capo_step" and cfg.step_reject_frac > 0

    def optimizer(self, model: nn.Module, lr: float, cfg: Config) -> torch.optim.Optimizer:
        """AdamW over ``model``, wrapped in CAPO for the CAPO methods."""
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        if self.capo is None:
            return opt
        return curvopt.CAPO(opt, **self.capo(model, cfg, self.bound(cfg)))

    def select(
        self,
        opt: torch.optim.Optimizer,
        logits: Tensor,
        hidden: Tensor | None,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        forward: Callable[[nn.Module], Tensor],
    ) -> Tensor:
        """The tokens to train on, bool ``[b, T]`` ⊆ ``mask``: all of them without CAPO."""
        if not isinstance(opt, curvopt.CAPO):
            return mask
        h = hidden if self.hidden else None
        return opt.select(h, actions, advantages, mask, logits=logits, forward=forward)

    def stats(self, opt: torch.optim.Optimizer) -> dict[str, float]:
        """The step's CAPO statistics of :data:`STATS` (empty without CAPO)."""
        if not isinstance(opt, curvopt.CAPO):
            return {}
        s = opt.stats
        return {k: s[k] for k in STATS if k in s}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("grpo", "GRPO", None),
        Method("capo", "CAPO token rejection (paper)", _rejection, hidden=True),
        Method(
            "trust_region",
            "Trust region (policy KL ≤ bound)",
            _trust_region,
            default_bound=3e-4,
        ),
        Method(
            "capo_step",
            "CAPO step (predicted KL ≤ bound)",
            _predicted_step,
            hidden=True,
            default_bound=1e-7,
        ),
    )
}


def candidate_memory(
    model: nn.Module, tokens: int, candidates: int, vocab: int, itemsize: int = 4
) -> int:
    """Bytes of the largest tensors of exact whole-model candidates (``--capo-params all`` with
    rejection levels) for one ``select`` call of ``tokens`` positions (``B·T``), ``candidates``
    of them modelled: the per-position Jacobian of the log-probabilities (``tokens × P``), each
    candidate's gradient and planned update (``2 × candidates × P``), and its logits with their
    first and second directional derivatives (``3 × candidates × tokens × V``). A lower bound:
    activations come on top."""
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return itemsize * (P * (tokens + 2 * candidates) + 3 * candidates * tokens * vocab)
