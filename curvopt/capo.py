"""CAPO: the one-line optimizer wrapper, its window and its statistics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .inputs import Forward, Inputs
from .optimizers import unwrap_optimizer
from .quadratic import Fisher, Level, QuadraticModel
from .rejector import SampleRejector, Selection
from .settings import DEFAULTS, CAPOSettings, Direction, Rule
from .tracker import CurvatureTracker

__all__ = ["CAPO", "LIFETIME_STATS", "STEP_STATS"]

# Counters kept for the optimizer's lifetime (saved in ``state_dict``).
LIFETIME_STATS = ("steps", "skipped_steps")
# What a step reports besides its token and candidate counts, in the order integrations log it:
# the window's means, then (with track_realised / max_policy_shift / step_reject_frac) the step's.
STEP_STATS = (
    "rejected_frac",
    "objective_shift_mean",
    "policy_shift_mean",
    "policy_shift_realised",
    "policy_shift_step_model",
    "step_policy_shift",
    "step_scale",
    "step_rejected",
)


class CAPO(torch.optim.Optimizer):
    r"""Curvature-Aware Policy Optimization around any supported optimizer.

    Wraps ``optimizer`` (sharing its ``param_groups``, ``state`` and ``defaults``, so schedulers,
    ``GradScaler``, ``zero_grad``, ``add_param_group`` and checkpoints work unchanged) and adds
    :meth:`select`, which masks out the tokens whose update the quadratic model predicts to be
    unsafe (Melo, Abate, Gal, ICLR 2026, https://arxiv.org/abs/2510.00819)::

        opt = CAPO(torch.optim.AdamW(model.parameters(), lr=1e-5), head=model.lm_head)
        keep = opt.select(hidden, actions, advantages, mask)   # bool [B, T], keep ⊆ mask
        loss = policy_loss(logps, advantages, mask=keep)       # kept tokens only
        loss.backward(); opt.step(); opt.zero_grad()

    The algorithm of one step::

        for micro-batch: keep ← mask; for level in levels:          (select)
                             m_H, m_F ← quadratic model of each candidate on keep
                             keep ← keep ∧ rule(m_H, m_F)
        if select was called and no token was kept since the last step:   (step)
            skip the inner step (Δθ = 0: no decay, no momentum), skipped_steps += 1
        else:
            s ← 1, or with max_policy_shift: m ← predicted mean KL of the update about to be taken
                if m > max_policy_shift and step_reject_frac > 0:
                    keep ← keep minus the tokens of largest predicted KL (above the bound)
                    closure() (gradients of the kept tokens); m ← predicted mean KL again
                s ← min(1, √(max_policy_shift / m))
            optimizer.step() with every learning rate × s (for this step only)

    The scale is TRPO's maximal step along the update for a KL bound, ``√(2δ / ΔθᵀF̄Δθ)`` with
    ``m = ½ΔθᵀF̄Δθ`` (Schulman et al., 2015, https://arxiv.org/abs/1502.05477, Appendix C),
    applied to the step of whatever optimizer is wrapped.

    Every option's type, default, check and help text is declared once in
    :class:`curvopt.settings.CAPOSettings` (``CAPO`` validates its arguments through it).

    Args:
        optimizer: the optimizer to wrap (``torch.optim.SGD/Adam/AdamW`` for directions
            ``"exact"``/``"frozen"``; any optimizer with ``"shadow"``). An optimizer wrapped by
            accelerate is stepped through its wrapper and read through its ``.optimizer``.
        head: the output layer (``model.lm_head``); its parameters must be in ``optimizer``.
        rule, delta_h, delta_f, levels: see :class:`~curvopt.SampleRejector`.
        top_k, fisher, direction, temperature, logit_scale, softcap: see
            :class:`~curvopt.CurvatureTracker` (the last three describe the policy your loss
            optimises, ``softmax(φ(head(h)))``, e.g. ``temperature`` when it divides the logits).
        track_realised: after each step, measure the update's exact KL on the kept tokens
            (``stats["policy_shift_realised"]``) beside its quadratic model
            (``stats["policy_shift_step_model"]``): the head's (two logits products and a copy of
            the head's parameters), or with ``params`` beyond the head the whole model's (a
            forward before and after the step).
        params, model: the parameters the quadratic model is over — ``"head"`` (the closed forms),
            ``"all"`` of ``model``'s trainable parameters, or a list of modules/parameters of
            ``model`` — see :class:`~curvopt.CurvatureTracker`. Beyond the head, ``select`` needs
            ``forward`` and the candidates are exact but expensive (small models).
        max_policy_shift: the curvature-aware step. After ``backward()``, ``step()`` predicts
            the mean over kept tokens of the KL of the update about to be taken,
            ``m = mean_t ½u_tᵀF_tu_t`` with ``u_t = J_tΔθ`` over the tracked parameters (one
            forward-mode pass per micro-batch; weight decay and momentum included), and scales
            every group's learning rate for this step by ``s = min(1, √(max_policy_shift / m))``
            (the update is linear in the learning rate, so its predicted shift is ``s²·m``).
            Reports ``stats["step_policy_shift"]`` (m) and ``stats["step_scale"]`` (s). With
            ``levels=()`` nothing is rejected and ``select`` models no candidates: the step
            alone, at the cost of that forward-mode pass.
        step_reject_frac: with ``max_policy_shift``, before scaling a step whose predicted shift
            exceeds the bound, reject at most this fraction (in ``[0, 1)``, rounded down per
            ``select`` call) of each micro-batch's kept tokens: those whose own predicted KL under
            the actual update, ``½u_tᵀF_tu_t``, is above ``max_policy_shift``, largest first. The
            masks ``select`` returned are updated in place, and ``step(closure)`` is then required:
            the closure must zero the gradients, recompute the loss with those masks (all
            micro-batches) and call ``backward()``. CAPO calls it once, only when a token was
            rejected (the inner step never does; ``step`` returns its loss, else None), and plans
            the step again from the new gradients (a second forward-mode pass).
            Reports ``stats["step_rejected"]`` (also counted in ``kept_tokens``/``rejected_frac``).
        process_group: under ``torch.distributed`` (DDP: same head and optimizer state on every
            rank), the batch level and every statistic cover the group's global batch (default:
            the world), so all ranks take the same batch decision and the same skip decision;
            ``select`` and ``step`` are then collectives. Token and sequence decisions are local.

    Statistics (``opt.stats``, floats). A *window* is everything between two ``step()`` calls;
    the first ``select`` after a step starts a new one, so ``stats`` still describes the last
    step after ``step()`` returns. Per window:

    - ``tokens``, ``kept_tokens``: masked-in and kept tokens over all ``select`` calls;
      ``rejected_frac = 1 − kept_tokens / tokens`` (0 with no tokens);
    - ``objective_shift_mean``, ``policy_shift_mean``: mean m_H and m_F over the candidates of the
      first level in ``levels``;
    - per level L: ``L_candidates``, ``L_rejected``, ``L_objective_shift_mean``,
      ``L_policy_shift_mean`` (levels after the first see only the survivors);
    - with ``track_realised``, after ``step()``: ``policy_shift_realised``,
      ``policy_shift_step_model`` (means over the kept tokens).

    Lifetime counters (:data:`LIFETIME_STATS`), saved in ``state_dict``: ``steps`` (inner steps
    taken) and ``skipped_steps``. :data:`STEP_STATS` lists the means and step measurements above.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        head: nn.Module,
        *,
        rule: Rule = DEFAULTS.rule,
        delta_h: float = DEFAULTS.delta_h,
        delta_f: float = DEFAULTS.delta_f,
        levels: Sequence[Level] = DEFAULTS.levels,
        top_k: int | None = DEFAULTS.top_k,
        fisher: Fisher = DEFAULTS.fisher,
        direction: Direction = DEFAULTS.direction,
        temperature: float = DEFAULTS.temperature,
        logit_scale: float = DEFAULTS.logit_scale,
        softcap: float | None = DEFAULTS.softcap,
        track_realised: bool = DEFAULTS.track_realised,
        process_group: torch.distributed.ProcessGroup | None = None,
        params: str | Sequence[nn.Module | nn.Parameter] = "head",
        model: nn.Module | None = None,
        max_policy_shift: float | None = DEFAULTS.max_policy_shift,
        step_reject_frac: float = DEFAULTS.step_reject_frac,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.settings = settings = CAPOSettings(
            rule=rule,
            delta_h=delta_h,
            delta_f=delta_f,
            levels=levels,
            top_k=top_k,
            fisher=fisher,
            direction=direction,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            track_realised=track_realised,
            max_policy_shift=max_policy_shift,
            step_reject_frac=step_reject_frac,
        )
        self.rejector = SampleRejector(
            settings.rule, settings.delta_h, settings.delta_f, settings.levels
        )
        self.tracker = CurvatureTracker(
            head,
            optimizer,
            top_k=settings.top_k,
            fisher=settings.fisher,
            direction=settings.direction,
            temperature=settings.temperature,
            logit_scale=settings.logit_scale,
            softcap=settings.softcap,
            process_group=process_group,
            params=params,
            model=model,
        )
        base = unwrap_optimizer(optimizer)
        super().__init__([dict(g) for g in base.param_groups], base.defaults)
        self.optimizer = optimizer
        self._alias()
        self.track_realised = settings.track_realised
        self.max_policy_shift = settings.max_policy_shift
        self.step_reject_frac = settings.step_reject_frac
        self._counters = dict.fromkeys(LIFETIME_STATS, 0)
        self._window: dict[str, Tensor] | None = None
        self._open = False
        # each select call's inputs, with mask = the tokens it kept (cleared in place by
        # step_reject_frac)
        self._batches: list[Inputs] = []
        self._realised: dict[str, float] = {}

    def _alias(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.defaults = self.optimizer.defaults
        self.state = self.optimizer.state

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __repr__(self) -> str:
        r = self.rejector
        return (
            f"CAPO(rule={r.rule!r}, delta_h={r.delta_h}, delta_f={r.delta_f}, levels={r.levels}, "
            f"top_k={self.tracker.top_k}, fisher={self.tracker.fisher!r}, "
            f"direction={self.tracker.direction!r},\n  {self.optimizer!r})"
        )

    # ------------------------------------------------------------------ selection

    @torch.no_grad()
    def select(
        self,
        hidden: Tensor | None,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        logits: Tensor | None = None,
        forward: Forward | None = None,
    ) -> Tensor:
        """The tokens to train on: bool ``[B, T]``, a subset of ``mask``.

        Args:
            hidden: ``[B, T, H]`` states entering the head for the completion tokens.
            actions: ``[B, T]`` sampled token ids.
            advantages: ``[B]`` or ``[B, T]``.
            mask: ``[B, T]`` completion mask (bool or 0/1).
            logits: optional ``[B, T, V]`` head outputs for ``hidden`` (saves a logits product).
            forward: with ``params`` beyond the head, a callable mapping the model to the raw
                logits ``[B, T, V]`` of these completion tokens (then ``hidden`` may be None);
                with ``max_policy_shift`` it is called again in ``step()``.

        With ``step_reject_frac``, ``step()`` may clear entries of the returned mask in place
        (the tokens it rejects); the closure passed to ``step`` reads it then.

        Bad inputs raise before any statistic changes. Several calls between two steps
        (gradient accumulation) add up in ``stats``.
        """
        inputs = Inputs(hidden, actions, advantages, mask, logits, forward)
        selection = self.rejector.apply(self.tracker, self.tracker.prepare_inputs(inputs))
        self._record(selection, mask)
        if self.track_realised or self.max_policy_shift is not None:
            self._batches.append(
                Inputs(
                    None if hidden is None else hidden.detach(),
                    actions.detach(),
                    advantages.detach(),
                    selection.keep,
                    forward=forward,
                )
            )
        return selection.keep

    def _record(self, selection: Selection, mask: Tensor) -> None:
        keep = selection.keep
        device = keep.device
        add: dict[str, Tensor] = {
            "tokens": mask.bool().sum(),
            "kept_tokens": keep.sum(),
        }
        group = self.tracker.process_group
        for i, (qm, accepted) in enumerate(selection.models):
            cand = qm.candidates
            # every rank holds the whole (global) batch candidate: count it once over the group
            share = 1.0 / distributed.world_size(group) if qm.level == "batch" else 1.0
            prefix = [qm.level + "_"] if i else ["", qm.level + "_"]
            for p in prefix:
                add[p + "candidates"] = cand.sum() * share
                add[p + "objective_shift_sum"] = qm.objective_shift[cand].sum() * share
                add[p + "policy_shift_sum"] = qm.policy_shift[cand].sum() * share
            add[qm.level + "_rejected"] = (cand & ~accepted).sum() * share
        keys = list(add)
        values = torch.stack([add[k].to(device=device, dtype=torch.float64) for k in keys])
        values = distributed.all_reduce_sum(values, group)
        if not self._open:
            self._window, self._open = {}, True
            self._batches, self._realised = [], {}
        window = self._window
        assert window is not None
        for k, v in zip(keys, values):
            window[k] = window[k] + v if k in window else v

    @property
    def stats(self) -> dict[str, float]:
        """Statistics of the current window and lifetime counters (see the class docstring)."""
        out: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
        w = {k: float(v) for k, v in (self._window or {}).items()}
        if w:
            tokens = w["tokens"]
            out["tokens"], out["kept_tokens"] = tokens, w["kept_tokens"]
            out["rejected_frac"] = 1.0 - w["kept_tokens"] / tokens if tokens else 0.0
            for key in list(w):
                if key.endswith("candidates"):
                    prefix = key[: -len("candidates")]
                    n = w[key]
                    if prefix:
                        out[key] = n
                        out[prefix + "rejected"] = w[prefix + "rejected"]
                    for name in ("objective_shift", "policy_shift"):
                        out[f"{prefix}{name}_mean"] = w[f"{prefix}{name}_sum"] / n if n else 0.0
        out.update(self._realised)
        return out

    # ------------------------------------------------------------------ the optimizer contract

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Take the inner step, or skip it when the window's selections kept no token."""
        if not _at_step_boundary(self.optimizer):
            # accelerate between accumulation boundaries: its step() does nothing, and the window
            # (statistics, skip decision, shadow moments) goes on to the real step
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if self._open and self._window is not None and float(self._window["kept_tokens"]) == 0:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._counters["skipped_steps"] += 1
            self._open = False
            return loss
        batches = self._batches if self._open else []
        if self.step_reject_frac > 0 and batches and closure is None:
            raise ValueError(
                "closure: step_reject_frac needs step(closure), a closure that zeroes the "
                "gradients, recomputes the loss with the masks select() returned and calls "
                "backward()"
            )
        loss = None
        self._realised = {}
        if self.max_policy_shift is not None:
            models, self._realised = self._plan_scale(batches)
            if self.step_reject_frac > 0:
                rejected = 0
                if self._realised["step_policy_shift"] > self.max_policy_shift:
                    rejected = self._reject_largest(batches, models)
                if rejected:
                    assert closure is not None  # required above
                    with torch.enable_grad():
                        loss = closure()
                    _, self._realised = self._plan_scale(batches)
                self._realised["step_rejected"] = float(rejected)
                # the gradients are those of the kept tokens: the inner step must not recompute
                closure = None
        scale = self._realised.get("step_scale", 1.0)
        measure = self.track_realised and bool(batches)
        before = self._snapshot(batches) if measure else None
        lrs = [g["lr"] for g in self.param_groups]
        if scale < 1.0:
            for g in self.param_groups:
                g["lr"] = g["lr"] * scale
        try:
            if closure is None:
                self.optimizer.step()
            else:
                loss = self.optimizer.step(closure)
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
        self.tracker.observe_step()
        self._counters["steps"] += 1
        if before is not None:
            self._realised.update(self._measure(batches, before))
        self._batches = []
        self._open = False
        return loss

    def _plan_scale(self, batches: list[Inputs]) -> tuple[list[QuadraticModel], dict[str, float]]:
        """Each micro-batch's token model of the update about to be taken, its predicted mean KL,
        and the learning-rate scale that brings it to ``max_policy_shift``."""
        assert self.max_policy_shift is not None
        total = torch.zeros(2, dtype=torch.float64, device=self.tracker.params[0].device)
        models = []
        for b in batches:
            qm = self.tracker.step_model_of(b, fisher="true")
            models.append(qm)
            total += torch.stack([qm.policy_shift.sum(), b.mask.sum()]).to(total)
        shift_sum, n = distributed.all_reduce_sum(total, self.tracker.process_group).tolist()
        predicted = shift_sum / n if n else 0.0
        scale = min(1.0, math.sqrt(self.max_policy_shift / predicted)) if predicted > 0 else 1.0
        return models, {"step_policy_shift": predicted, "step_scale": scale}

    @torch.no_grad()
    def _reject_largest(self, batches: list[Inputs], models: list[QuadraticModel]) -> int:
        """Clear, in each micro-batch's kept mask, up to ``step_reject_frac`` of its tokens whose
        predicted KL exceeds the bound, largest first; the number cleared over the group."""
        assert self.max_policy_shift is not None
        count = torch.zeros(1, dtype=torch.float64, device=self.tracker.params[0].device)
        for b, qm in zip(batches, models):
            keep = b.mask
            over = keep & (qm.policy_shift > self.max_policy_shift)
            k = min(int(over.sum()), math.floor(self.step_reject_frac * int(keep.sum())))
            if k:
                shift = torch.where(over, qm.policy_shift, -math.inf).reshape(-1)
                idx = torch.topk(shift, k).indices
                keep[idx // keep.shape[1], idx % keep.shape[1]] = False
                count += k
        count = distributed.all_reduce_sum(count, self.tracker.process_group)
        if self._window is not None:
            self._window["kept_tokens"] = self._window["kept_tokens"] - count.to(
                self._window["kept_tokens"]
            )
        return int(count.item())

    @torch.no_grad()
    def _snapshot(self, batches: list[Inputs]) -> list[Tensor]:
        """What the realised shift is measured against (see :meth:`Head.snapshot`)."""
        return self.tracker.backend.snapshot(batches)

    @torch.no_grad()
    def _measure(self, batches: list[Inputs], before: list[Tensor]) -> dict[str, float]:
        """Mean exact KL of the step on the kept tokens, and its quadratic model."""
        kls, quads = [], []
        for i, b in enumerate(batches):
            kl, quad = self.tracker.backend.measure(b, i, before)
            kls.append(kl.sum())
            quads.append(quad.sum())
        n = sum(float(b.mask.sum()) for b in batches)
        sums = torch.stack([torch.stack(kls).sum(), torch.stack(quads).sum()]).to(torch.float64)
        sums = torch.cat([sums, sums.new_tensor([n])])
        kl_sum, quad_sum, n = distributed.all_reduce_sum(sums, self.tracker.process_group).tolist()
        return {
            "policy_shift_realised": kl_sum / n if n else 0.0,
            "policy_shift_step_model": quad_sum / n if n else 0.0,
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # during Optimizer.__init__, before aliasing
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"capo"`` entry with CAPO's own state.

        A bare optimizer of the same class can load it (it ignores the extra key).
        """
        state = self.optimizer.state_dict()
        state["capo"] = {"counters": dict(self._counters), "tracker": self.tracker.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("capo", None)
        self.optimizer.load_state_dict(state_dict)
        self._alias()
        if own is not None:
            self._counters.update(own["counters"])
            self.tracker.load_state_dict(own["tracker"])


def _at_step_boundary(optimizer: torch.optim.Optimizer) -> bool:
    """False while an accelerate-wrapped optimizer accumulates gradients (``sync_gradients``)."""
    state = getattr(optimizer, "gradient_state", None)
    return bool(getattr(state, "sync_gradients", True))
