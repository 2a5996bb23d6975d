"""CurvatureTracker: the quadratic model of every candidate update of the tracked parameters.

A candidate subset S (one token, one sequence, or the batch) has objective
``f_S(θ) = Σ_{t∈S} w_t A_t log π_θ(a_t | h_t)`` over the tracked parameters θ, and candidate update
Δ_S = the step the wrapped optimizer would take on loss ``−f_S`` alone. The tracker returns, for
every candidate, ``first_order = ⟨∇f_S, Δ_S⟩``, ``second_order = ½Δ_SᵀĤ_SΔ_S``, their sum
``objective_shift`` (m_H) and ``policy_shift = ½Δ_SᵀF̂_SΔ_S`` (m_F) (Melo, Abate, Gal, ICLR 2026,
https://arxiv.org/abs/2510.00819); see :mod:`curvopt.quadratic` for the logit-space formulas.

The tracker validates and gathers the inputs, weighs the candidates of each level and sums their
terms; a backend chosen once (:mod:`curvopt.heads`) gives the logit change of each candidate's
update: an ``nn.Linear`` head by closed forms (no per-token gradient tensor is ever formed), any
other head module through ``torch.func``, and any set of a model's parameters through forward-mode
AD over the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .heads.base import Head, compute_dtype, kl_of_change, step_moments
from .heads.functional import FunctionalHead
from .heads.linear import LinearHead
from .heads.whole import WholeModel, resolve_params
from .inputs import Batch, Forward, Inputs
from .optimizers import (
    OptimizerReader,
    RuleSource,
    ShadowAdam,
    UpdateRule,
    planned_update,
    unwrap_optimizer,
)
from .optimizers.support import check_shadow
from .policy import LogitTransform
from .precision import full_precision
from .quadratic import LEVELS, Fisher, Level, Moments, QuadraticModel, candidate_terms
from .settings import DEFAULTS, Direction, check
from .validation import check_inputs, check_model_advantages

__all__ = ["CurvatureTracker"]


class CurvatureTracker:
    """Quadratic model of the candidate updates of an output layer under a real optimizer.

    Args:
        head: the output layer mapping hidden states ``[..., H]`` to logits ``[..., V]``; its
            trainable parameters must be in ``optimizer``. ``nn.Linear`` takes the closed forms.
        optimizer: the optimizer that trains the head (an accelerate-wrapped one is unwrapped).
            Its update rule is read from its state for torch SGD, Adam and AdamW (closed forms)
            and Adadelta, Adagrad, Adamax, ASGD, NAdam, RAdam, RMSprop and Rprop (exact, by
            stepping a copy), and subclasses of them that do not override ``step``
            (:mod:`curvopt.optimizers.support`); modelling an update under any other optimizer
            raises :class:`TypeError` naming ``optimizer`` (except with ``"shadow"``), while
            :meth:`realised_shift` and :meth:`kl_of_change` work with every optimizer.
        top_k: ``None`` for the full vocabulary, or K to restrict each token's softmax to its K
            largest logits (the paper's reference truncation; an action outside them contributes
            only ``−π``).
        fisher: ``"empirical"`` (m_F = ½Σw(v·u)², the score outer product) or ``"true"``
            (m_F = ½Σw uᵀFu, the exact Fisher of the softmax, ≈ the KL of the update).
        direction: how the candidate update Δ_S is formed.
            ``"exact"``: a copy of the real optimizer stepping on −f_S (SGD, Adam, AdamW with all
            options; Adam's prospective moments include the candidate's own gradient).
            ``"frozen"``: for token candidates, Adam's step with its second moment held at its
            zero-candidate value (a fixed diagonal preconditioner: one GEMM the size of the logits
            product for all tokens), except on each token's action row and its ``EXACT_ROWS``
            most probable rows, where the token's own gradient can dominate the second moment and
            the exact step is kept. On the first step (no moments yet) Adam's step is taken in the
            ε → 0 limit, ``−lr·sign(g)``. Sequence and batch candidates form their ΔW
            explicitly, so they are exact. Exact for SGD and the elementwise optimizers.
            ``"shadow"``: ``"frozen"`` over Adam moments the tracker keeps itself, advanced by
            :meth:`observe_step` from the head's gradient, for an Adam whose state cannot be read
            (ZeRO-partitioned, 8-bit, another library's class): torch Adam/AdamW, or a class
            curvopt does not recognise whose param groups have Adam's ``betas`` and ``eps``;
            any other optimizer raises :class:`TypeError` naming ``optimizer``.
        Heads other than ``nn.Linear`` form every candidate's Δ explicitly and are always exact.
        temperature, logit_scale, softcap: the policy is ``softmax(φ(head(h)))`` with
            ``φ(z) = softcap·tanh(logit_scale·z/softcap)/temperature`` (without a soft-cap,
            ``logit_scale·z/temperature``): set them to what your trainer samples and optimises
            (TRL divides by ``temperature``; Gemma 2 soft-caps, Cohere scales). ``logits`` passed
            to the tracker are always the head's raw outputs z.
        process_group: under ``torch.distributed`` (data parallel: every rank holds the same head
            and optimizer state), the batch candidate spans this group (default: the world), so
            every rank gets the batch-level model of the concatenated batch; token and sequence
            candidates stay local. Then :meth:`evaluate` at level ``"batch"`` is a collective.

    Computation runs in float32 (float64 if the inputs or head are float64), in chunks whose
    temporaries stay below about :data:`~curvopt.heads.base.CHUNK_ELEMENTS` elements.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        top_k: int | None = DEFAULTS.top_k,
        fisher: Fisher = DEFAULTS.fisher,
        direction: Direction = DEFAULTS.direction,
        temperature: float = DEFAULTS.temperature,
        logit_scale: float = DEFAULTS.logit_scale,
        softcap: float | None = DEFAULTS.softcap,
        process_group: torch.distributed.ProcessGroup | None = None,
        params: str | Sequence[nn.Module | nn.Parameter] = "head",
        model: nn.Module | None = None,
    ) -> None:
        if not isinstance(head, nn.Module):
            raise TypeError(f"head: expected an nn.Module, got {type(head).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        for name, value in (("top_k", top_k), ("fisher", fisher), ("direction", direction)):
            check(name, value)
        self.transform = LogitTransform(logit_scale, softcap, temperature)
        base = unwrap_optimizer(optimizer)
        if direction == "shadow":
            check_shadow(base)
        self.whole = not (isinstance(params, str) and params == "head")
        if self.whole:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    "model: tracking params other than 'head' needs the model (an nn.Module) "
                    f"that maps inputs to logits, got {type(model).__name__}"
                )
            if top_k is not None:
                raise ValueError("top_k: only supported with params='head'")
            names, tracked = resolve_params(params, model)
        else:
            trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("head: has no trainable parameters")
            names, tracked = [n for n, _ in trainable], [p for _, p in trainable]
        in_optimizer = {id(p) for g in base.param_groups for p in g["params"]}
        missing = [n for n, p in zip(names, tracked) if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{'params' if self.whole else 'head'}: parameters {missing} are not in the "
                "optimizer's param_groups; pass the optimizer that trains them"
            )
        self.names: list[str] = names
        self.params: list[Tensor] = list(tracked)
        self.head = head
        self.model = model
        self.optimizer = base
        self.top_k = top_k
        self.fisher: Fisher = fisher
        self.direction: Direction = direction
        self.linear = type(head) is nn.Linear
        self.shadow = ShadowAdam(self.params, base) if direction == "shadow" else None
        self.source: RuleSource = (
            OptimizerReader(self.params, base) if self.shadow is None else self.shadow
        )
        self.process_group = process_group
        self.backend = self._backend()

    def _backend(self) -> Head:
        """The backend for the tracked parameters, chosen once."""
        if self.whole:
            assert self.model is not None
            return WholeModel(self.model, self.names, self.params, self.transform)
        if self.linear:
            return LinearHead(
                self.head, self.names, self.params, self.transform, self.top_k, self.direction,
                self.source,
            )  # fmt: skip
        return FunctionalHead(self.head, self.names, self.params, self.transform, self.top_k)

    # ------------------------------------------------------------------ public API

    def quadratic_model(
        self,
        hidden: Tensor,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        level: Level = "token",
        logits: Tensor | None = None,
        forward: Forward | None = None,
    ) -> QuadraticModel:
        """The quadratic model of every candidate at ``level``.

        Args:
            hidden: ``[B, T, H]`` states entering the head for the completion tokens.
            actions: ``[B, T]`` sampled token ids (only masked-in entries are read).
            advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``.
            mask: ``[B, T]`` bool (or 0/1) completion mask.
            level: ``"token"`` (w=1) → ``[B, T]``; ``"sequence"`` (w=1/|b|) → ``[B]``;
                ``"batch"`` (GRPO weighting w=1/(B'|b|), B' sequences with a token) → scalar.
            logits: optional ``[B, T, V]`` head outputs for ``hidden``, to avoid recomputing them.
            forward: with ``params`` other than ``"head"``, a callable mapping the model to the
                raw logits ``[B, T, V]`` of these completion tokens (``hidden`` may be None);
                the candidates are then exact over the tracked parameters
                (:mod:`curvopt.heads.whole`; for small models).

        Returns:
            A :class:`~curvopt.QuadraticModel`; entries that are not candidates are 0.
        """
        if level not in LEVELS:
            raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
        inputs = Inputs(hidden, actions, advantages, mask, logits, forward)
        return self.evaluate(self.prepare_inputs(inputs), level)

    def prepare(
        self,
        hidden: Tensor | None,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        logits: Tensor | None = None,
        *,
        forward: Forward | None = None,
    ) -> Batch:
        """Validate the inputs and gather the masked-in tokens (shared by several levels)."""
        return self.prepare_inputs(Inputs(hidden, actions, advantages, mask, logits, forward))

    @torch.no_grad()
    @full_precision()
    def prepare_inputs(self, inputs: Inputs) -> Batch:
        """:meth:`prepare` of one :class:`~curvopt.inputs.Inputs`."""
        inputs = self.backend.complete(inputs)
        device = self.params[0].device
        mask = check_inputs(inputs, device)
        batch = Batch.gather(inputs, mask, self._dtype(inputs.hidden), device)
        check_model_advantages(batch.adv)
        batch.vocab = vocab = self.backend.vocab(batch.logits, batch.h)
        acts = batch.actions
        if acts.numel() and (acts.min() < 0 or acts.max() >= vocab):
            bad = acts[(acts < 0) | (acts >= vocab)][0].item()
            raise ValueError(
                f"actions: masked-in token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if self.top_k is not None and self.top_k > vocab:
            raise ValueError(f"top_k: {self.top_k} exceeds the vocabulary size {vocab}")
        self.backend.check(batch)
        return batch

    @torch.no_grad()
    @full_precision()
    def evaluate(self, batch: Batch, level: Level, keep: Tensor | None = None) -> QuadraticModel:
        """The quadratic model at ``level`` over the tokens of ``batch`` that ``keep`` retains.

        ``keep`` is a ``[B, T]`` bool subset of the batch's mask (default: the whole mask); the
        candidates' weights are computed over it.
        """
        B, T = batch.shape
        dtype, device = batch.h.dtype, batch.h.device
        group = self.process_group
        if level == "batch" and not self.backend.reduces_over_groups and distributed.active(group):
            raise ValueError(
                "params: whole-model batch candidates are not reduced over a process group; "
                "use token or sequence levels, or params='head', under torch.distributed"
            )
        sel = torch.ones(batch.n, dtype=torch.bool, device=device)
        if keep is not None:
            sel = keep.reshape(-1)[batch.positions]
        tokens = sel.nonzero().squeeze(1)
        counts = torch.bincount(batch.seq[tokens], minlength=B).to(dtype)
        rules = self._steps(dtype, frozen=False)
        if level == "token":
            moments = self.backend.token_moments(batch, tokens, rules)
            weights = torch.ones(tokens.numel(), dtype=dtype, device=device)
            terms = self._terms(batch, tokens, weights, moments)
            out = [torch.zeros(B * T, dtype=dtype, device=device) for _ in range(3)]
            for o, t in zip(out, terms):
                o[batch.positions[tokens]] = t
            cand = torch.zeros(B * T, dtype=torch.bool, device=device)
            cand[batch.positions[tokens]] = True
            return _model([o.reshape(B, T) for o in out], cand.reshape(B, T), level)
        seqs = batch.seq[tokens]
        weights = 1.0 / counts[seqs]
        if level == "sequence":
            out = [torch.zeros(B, dtype=dtype, device=device) for _ in range(3)]
            present = (counts > 0).nonzero().squeeze(1).tolist()
            candidates = [(tokens[seqs == b], weights[seqs == b]) for b in present]
            found = self.backend.subset_moments(batch, candidates, rules, distributed.LOCAL)
            for b, (members, w), m in zip(present, candidates, found):
                for o, t in zip(out, self._terms(batch, members, w, m)):
                    o[b] = t.sum()
            return _model(out, counts > 0, level)
        n_seqs = distributed.all_reduce_sum((counts > 0).sum(), group)
        weights = weights / n_seqs.clamp(min=1)
        if int(n_seqs) == 0:
            zero = torch.zeros((), dtype=dtype, device=device)
            return QuadraticModel(zero, zero, zero, torch.tensor(False, device=device), level)
        (moments,) = self.backend.subset_moments(batch, [(tokens, weights)], rules, group)
        terms = self._terms(batch, tokens, weights, moments)
        sums = distributed.all_reduce_sum(torch.stack([t.sum() for t in terms]), group)
        return _model(list(sums), torch.tensor(True, device=device), level)

    def step_model(
        self,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        hidden: Tensor | None = None,
        logits: Tensor | None = None,
        forward: Forward | None = None,
        fisher: Fisher | None = None,
        curvature: bool = False,
    ) -> QuadraticModel:
        """Token by token, the quadratic model of the update the optimizer is about to take.

        After ``backward()``, the update Δθ of the tracked parameters is known from the
        optimizer's state and the current ``.grad`` (exactly, with weight decay and momentum,
        without stepping). For every masked-in token this returns, at level ``"token"``
        (``[B, T]``), ``first_order = A_t v_tᵀu_t``, ``second_order = ½A_t[(v_tᵀu_t)² − u_tᵀF_tu_t
        + v_tᵀr_t]`` and ``policy_shift`` (½u_tᵀF_tu_t with ``fisher="true"``: the second-order
        model of the token's KL; ``fisher`` defaults to the tracker's), with ``u_t = J_tΔθ`` the
        token's logit change. Weight the terms as your loss weights tokens to get the batch's.

        ``params="head"`` needs ``hidden`` (the logit change is ``ΔW h + Δb``); otherwise
        ``forward`` (one forward-mode pass through the model). ``r_t = Δθᵀ∇²z_tΔθ``, the logits'
        own curvature, is zero for a linear head; for the whole model it needs a nested
        forward-mode pass and is included only with ``curvature=True``.
        """
        inputs = Inputs(hidden, actions, advantages, mask, logits, forward)
        return self.step_model_of(inputs, fisher=fisher, curvature=curvature)

    @torch.no_grad()
    @full_precision()
    def step_model_of(
        self, inputs: Inputs, *, fisher: Fisher | None = None, curvature: bool = False
    ) -> QuadraticModel:
        """:meth:`step_model` of one :class:`~curvopt.inputs.Inputs`."""
        dtype = self._dtype(inputs.hidden)
        deltas = planned_update(self._steps(dtype, frozen=False), self.params, self.optimizer)
        change = self.backend.step_change(inputs, deltas, dtype, curvature)
        if change.logits is not None:
            inputs = replace(inputs, logits=change.logits)
        batch = self.prepare_inputs(inputs)
        B, T = batch.shape
        m = step_moments(batch, change, self.transform)
        ones = torch.ones(batch.n, dtype=dtype, device=batch.h.device)
        terms = candidate_terms(ones, batch.adv, m.vu, m.ufu, m.vr, fisher or self.fisher)
        out = [torch.zeros(B * T, dtype=dtype, device=batch.h.device) for _ in range(3)]
        for o, t in zip(out, terms):
            o[batch.positions] = t
        return _model([o.reshape(B, T) for o in out], batch.mask, "token")

    @torch.no_grad()
    @full_precision()
    def observe_step(self) -> None:
        """Tell the tracker a real optimizer step was taken (advances the shadow moments)."""
        if self.shadow is not None:
            self.shadow.update()

    @torch.no_grad()
    @full_precision()
    def realised_shift(self, hidden: Tensor, before: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Realised and predicted policy shift of an actual update of the head.

        Args:
            hidden: ``[n, H]`` hidden states of the tokens to measure.
            before: the head's parameters before the update (same order as ``self.params``).

        Returns:
            ``(kl, quadratic)``, each ``[n]``: the exact ``KL(π_before ‖ π_after)`` of each token's
            full-vocabulary softmax, and its quadratic model ½uᵀF u with u the realised logit
            change. The KL is evaluated as ``log E_π[exp(u − E_π u)]`` (``log1p``/``expm1``), which
            stays accurate in float32 for the tiny shifts of one step.
        """
        return self.backend.realised_shift(hidden, before, self._dtype(hidden))

    @torch.no_grad()
    @full_precision()
    def kl_of_change(self, logits: Tensor, change: Tensor) -> tuple[Tensor, Tensor]:
        """``(kl, quadratic)`` per row of raw logits ``z [n, V]`` moved by ``u [n, V]``: the exact
        ``KL(π(z) ‖ π(z + u))`` of the policy (with the logit transform) and its quadratic
        model ½ũᵀFũ, ũ the policy logits' change. The KL is evaluated as
        ``log E_π[exp(ũ − E_π ũ)]`` (``log1p``/``expm1``), accurate in float32 for tiny shifts."""
        return kl_of_change(self.transform, logits, change)

    @torch.no_grad()
    @full_precision()
    def snapshot(self, batches: Sequence[Inputs]) -> list[Tensor]:
        """Before a step: what :meth:`realised_step` measures it against."""
        return self.backend.snapshot(batches)

    @torch.no_grad()
    @full_precision()
    def realised_step(self, batches: Sequence[Inputs], before: list[Tensor]) -> dict[str, float]:
        """After a step: the mean exact KL of the update taken over the kept tokens (``mask``) of
        ``batches`` (``policy_shift_realised``) and of its quadratic model
        (``policy_shift_step_model``), over the process group."""
        kls, quads = [], []
        for i, b in enumerate(batches):
            kl, quad = self.backend.measure(b, i, before)
            kls.append(kl.sum())
            quads.append(quad.sum())
        n = sum(float(b.mask.sum()) for b in batches)
        sums = torch.stack([torch.stack(kls).sum(), torch.stack(quads).sum()]).to(torch.float64)
        sums = torch.cat([sums, sums.new_tensor([n])])
        kl_sum, quad_sum, n = distributed.all_reduce_sum(sums, self.process_group).tolist()
        return {
            "policy_shift_realised": kl_sum / n if n else 0.0,
            "policy_shift_step_model": quad_sum / n if n else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """The tracker's own state (the shadow moments; empty otherwise)."""
        return {} if self.shadow is None else {"shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.shadow is not None and "shadow" in state:
            self.shadow.load_state_dict(state["shadow"])

    # ------------------------------------------------------------------ internals

    def _dtype(self, hidden: Tensor | None) -> torch.dtype:
        return compute_dtype(hidden, self.params)

    def _steps(self, dtype: torch.dtype, *, frozen: bool) -> list[UpdateRule]:
        """The update rules of the tracked parameters (exact, or frozen for token candidates)."""
        return self.source.rules(dtype, frozen=frozen)

    def _terms(
        self, batch: Batch, tokens: Tensor, weights: Tensor, moments: Moments
    ) -> tuple[Tensor, Tensor, Tensor]:
        return candidate_terms(weights, batch.adv[tokens], *moments, self.fisher)


def _model(terms: Sequence[Tensor], candidates: Tensor, level: Level) -> QuadraticModel:
    """The quadratic model of ``(first_order, second_order, policy_shift)``."""
    first, second, policy = terms
    return QuadraticModel(first, second, policy, candidates, level)
