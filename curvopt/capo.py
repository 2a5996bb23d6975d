"""CAPO: the one-line optimizer wrapper, its window and its statistics."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import contract
from .inputs import Forward, Inputs
from .optimizers import unwrap_optimizer
from .optimizers.shadow import ShadowWatch
from .optimizers.support import check_modelled
from .output_layer import modelled_by, output_embeddings, output_layer
from .policy import LogitTransform
from .quadratic import Fisher, Level
from .rejector import SampleRejector, Selection
from .settings import DEFAULTS, MODEL_FORM, CAPOSettings, Direction, Rule, ShiftEstimate
from .tracker import CurvatureTracker
from .trust_region import TrustRegion
from .trust_region.predicted import PredictedBound
from .validation import check_finite_logits, check_measured, check_positive
from .window import Window

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
    "trust_region_trials",
)


class CAPO(torch.optim.Optimizer):
    r"""Curvature-Aware Policy Optimization around any ``torch.optim`` optimizer.

    Wraps ``optimizer`` (sharing its ``param_groups``, ``state`` and ``defaults``, so schedulers,
    ``GradScaler``, ``zero_grad``, ``add_param_group`` and checkpoints work unchanged). Two forms:

    - **The whole-policy trust region** (from the model alone): every optimizer step is taken at
      the scale ``s ≤ 1`` of its update that keeps the policy's mean per-token KL on the step's
      own tokens, measured by forwards, within ``max_policy_shift`` (default
      :data:`~curvopt.settings.DEFAULT_MAX_POLICY_SHIFT`)::

          opt = CAPO(torch.optim.AdamW(model.parameters(), lr=3e-4), model=model)
          logits = forward(model)                      # completion logits [B, T, V]
          keep = opt.select(None, actions, advantages, mask, logits=logits, forward=forward)
          loss(logits, keep).backward(); opt.step(); opt.zero_grad()

    - **The paper's token rejection** (with the output layer, Melo, Abate, Gal, ICLR 2026,
      https://arxiv.org/abs/2510.00819): :meth:`select` masks out the tokens whose update the
      quadratic model of the output layer predicts to be unsafe::

          opt = CAPO(torch.optim.AdamW(model.parameters(), lr=1e-5), head=model.lm_head)
          keep = opt.select(hidden, actions, advantages, mask)   # bool [B, T], keep ⊆ mask

    Both can be combined (``levels`` and ``max_policy_shift`` are independent). One step::

        for micro-batch: keep ← mask; for level in levels:          (select)
                             m_H, m_F ← quadratic model of each candidate on keep
                             keep ← keep ∧ rule(m_H, m_F)
        if select was called and no token was kept since the last step:   (step)
            skip the inner step (Δθ = 0: no decay, no momentum), skipped_steps += 1
        elif max_policy_shift, measured:
            m(s) ← mean KL of the kept tokens after the step at scale s, by forwards
            s ← 1 if m(1) ≤ bound, else searched until m(s) ∈ [½, 1.1] × bound
            the step at scale s (or none, if a KL is not finite: skipped_steps += 1)
        else:
            s ← 1, or with max_policy_shift, jvp: m ← predicted mean KL of the update
                (step_reject_frac: reject the largest-shift tokens, closure(), predict again)
                s ← min(1, √(max_policy_shift / m))
            optimizer.step() with every learning rate × s (for this step only)

    Every option's type, default, check and help text is declared once in
    :class:`curvopt.settings.CAPOSettings` (``CAPO`` validates its arguments through it).

    Args:
        optimizer: the optimizer to wrap: any ``torch.optim.Optimizer`` for the measured trust
            region; for the head's models, one whose update curvopt reads
            (:mod:`curvopt.optimizers.support`: SGD, Adam, AdamW in closed form, the other
            elementwise torch optimizers by stepping a copy, subclasses not overriding ``step``;
            ``"shadow"``: Adam-like others). An optimizer wrapped by accelerate is stepped
            through its wrapper and read through its ``.optimizer``.
        head: the output layer (``model.lm_head``). Needed by token rejection (``levels``), the
            ``"jvp"`` estimate over the head and ``track_realised``; optional otherwise (then, if
            needed, ``model.get_output_embeddings()``).
        rule, delta_h, delta_f, levels: see :class:`~curvopt.SampleRejector`. ``levels``
            defaults to ``("token",)`` with a head and to ``()`` (no rejection) without.
        top_k, fisher, direction, temperature, logit_scale, softcap: see
            :class:`~curvopt.CurvatureTracker` (the last three describe the policy your loss
            optimises, ``softmax(φ(head(h)))``, e.g. ``temperature`` when it divides the logits;
            the trust region measures that policy too).
        track_realised: after each step, measure the update's exact KL on the kept tokens
            (``policy_shift_realised``) beside its quadratic model (``policy_shift_step_model``)
            over the tracked parameters.
        params, model: the parameters the quadratic models are over — ``"head"`` (the closed
            forms), ``"all"`` of ``model``'s trainable parameters, or a list of modules/parameters
            of ``model`` — see :class:`~curvopt.CurvatureTracker`. ``model`` is also the policy
            the trust region runs ``forward`` on.
        max_policy_shift: the trust region's bound on the mean per-token KL of the policy per
            step, over the kept tokens; None: off. Default: ``"auto"`` —
            :data:`~curvopt.settings.DEFAULT_MAX_POLICY_SHIFT` when built from the model alone,
            None with a head.
        shift_estimate: ``"measured"`` (default): the KL is measured exactly by no-grad forwards
            of the step's micro-batches at trial points θ0 + s·Δθ (:mod:`curvopt.trust_region`;
            any attention kernel, tied weights, LoRA, bf16, autocast, DDP, FSDP2; any optimizer:
            SGD/Adam/AdamW are planned without stepping, others stepped with a copy of their
            state kept until the step is accepted). ``"jvp"``: predicted, ``½ΔθᵀF̄Δθ`` over
            ``params`` (one forward-mode pass per micro-batch beyond the head), and the step
            scaled by ``min(1, √(max_policy_shift / m))``.
        step_reject_frac: with the ``"jvp"`` estimate, before scaling a step whose predicted
            shift exceeds the bound, reject at most this fraction (in ``[0, 1)``, rounded down
            per ``select`` call) of each micro-batch's kept tokens whose own predicted KL under
            the actual update, ``½u_tᵀF_tu_t``, is above the bound, largest first. The masks
            ``select`` returned are updated in place, and ``step(closure)`` is then required:
            the closure must zero the gradients, recompute the loss with those masks (all
            micro-batches) and call ``backward()``; CAPO calls it once, only when a token was
            rejected, and plans the step again. Reports ``stats["step_rejected"]``.
        process_group: under ``torch.distributed`` (DDP, FSDP2: every rank steps the same
            parameters), the batch level and every statistic cover the group's global batch
            (default: the world), and the trust region's KL is the group's mean, so all ranks
            take the same decisions; ``select`` and ``step`` are then collectives.

    Statistics (``opt.stats``, floats). A *window* is everything between two ``step()`` calls;
    the first ``select`` after a step starts a new one, so ``stats`` still describes the last
    step after ``step()`` returns. Per window:

    - ``tokens``, ``kept_tokens``: masked-in and kept tokens over all ``select`` calls;
      ``rejected_frac = 1 − kept_tokens / tokens`` (0 with no tokens);
    - ``objective_shift_mean``, ``policy_shift_mean``: mean m_H and m_F over the candidates of the
      first level in ``levels``;
    - per level L: ``L_candidates``, ``L_rejected``, ``L_objective_shift_mean``,
      ``L_policy_shift_mean`` (levels after the first see only the survivors);
    - with ``max_policy_shift``, after ``step()``: ``step_scale`` (0 for a step not taken),
      ``step_policy_shift`` (the mean KL of the unscaled step: measured, or predicted with
      ``"jvp"``) and, measured, ``policy_shift_realised`` (of the step taken) and
      ``trust_region_trials`` (measurements, each one forward of every micro-batch);
    - with ``track_realised``, after ``step()``: ``policy_shift_realised``,
      ``policy_shift_step_model`` (means over the kept tokens).

    Lifetime counters (:data:`LIFETIME_STATS`), saved in ``state_dict``: ``steps`` (inner steps
    taken) and ``skipped_steps`` (steps not taken: no token kept, non-finite gradients or KL).
    """

    # torch.amp.GradScaler steps CAPO even when the gradients are not finite, with found_inf and
    # grad_scale set on it (contract.amp_step): so a skipped step closes its window
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        head: nn.Module | None = None,
        *,
        rule: Rule = DEFAULTS.rule,
        delta_h: float = DEFAULTS.delta_h,
        delta_f: float = DEFAULTS.delta_f,
        levels: Sequence[Level] | None = None,
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
        max_policy_shift: float | Literal["auto"] | None = "auto",
        shift_estimate: ShiftEstimate = DEFAULTS.shift_estimate,
        step_reject_frac: float = DEFAULTS.step_reject_frac,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if head is None and not isinstance(model, nn.Module):
            raise TypeError(
                "head, model: pass the model (CAPO(optimizer, model=model): the whole-policy "
                "trust region) or the output layer (CAPO(optimizer, head=model.lm_head): token "
                f"rejection); got head=None, model={type(model).__name__}"
            )
        form = DEFAULTS if head is not None else CAPOSettings(**MODEL_FORM)
        self.settings = settings = CAPOSettings(
            rule=rule,
            delta_h=delta_h,
            delta_f=delta_f,
            levels=form.levels if levels is None else levels,
            top_k=top_k,
            fisher=fisher,
            direction=direction,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            track_realised=track_realised,
            max_policy_shift=(
                form.max_policy_shift if max_policy_shift == "auto" else max_policy_shift
            ),
            shift_estimate=shift_estimate,
            step_reject_frac=step_reject_frac,
        )
        self.rejector = SampleRejector(
            settings.rule, settings.delta_h, settings.delta_f, settings.levels
        )
        self.transform = LogitTransform(
            settings.logit_scale, settings.softcap, settings.temperature
        )
        bounded = settings.max_policy_shift is not None
        measured = bounded and settings.shift_estimate == "measured"
        needs_tracker = (
            bool(settings.levels) or settings.track_realised or (bounded and not measured)
        )
        why = modelled_by(settings)
        if why is not None and settings.direction != "shadow":
            check_modelled(unwrap_optimizer(optimizer), why)
        self.tracker: CurvatureTracker | None = None
        if needs_tracker:
            self.tracker = CurvatureTracker(
                output_layer(head, model, settings),
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
        policy = model if model is not None else head
        assert policy is not None
        self.model = policy
        self.head = head if head is not None else output_embeddings(model)
        self.process_group = process_group
        self.trust_region: TrustRegion | None = None
        self.predicted: PredictedBound | None = None
        if measured:
            assert settings.max_policy_shift is not None
            self.trust_region = TrustRegion(
                settings.max_policy_shift, policy, self.transform,
                head=self.head, process_group=process_group,
            )  # fmt: skip
        elif bounded:
            assert self.tracker is not None and settings.max_policy_shift is not None
            self.predicted = PredictedBound(
                settings.max_policy_shift, self.tracker, settings.step_reject_frac
            )
        base = unwrap_optimizer(optimizer)
        self._shadow: ShadowWatch | None = None
        if self.tracker is not None and self.tracker.shadow is not None:
            self._shadow = ShadowWatch(self.tracker.shadow)
        super().__init__([dict(g) for g in base.param_groups], base.defaults)
        self.optimizer = optimizer
        self._alias()
        self.track_realised = settings.track_realised
        self.step_reject_frac = settings.step_reject_frac
        self._counters = dict.fromkeys(LIFETIME_STATS, 0)
        # each select call's counts and inputs (mask = the tokens it kept, cleared in place by
        # step_reject_frac), what the trust region measures of it, and the step's measurements
        self._window = Window(process_group)
        self._warned_unmeasured = False

    @property
    def max_policy_shift(self) -> float | None:
        """The trust region's bound (None: off). Assignable between steps, e.g. to anneal it."""
        region = self.trust_region if self.trust_region is not None else self.predicted
        return None if region is None else region.bound

    @max_policy_shift.setter
    def max_policy_shift(self, value: float) -> None:
        bound = check_positive(
            "max_policy_shift", value.item() if isinstance(value, Tensor) else value
        )
        if self.trust_region is not None:
            self.trust_region.search.bound = float(bound)
        elif self.predicted is not None:
            self.predicted.bound = float(bound)
        else:
            raise ValueError(
                "max_policy_shift: this CAPO was built without a bound; pass max_policy_shift= "
                "when building it"
            )

    def _alias(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.defaults = self.optimizer.defaults
        self.state = self.optimizer.state

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __repr__(self) -> str:
        s = self.settings
        parts = [f"levels={s.levels}"]
        if s.levels:
            parts += [f"rule={s.rule!r}", f"delta_h={s.delta_h}", f"delta_f={s.delta_f}"]
            parts += [f"top_k={s.top_k}", f"fisher={s.fisher!r}", f"direction={s.direction!r}"]
        if s.max_policy_shift is not None:
            parts += [f"max_policy_shift={s.max_policy_shift}"]
            parts += [f"shift_estimate={s.shift_estimate!r}"]
        return f"CAPO({', '.join(parts)},\n  {self.optimizer!r})"

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
            hidden: ``[B, T, H]`` states entering the head for the completion tokens (None when
                nothing needs them: the trust region with ``forward``, whole-model tracking).
            actions: ``[B, T]`` sampled token ids.
            advantages: ``[B]`` or ``[B, T]``.
            mask: ``[B, T]`` completion mask (bool or 0/1).
            logits: optional ``[B, T, V]`` raw head outputs for these tokens (saves a logits
                product; with the trust region, the policy before the step — kept by reference
                until ``step()``).
            forward: a callable mapping the model to the raw logits ``[B, T, V]`` of these
                completion tokens (or a :class:`curvopt.HeadInput`). The trust region calls it
                in ``step()`` at each trial point, with no gradient, under the autocast this call
                ran in; whole-model tracking differentiates through it.

        With ``step_reject_frac``, ``step()`` may clear entries of the returned mask in place
        (the tokens it rejects); the closure passed to ``step`` reads it then.

        Bad inputs raise before any statistic changes. Several calls between two steps
        (gradient accumulation) add up in ``stats``. An empty micro-batch (no token) keeps
        nothing and still takes part in the statistics' reduction over the process group.
        """
        inputs = Inputs(hidden, actions, advantages, mask, logits, forward)
        if self.tracker is not None:
            batch = self.tracker.prepare_inputs(inputs)
            if not self.rejector.levels:  # no model reads the logits: check them here
                check_finite_logits(logits, mask.bool())
            selection = self.rejector.apply(self.tracker, batch)
        else:
            device = next(self.model.parameters()).device
            selection = Selection(check_measured(inputs, device, self.head).clone())
        record = None
        if self.trust_region is not None:
            record = self.trust_region.record(
                selection.keep, actions, hidden=hidden, logits=logits, forward=forward
            )
        window = self._window
        window.add(selection, mask)
        if record is not None:
            window.measured.append(record)
        if self.track_realised or self.predicted is not None:
            window.batches.append(
                Inputs(
                    None if hidden is None else hidden.detach(),
                    actions.detach(),
                    advantages.detach(),
                    selection.keep,
                    forward=forward,
                )
            )
        return selection.keep

    @property
    def stats(self) -> dict[str, float]:
        """Statistics of the current window and lifetime counters (see the class docstring)."""
        out: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
        return out | self._window.stats()

    # ------------------------------------------------------------------ the optimizer contract

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Take the inner step (scaled by the trust region), or skip it (see the class docstring).

        A ``closure`` is evaluated first, as ``torch.optim`` optimizers do, and the step is
        decided and planned from the selections and gradients it leaves (``torch.optim.LBFGS``,
        which evaluates it repeatedly, also gets it; with ``step_reject_frac`` it is evaluated
        only when a token is rejected). Under ``torch.amp.GradScaler`` (CAPO handles its
        ``found_inf``/``grad_scale`` itself), a step with non-finite gradients is skipped: its
        window closes, so the next step counts and plans only its own micro-batches.
        """
        if not contract.at_step_boundary(self.optimizer):
            # accelerate between accumulation boundaries: its step() does nothing, and the window
            # (statistics, skip decision, shadow moments) goes on to the real step
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        window = self._window
        if contract.amp_step(self):
            self._counters["skipped_steps"] += 1
            window.close()
            return None
        loss = None
        lbfgs = isinstance(unwrap_optimizer(self.optimizer), torch.optim.LBFGS)
        if closure is not None and not self.step_reject_frac:
            if not lbfgs or self.max_policy_shift is not None:
                with torch.enable_grad():
                    loss = closure()
            if not lbfgs:
                closure = None
        if window.kept_nothing:
            if closure is not None and loss is None:
                with torch.enable_grad():
                    loss = closure()
            self._counters["skipped_steps"] += 1
            window.close()
            return loss
        batches = window.batches if window.open else []
        measured = window.measured if window.open else []
        if self.step_reject_frac > 0 and batches and closure is None:
            raise ValueError(
                "closure: step_reject_frac needs step(closure), a closure that zeroes the "
                "gradients, recomputes the loss with the masks select() returned and calls "
                "backward()"
            )
        window.step = {}
        taken = True
        track = self.tracker is not None and self.track_realised and bool(batches)
        before = self.tracker.snapshot(batches) if track and self.tracker else None
        if self._shadow is not None:
            self._shadow.before()
        if self.trust_region is not None and measured:
            result = self.trust_region.step(
                self.optimizer, measured, lambda s: self._take_step(s, closure)
            )
            taken = not result.pop("skipped")
            window.step = result
        else:
            if self.trust_region is not None:
                self._warn_unmeasured()
            scale = 1.0
            if self.predicted is not None:
                loss, closure = self._predict(batches, closure, loss)
                scale = window.step["step_scale"]
            out = self._take_step(scale, closure)
            loss = out if closure is not None else loss
        taken = taken and not contract.inner_step_skipped(self.optimizer)
        if taken:
            if self._shadow is not None:
                self._shadow.after(window.step.get("step_scale", 1.0))
            if self.tracker is not None:
                self.tracker.observe_step()
            self._counters["steps"] += 1
            if self.tracker is not None and before is not None and batches:
                window.step.update(self.tracker.realised_step(batches, before))
        else:
            self._counters["skipped_steps"] += 1
        window.close()
        return loss

    def _take_step(self, scale: float, closure: Callable[[], float] | None = None) -> Any:
        """The inner optimizer's step with every learning rate × ``scale`` (for this step)."""
        lrs = [g["lr"] for g in self.param_groups]
        if scale != 1.0:
            for g in self.param_groups:
                g["lr"] = g["lr"] * scale
        try:
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr

    def _predict(
        self, batches: list[Inputs], closure: Callable[[], float] | None, loss: Any
    ) -> tuple[Any, Callable[[], float] | None]:
        """The jvp estimate's scale (in the window's step statistics), after rejecting the
        largest-shift tokens with ``step_reject_frac``; returns the loss and the closure left for
        the inner step."""
        predicted, window = self.predicted, self._window
        assert predicted is not None
        models, window.step = predicted.plan(batches)
        if self.step_reject_frac > 0:
            rejected = 0
            if window.step["step_policy_shift"] > predicted.bound:
                rejected = predicted.reject_largest(batches, models)
                window.unkeep(rejected)
            if rejected:
                assert closure is not None  # required by step()
                with torch.enable_grad():
                    loss = closure()
                _, window.step = predicted.plan(batches)
            window.step["step_rejected"] = float(rejected)
            # the gradients are those of the kept tokens: the inner step must not recompute
            closure = None
        return loss, closure

    def _warn_unmeasured(self) -> None:
        if not self._warned_unmeasured:
            self._warned_unmeasured = True
            warnings.warn(
                "curvopt: step() without select() since the last step: the trust region has no "
                "tokens to measure, so the step is taken unscaled",
                RuntimeWarning,
                stacklevel=3,
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # during Optimizer.__init__, before aliasing
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"capo"`` entry with CAPO's own state.

        A bare optimizer of the same class can load it (it ignores the extra key). The hooks
        registered with ``register_state_dict_pre_hook``/``post_hook`` run as on any optimizer.
        """
        return contract.state_dict(self, self._build_state_dict)

    def _build_state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        own: dict[str, Any] = {"counters": dict(self._counters)}
        own["tracker"] = {} if self.tracker is None else self.tracker.state_dict()
        if self.trust_region is not None:
            own["trust_region"] = self.trust_region.search.state_dict()
        state["capo"] = own
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (or a bare optimizer's); the hooks registered with
        ``register_load_state_dict_pre_hook``/``post_hook`` run as on any optimizer."""
        contract.load_state_dict(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("capo", None)
        self.optimizer.load_state_dict(state_dict)
        self._alias()
        if own is not None:
            self._counters.update(own["counters"])
            if self.tracker is not None:
                self.tracker.load_state_dict(own["tracker"])
            if self.trust_region is not None and "trust_region" in own:
                self.trust_region.search.load_state_dict(own["trust_region"])
