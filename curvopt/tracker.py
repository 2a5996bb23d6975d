"""CurvatureTracker: the quadratic model of every candidate update of the output layer.

A candidate subset S (one token, one sequence, or the batch) has objective
``f_S(θ) = Σ_{t∈S} w_t A_t log π_θ(a_t | h_t)`` over the head's parameters θ, and candidate update
Δ_S = the step the wrapped optimizer would take on loss ``−f_S`` alone. The tracker returns, for
every candidate, ``first_order = ⟨∇f_S, Δ_S⟩``, ``second_order = ½Δ_SᵀĤ_SΔ_S``, their sum
``objective_shift`` (m_H) and ``policy_shift = ½Δ_SᵀF̂_SΔ_S`` (m_F); see
:mod:`curvopt.quadratic` for the logit-space formulas.

An ``nn.Linear`` head (with or without bias) takes the closed forms: every quantity depends on Δ
only through the logit change ``u_t = ΔW h_t + Δb``, and a token's gradient is rank one,
``A_t (e_{a_t} − π_t) h_tᵀ``, so no per-token gradient tensor is ever formed. Any other head module
goes through :mod:`curvopt.generic` (``torch.func``; exact, slower).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import distributed, generic, kernels, wholemodel
from .directions import (
    SUPPORTED_OPTIMIZERS,
    AdamStep,
    AffineStep,
    FrozenAdamStep,
    Restricted,
    Rows,
    ShadowAdam,
    SignStep,
    StepModel,
    optimizer_steps,
    restrict,
    unwrap_optimizer,
)
from .logits import LogitTransform
from .quadratic import Fisher, Level, LogitMoments, QuadraticModel, candidate_terms

__all__ = ["CurvatureTracker"]

Direction = Literal["exact", "frozen", "shadow"]
LEVELS: tuple[Level, ...] = ("token", "sequence", "batch")

# Elements of the largest temporary a chunk may create; 2**22 float32 ≈ 16 MiB.
CHUNK_ELEMENTS = 1 << 22
# Rows per token (besides its action) on which the frozen direction keeps Adam's exact step.
EXACT_ROWS = 16


@dataclass
class Batch:
    """Validated, flattened masked-in tokens of one ``select``/``quadratic_model`` call.

    N masked-in tokens, in row-major order of ``mask``:
    ``positions [N]`` flat indices into ``[B*T]``, ``seq [N]`` sequence index, ``h [N, H]`` hidden
    states (compute dtype), ``actions [N]``, ``adv [N]`` advantages, ``logits`` an optional
    ``[B, T, V]`` caller's logits, ``topk_idx/topk_logits [N, K]`` when ``top_k`` is set.
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
    forward: wholemodel.Forward | None = None

    @property
    def n(self) -> int:
        return self.positions.numel()


class CurvatureTracker:
    """Quadratic model of the candidate updates of an output layer under a real optimizer.

    Args:
        head: the output layer mapping hidden states ``[..., H]`` to logits ``[..., V]``; its
            trainable parameters must be in ``optimizer``. ``nn.Linear`` takes the closed forms.
        optimizer: the optimizer that trains the head (an accelerate-wrapped one is unwrapped).
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
            explicitly, so they are exact. Exact for SGD.
            ``"shadow"``: ``"frozen"`` over Adam moments the tracker keeps itself, advanced by
            :meth:`observe_step` from the head's gradient, for optimizers whose state cannot be
            read (ZeRO-partitioned, 8-bit, other classes).
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
    temporaries stay below about ``CHUNK_ELEMENTS`` elements.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        top_k: int | None = None,
        fisher: Fisher = "empirical",
        direction: Direction = "frozen",
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
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
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k: expected None or an int, got {type(top_k).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: expected None or ≥ 1, got {top_k}")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher: expected 'empirical' or 'true', got {fisher!r}")
        if direction not in ("exact", "frozen", "shadow"):
            raise ValueError(
                f"direction: expected 'exact', 'frozen' or 'shadow', got {direction!r}"
            )
        self.transform = LogitTransform(logit_scale, softcap, temperature)
        base = unwrap_optimizer(optimizer)
        if direction != "shadow" and type(base) not in SUPPORTED_OPTIMIZERS:
            names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
            raise TypeError(
                f"optimizer: direction={direction!r} reads the state of {names}; got "
                f"{type(base).__module__}.{type(base).__qualname__}. "
                "Use direction='shadow' for other optimizers."
            )
        self.whole = not (isinstance(params, str) and params == "head")
        if self.whole:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    "model: tracking params other than 'head' needs the model (an nn.Module) "
                    f"that maps inputs to logits, got {type(model).__name__}"
                )
            if top_k is not None:
                raise ValueError("top_k: only supported with params='head'")
            self.names, self.params = wholemodel.resolve_params(params, model)
        else:
            self.names, self.params = [], []
            for name, p in head.named_parameters():
                if p.requires_grad:
                    self.names.append(name)
                    self.params.append(p)
            if not self.params:
                raise ValueError("head: has no trainable parameters")
        in_optimizer = {id(p) for g in base.param_groups for p in g["params"]}
        missing = [n for n, p in zip(self.names, self.params) if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{'params' if self.whole else 'head'}: parameters {missing} are not in the "
                "optimizer's param_groups; pass the optimizer that trains them"
            )
        self.head = head
        self.model = model
        self.optimizer = base
        self.top_k = top_k
        self.fisher: Fisher = fisher
        self.direction: Direction = direction
        self.linear = type(head) is nn.Linear
        self.shadow = ShadowAdam(self.params, base) if direction == "shadow" else None
        self.process_group = process_group

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
        forward: wholemodel.Forward | None = None,
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
                (:mod:`curvopt.wholemodel`; for small models).

        Returns:
            A :class:`~curvopt.QuadraticModel`; entries that are not candidates are 0.
        """
        if level not in LEVELS:
            raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
        return self.evaluate(
            self.prepare(hidden, actions, advantages, mask, logits, forward=forward), level
        )

    @torch.no_grad()
    def prepare(
        self,
        hidden: Tensor | None,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        logits: Tensor | None = None,
        *,
        forward: wholemodel.Forward | None = None,
    ) -> Batch:
        """Validate the inputs and gather the masked-in tokens (shared by several levels)."""
        if self.whole:
            if not callable(forward):
                raise TypeError(
                    "forward: tracking params other than 'head' needs a callable mapping the "
                    f"model to the completion logits [B, T, V], got {type(forward).__name__}"
                )
            if logits is None:
                logits = forward(self.model).detach()
        elif hidden is None:
            raise TypeError("hidden: expected a torch.Tensor, got NoneType")
        device = self.params[0].device
        mask = _validate(hidden, actions, advantages, mask, logits, device)
        B, T = actions.shape
        dtype = self._dtype(hidden)
        positions = mask.reshape(-1).nonzero().squeeze(1)
        seq = torch.div(positions, T, rounding_mode="floor")
        if hidden is None:
            h = torch.zeros(positions.numel(), 0, dtype=dtype, device=device)
        else:
            h = hidden.detach().reshape(B * T, -1)[positions].to(dtype)
        acts = actions.reshape(-1)[positions]
        adv = advantages.detach()
        adv = (adv[seq] if adv.dim() == 1 else adv.reshape(-1)[positions]).to(dtype)
        # kept [B, T, V] and indexed by (sequence, position): logits sliced out of a longer
        # output are not contiguous, and a reshape would copy them whole
        logits = None if logits is None else logits.detach()
        vocab = self._vocab(logits, h)
        if acts.numel() and (acts.min() < 0 or acts.max() >= vocab):
            bad = acts[(acts < 0) | (acts >= vocab)][0].item()
            raise ValueError(
                f"actions: masked-in token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if self.top_k is not None and self.top_k > vocab:
            raise ValueError(f"top_k: {self.top_k} exceeds the vocabulary size {vocab}")
        batch = Batch((B, T), mask, positions, seq, h, acts, adv, vocab, logits)
        batch.forward = forward
        if self.whole and not torch.isfinite(logits.sum(-1, dtype=torch.float64)[mask]).all():
            raise ValueError("logits: the forward's logits are non-finite at masked-in positions")
        if self.top_k is not None and batch.n:
            vals, idxs = [], []
            for sl in _chunks(batch.n, max(1, CHUNK_ELEMENTS // vocab)):
                z = self._logits(batch, sl)
                v, i = torch.topk(z, self.top_k, dim=-1)
                vals.append(v)
                idxs.append(i)
            batch.topk_logits, batch.topk_idx = torch.cat(vals), torch.cat(idxs)
        return batch

    @torch.no_grad()
    def evaluate(self, batch: Batch, level: Level, keep: Tensor | None = None) -> QuadraticModel:
        """The quadratic model at ``level`` over the tokens of ``batch`` that ``keep`` retains.

        ``keep`` is a ``[B, T]`` bool subset of the batch's mask (default: the whole mask); the
        candidates' weights are computed over it.
        """
        B, T = batch.shape
        dtype, device = batch.h.dtype, batch.h.device
        sel = torch.ones(batch.n, dtype=torch.bool, device=device)
        if keep is not None:
            sel = keep.reshape(-1)[batch.positions]
        tokens = sel.nonzero().squeeze(1)
        counts = torch.bincount(batch.seq[tokens], minlength=B).to(dtype)
        steps = self._steps(dtype, frozen=False)
        if self.whole:
            return self._evaluate_whole(batch, level, tokens, counts, steps)
        if level == "token":
            weights = torch.ones(tokens.numel(), dtype=dtype, device=device)
            terms = self._token_terms(batch, tokens, weights, steps)
            out = [torch.zeros(B * T, dtype=dtype, device=device) for _ in range(3)]
            for o, t in zip(out, terms):
                o[batch.positions[tokens]] = t
            cand = torch.zeros(B * T, dtype=torch.bool, device=device)
            cand[batch.positions[tokens]] = True
            return QuadraticModel(*(o.reshape(B, T) for o in out), cand.reshape(B, T), level)
        seqs = batch.seq[tokens]
        weights = 1.0 / counts[seqs]
        if level == "sequence":
            out = [torch.zeros(B, dtype=dtype, device=device) for _ in range(3)]
            for b in (counts > 0).nonzero().squeeze(1).tolist():
                members = tokens[seqs == b]
                terms = self._subset_terms(batch, members, weights[seqs == b], steps)
                for o, t in zip(out, terms):
                    o[b] = t.sum()
            return QuadraticModel(*out, counts > 0, level)
        group = self.process_group
        n_seqs = distributed.all_reduce_sum((counts > 0).sum(), group)
        weights = weights / n_seqs.clamp(min=1)
        if int(n_seqs) == 0:
            zero = torch.zeros((), dtype=dtype, device=device)
            return QuadraticModel(zero, zero, zero, torch.tensor(False, device=device), level)
        terms = self._subset_terms(batch, tokens, weights, steps, group=group)
        sums = distributed.all_reduce_sum(torch.stack([t.sum() for t in terms]), group)
        return QuadraticModel(*sums, torch.tensor(True, device=device), level)

    def _evaluate_whole(
        self,
        batch: Batch,
        level: Level,
        tokens: Tensor,
        counts: Tensor,
        steps: list[StepModel],
    ) -> QuadraticModel:
        """Exact candidates over the tracked parameters (see :mod:`curvopt.wholemodel`)."""
        B, T = batch.shape
        dtype, device = batch.h.dtype, batch.h.device
        if level == "batch" and distributed.active(self.process_group):
            raise ValueError(
                "params: whole-model batch candidates are not reduced over a process group; "
                "use token or sequence levels, or params='head', under torch.distributed"
            )
        pos, seqs = batch.positions[tokens], batch.seq[tokens]
        weights = 1.0 / counts[seqs] if level != "token" else torch.ones_like(batch.adv[tokens])
        if level == "token":
            groups = [torch.tensor([i], device=device) for i in range(tokens.numel())]
        elif level == "sequence":
            groups = [(seqs == b).nonzero().squeeze(1) for b in range(B) if counts[b] > 0]
        else:
            weights = weights / (counts > 0).sum().clamp(min=1)
            groups = [torch.arange(tokens.numel(), device=device)] if tokens.numel() else []
        flat_actions = torch.zeros(B * T, dtype=torch.long, device=device)
        flat_actions[pos] = batch.actions[tokens]
        flat_adv = torch.zeros(B * T, dtype=dtype, device=device)
        flat_adv[pos] = batch.adv[tokens]
        moments = wholemodel.candidate_moments(
            self, batch.forward, flat_actions.reshape(B, T), flat_adv.reshape(B, T),
            [(pos[g], weights[g]) for g in groups], steps, dtype,
        )  # fmt: skip
        shape = {"token": (B * T,), "sequence": (B,), "batch": ()}[level]
        out = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(3)]
        cand = torch.zeros(shape, dtype=torch.bool, device=device)
        for g, m in zip(groups, moments):
            terms = candidate_terms(
                weights[g], batch.adv[tokens][g], m.vu, m.ufu, m.vr, self.fisher
            )
            index = {"token": pos[g][0], "sequence": seqs[g][0], "batch": ()}[level]
            for o, t in zip(out, terms):
                o[index] = t.sum()
            cand[index] = True
        if level == "token":
            return QuadraticModel(*(o.reshape(B, T) for o in out), cand.reshape(B, T), level)
        return QuadraticModel(*out, cand, level)

    @torch.no_grad()
    def step_model(
        self,
        actions: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        hidden: Tensor | None = None,
        logits: Tensor | None = None,
        forward: wholemodel.Forward | None = None,
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
        dtype = self._dtype(hidden)
        deltas = wholemodel.planned_update(
            self._steps(dtype, frozen=False), self.params, self.optimizer
        )
        if self.whole:
            if not callable(forward):
                raise TypeError(
                    "forward: tracking params other than 'head' needs a callable mapping the "
                    f"model to the completion logits [B, T, V], got {type(forward).__name__}"
                )
            # the forward-mode pass also gives the logits: no separate forward for them
            z, u, r = wholemodel.step_logit_change(
                self.model, self.names, self.params, deltas, forward, curvature=curvature
            )
            logits = z
        batch = self.prepare(hidden, actions, advantages, mask, logits, forward=forward)
        B, T = batch.shape
        device = batch.h.device
        if not self.whole and not self.linear:
            params = tuple(p.detach().to(dtype) for p in self.params)
            change = generic._change(self.head, self.names, params, None)
        t = self.transform
        m = LogitMoments(batch.n, dtype, device)
        # token chunks: no [n, V] temporary beyond the chunk's, and one fused pass per chunk
        for sl in _chunks(batch.n, max(1, CHUNK_ELEMENTS // batch.vocab)):
            rc = None
            if self.whole:
                # prepare() has checked these logits finite: no second pass over them
                at = (batch.seq[sl], batch.positions[sl] % T)
                zc, uc = z[at].to(dtype), u[at].to(dtype)
                rc = None if r is None else r[at].to(dtype)
            else:
                zc = self._logits(batch, sl)
                if self.linear:
                    uc = self._head_logits(batch.h[sl], deltas, dtype)
                else:
                    with torch.enable_grad():
                        uc, rc = torch.func.vmap(change, in_dims=(0, None))(
                            batch.h[sl], tuple(deltas)
                        )
            stats = kernels.call(
                _change_stats, zc.numel(), zc, uc, rc, batch.actions[sl],
                t.scale, t.softcap, t.temperature,
            )  # fmt: skip
            m.merge(*stats, index=sl)
        ones = torch.ones(batch.n, dtype=dtype, device=device)
        terms = candidate_terms(ones, batch.adv, m.vu, m.ufu, m.vr, fisher or self.fisher)
        out = [torch.zeros(B * T, dtype=dtype, device=device) for _ in range(3)]
        for o, t in zip(out, terms):
            o[batch.positions] = t
        return QuadraticModel(*(o.reshape(B, T) for o in out), batch.mask, "token")

    @torch.no_grad()
    def observe_step(self) -> None:
        """Tell the tracker a real optimizer step was taken (advances the shadow moments)."""
        if self.shadow is not None:
            self.shadow.update()

    @torch.no_grad()
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
        if self.whole:
            raise ValueError("params: with whole-model tracking measure with kl_of_change")
        dtype = self._dtype(hidden)
        h = hidden.detach().to(dtype)
        before = [b.detach().to(dtype) for b in before]
        after = self._head_params(dtype)
        kl = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        quad = torch.empty_like(kl)
        vocab = self._vocab(None, h[:1]) if h.shape[0] else 1
        for sl in _chunks(h.shape[0], max(1, CHUNK_ELEMENTS // vocab)):
            z = self._head_logits(h[sl], before, dtype)
            if self.linear:  # from the parameter change itself: no cancellation in z1 − z0
                u = self._head_logits(h[sl], [a - b for a, b in zip(after, before)], dtype)
            else:
                u = self._head_logits(h[sl], after, dtype) - z
            kl[sl], quad[sl] = self.kl_of_change(z, u)
        return kl, quad

    @torch.no_grad()
    def kl_of_change(self, logits: Tensor, change: Tensor) -> tuple[Tensor, Tensor]:
        """``(kl, quadratic)`` per row of raw logits ``z [n, V]`` moved by ``u [n, V]``: the exact
        ``KL(π(z) ‖ π(z + u))`` of the policy (with the logit transform) and its quadratic
        model ½ũᵀFũ, ũ the policy logits' change. The KL is evaluated as
        ``log E_π[exp(ũ − E_π ũ)]`` (``log1p``/``expm1``), accurate in float32 for tiny shifts."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        z, u = logits.to(dtype), change.to(dtype)
        probs = torch.softmax(self.transform(z), -1)
        u = self.transform.difference(z, u)
        m = LogitMoments(probs.shape[0], dtype, z.device)
        m.add(u.clone(), probs, torch.zeros_like(probs))
        kl = torch.log1p((probs * torch.expm1(u - m.mean.unsqueeze(1))).sum(-1))
        return kl, 0.5 * m.ufu

    def state_dict(self) -> dict:
        """The tracker's own state (the shadow moments; empty otherwise)."""
        return {} if self.shadow is None else {"shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.shadow is not None and "shadow" in state:
            self.shadow.load_state_dict(state["shadow"])

    # ------------------------------------------------------------------ internals

    def _dtype(self, hidden: Tensor | None) -> torch.dtype:
        if hidden is not None and hidden.dtype == torch.float64:
            return torch.float64
        if any(p.dtype == torch.float64 for p in self.params):
            return torch.float64
        return torch.float32

    def _steps(self, dtype: torch.dtype, *, frozen: bool) -> list[StepModel]:
        if self.shadow is not None:
            return self.shadow.steps(dtype, frozen=frozen)
        return optimizer_steps(self.optimizer, self.params, frozen=frozen, dtype=dtype)

    def _head_params(self, dtype: torch.dtype) -> list[Tensor]:
        return [p.detach().to(dtype) for p in self.params]

    def _head_logits(self, h: Tensor, params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        params = [p.to(dtype) for p in params]
        if self.linear:
            z = h @ params[0].T
            return z + params[1] if len(params) > 1 else z
        return generic.head_logits(self.head, self.names, params, h, None)

    def _vocab(self, logits: Tensor | None, h: Tensor) -> int:
        if logits is not None:
            return logits.shape[-1]
        if self.linear:
            return self.params[0].shape[0]
        return self._head_logits(h[:1], self.params, h.dtype).shape[-1]

    def _logits(self, batch: Batch, sl: slice | Tensor) -> Tensor:
        """Logits ``[n, V]`` (compute dtype) of tokens ``sl`` of the batch; checked finite."""
        if batch.logits is not None:
            z = batch.logits[batch.seq[sl], batch.positions[sl] % batch.shape[1]]
            z = z.to(batch.h.dtype)
            # one reduction instead of an elementwise isfinite: any inf or nan reaches the sum
            if not torch.isfinite(z.sum(-1, dtype=torch.float64)).all():
                raise ValueError("logits: contains non-finite values at masked-in positions")
            return z
        return self._head_logits(batch.h[sl], self.params, batch.h.dtype)

    def _lse(self, batch: Batch, *, top: bool = False) -> Tensor:
        """log Σ exp φ(z) per token (the policy's normaliser); with ``top``, also stores in
        ``batch.top`` each token's action and its ``EXACT_ROWS`` largest other logits' rows.
        One pass over the logits, shared by every level of a selection."""
        if batch.lse is None or (top and batch.top is None):
            lse, best = [], []
            for sl in _chunks(batch.n, max(1, CHUNK_ELEMENTS // batch.vocab)):
                z = self._logits(batch, sl)
                if top:
                    best.append(
                        _with_action(torch.topk(z, EXACT_ROWS + 1, -1).indices, batch.actions[sl])
                    )
                lse.append(torch.logsumexp(self.transform(z), -1))
            empty = torch.zeros(0, dtype=torch.long, device=batch.h.device)
            batch.lse = torch.cat(lse) if lse else batch.h.new_zeros(0)
            if top:
                batch.top = torch.cat(best) if best else empty.reshape(0, EXACT_ROWS + 1)
        return batch.lse

    def _token_terms(
        self, batch: Batch, tokens: Tensor, weights: Tensor, steps: list[StepModel]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token candidates: each token's own update, evaluated on that token.

        ``steps`` are the exact step models. With ``direction`` ``"frozen"``/``"shadow"`` and an
        Adam-type step, the update is the frozen model on every row of the token's support, with
        the exact step restored on its action row and its ``EXACT_ROWS`` most probable rows, where
        the token's own gradient can dominate Adam's second moment.
        """
        if not self.linear:
            vu, ufu, vr = generic.token_moments(self, batch, tokens, steps)
            return candidate_terms(weights, batch.adv[tokens], vu, ufu, vr, self.fisher)
        approx = steps
        support = batch.vocab if self.top_k is None else self.top_k
        if (
            self.direction != "exact"
            and isinstance(steps[0], AdamStep)
            and support > EXACT_ROWS + 1
        ):
            approx = self._steps(batch.h.dtype, frozen=True)
        if self.top_k is None:
            m = self._token_moments_full(batch, tokens, weights, steps, approx)
        else:
            m = self._token_moments_topk(batch, tokens, weights, steps, approx)
        return candidate_terms(weights, batch.adv[tokens], m.vu, m.ufu, m.vr, self.fisher)

    def _token_moments_full(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        steps: list[StepModel],
        approx: list[StepModel],
    ) -> LogitMoments:
        """Full vocabulary, by blocks of head rows: each block's step coefficients are computed
        once for all tokens, so nothing ``[V, H]``-sized is ever materialised."""
        dtype, device, width = batch.h.dtype, batch.h.device, batch.h.shape[1]
        h, acts = batch.h[tokens], batch.actions[tokens]
        coef = batch.adv[tokens] * weights
        lse = self._lse(batch, top=approx is not steps)[tokens]
        m = LogitMoments(tokens.numel(), dtype, device)
        fix_rows = fix = None
        if approx is not steps:
            fix_rows = batch.top[tokens]
            fix = torch.empty(fix_rows.shape, dtype=dtype, device=device)
            for sl in _chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // (width * EXACT_ROWS))):
                rows = fix_rows[sl]
                z = self._gathered_logits(batch, tokens[sl], rows)
                probs = (self.transform(z) - lse[sl].unsqueeze(1)).exp()
                v = (rows == acts[sl].unsqueeze(1)).to(dtype) - probs
                grad = v * self.transform.derivatives(z)[0]
                fix[sl] = _token_logit_change(h[sl], coef[sl], grad, steps, rows)
                fix[sl] -= _token_logit_change(h[sl], coef[sl], grad, approx, rows)
        block = max(1, CHUNK_ELEMENTS // width)
        fused = not isinstance(approx[0], AdamStep)
        for r0 in range(0, batch.vocab, block):
            r1 = min(r0 + block, batch.vocab)
            parts = [restrict(step, slice(r0, r1)) for step in approx]
            for sl in _chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // (r1 - r0))):
                z = self._block_logits(batch, tokens[sl], r0, r1)
                local = torch.where((acts[sl] >= r0) & (acts[sl] < r1), acts[sl] - r0, -1)
                fix_at = fix_val = None
                if fix is not None:
                    inside = (fix_rows[sl] >= r0) & (fix_rows[sl] < r1)
                    fix_at = (fix_rows[sl] - r0).clamp(0, r1 - r0 - 1)
                    fix_val = torch.where(inside, fix[sl], 0)
                if fused:
                    g, dh, reach = _weight_terms(parts[0], h[sl])
                    b = _bias_terms(parts[1]) if len(parts) > 1 else (None, 0.0, None, None)
                    t = self.transform
                    stats = kernels.call(
                        _block_stats, z.numel(), z, lse[sl], coef[sl], local, g, dh, reach,
                        _kind(parts[0].step), *b, fix_at, fix_val,
                        t.scale, t.softcap, t.temperature,
                    )  # fmt: skip
                else:
                    stats = _block_stats_eager(
                        z, lse[sl], coef[sl], local, h[sl], parts, fix_at, fix_val, self.transform
                    )
                m.merge(*stats, index=sl)
        return m

    def _token_moments_topk(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        steps: list[StepModel],
        approx: list[StepModel],
    ) -> LogitMoments:
        """Top-K: each token's own K rows, gathered (``[n, K, H]`` per chunk)."""
        dtype, device = batch.h.dtype, batch.h.device
        m = LogitMoments(tokens.numel(), dtype, device)
        width = self.top_k * batch.h.shape[1]
        for sl in _chunks(tokens.numel(), max(1, CHUNK_ELEMENTS // width)):
            tok = tokens[sl]
            h, coef = batch.h[tok], batch.adv[tok] * weights[sl]
            probs, v, rows, d1, d2 = self._support(batch, tok)
            grad = v * d1  # ∂ log π(a) / ∂z: the token's gradient is −c·grad·hᵀ on the weight
            u = _token_logit_change(h, coef, grad, approx, rows)
            if approx is not steps:
                # the action (the one positive entry of v) and the most probable rows
                score = torch.where(v > 0, torch.full_like(probs, 2.0), probs)
                pos = torch.topk(score, EXACT_ROWS + 1, -1).indices
                exact_rows = rows.gather(1, pos)
                gc = grad.gather(1, pos)
                fix = _token_logit_change(h, coef, gc, steps, exact_rows)
                fix = fix - _token_logit_change(h, coef, gc, approx, exact_rows)
                u = u.scatter_add(1, pos, fix)
            m.add(u * d1, probs, v, None if d2 is None else d2 * u.square(), index=sl)
        return m

    def _support(
        self, batch: Batch, tok: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | float, Tensor | None]:
        """(π, v = e_a − π, rows, φ'(z), φ''(z)) over each token's support: all V rows, or its
        top-K rows (``rows [n, K]``); φ'' is None for a linear logit transform."""
        if self.top_k is None:
            z = self._logits(batch, tok)
            probs = torch.softmax(self.transform(z), -1)
            v = -probs
            v[torch.arange(tok.numel(), device=v.device), batch.actions[tok]] += 1
            return probs, v, None, *self.transform.derivatives(z)
        rows, z = batch.topk_idx[tok], batch.topk_logits[tok]
        probs = torch.softmax(self.transform(z), -1)
        v = (rows == batch.actions[tok].unsqueeze(1)).to(probs.dtype) - probs
        return probs, v, rows, *self.transform.derivatives(z)

    def _subset_terms(
        self,
        batch: Batch,
        tokens: Tensor,
        weights: Tensor,
        steps: list[StepModel],
        group: torch.distributed.ProcessGroup | str | None = distributed.LOCAL,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One candidate made of ``tokens``: form its ΔW by row blocks, evaluate it on them.

        With a ``group`` other than ``LOCAL``, the candidate is the union of every rank's
        ``tokens``: its gradient is summed over the group (a collective), and the terms returned
        are this rank's share.
        """
        if not self.linear:
            vu, ufu, vr = generic.subset_moments(self, batch, tokens, weights, steps, group)
            return candidate_terms(weights, batch.adv[tokens], vu, ufu, vr, self.fisher)
        h = batch.h[tokens]
        coef = batch.adv[tokens] * weights
        m = LogitMoments(tokens.numel(), h.dtype, h.device)
        for rows, probs, v, d1, d2 in self._row_blocks(batch, tokens, group):
            cv = v * d1 * coef.unsqueeze(1)
            grad_w = distributed.all_reduce_sum(cv.T @ h, group)
            delta_w = steps[0](-grad_w, rows)
            u = h @ delta_w.T
            if len(steps) > 1:
                u = u + steps[1](-distributed.all_reduce_sum(cv.sum(0), group), rows)
            m.add(u * d1, probs, v, None if d2 is None else d2 * u.square())
        return candidate_terms(weights, batch.adv[tokens], m.vu, m.ufu, m.vr, self.fisher)

    def _row_blocks(
        self, batch: Batch, tokens: Tensor, group: torch.distributed.ProcessGroup | str | None
    ) -> Iterator[tuple]:
        """Blocks of head rows with the tokens' (π, v, φ', φ'') on them, zero outside each
        token's support: ``(rows, probs [n, r], v [n, r], φ', φ'')``. With ``group`` the blocks
        are the same on every rank (sized by the group's token count, over the union of rows)."""
        width = batch.h.shape[1]
        n = int(
            distributed.all_reduce_sum(torch.tensor(tokens.numel(), device=tokens.device), group)
        )
        step = max(1, CHUNK_ELEMENTS // max(n, width))
        n = tokens.numel()
        if self.top_k is None:
            lse = self._lse(batch)[tokens]
            acts = batch.actions[tokens]
            for r0 in range(0, batch.vocab, step):
                r1 = min(r0 + step, batch.vocab)
                z = self._block_logits(batch, tokens, r0, r1)
                probs = (self.transform(z) - lse.unsqueeze(1)).exp()
                v = -probs
                hit = (acts >= r0) & (acts < r1)
                v[hit.nonzero().squeeze(1), acts[hit] - r0] += 1
                yield slice(r0, r1), probs, v, *self.transform.derivatives(z)
            return
        idx = batch.topk_idx[tokens]
        rows = distributed.union(idx.flatten(), group)
        pos = torch.searchsorted(rows, idx)
        on_support = self._support(batch, tokens)
        for p0 in range(0, rows.numel(), step):
            p1 = min(p0 + step, rows.numel())
            inside = (pos >= p0) & (pos < p1)
            at = (pos - p0).clamp(0, p1 - p0 - 1)
            zero = torch.zeros(n, p1 - p0, dtype=batch.h.dtype, device=batch.h.device)
            yield (
                rows[p0:p1],
                *(_scatter(zero, at, inside, x) for x in on_support[:2]),
                *(_scatter(zero, at, inside, x) for x in on_support[3:]),
            )

    def _gathered_logits(self, batch: Batch, tokens: Tensor, rows: Tensor) -> Tensor:
        """Raw logits ``[n, E]`` of each token at its own head rows ``rows [n, E]``."""
        if batch.logits is not None:
            b, t = batch.seq[tokens], batch.positions[tokens] % batch.shape[1]
            return batch.logits[b.unsqueeze(1), t.unsqueeze(1), rows].to(batch.h.dtype)
        w = self.params[0].detach()[rows].to(batch.h.dtype)
        z = torch.bmm(w, batch.h[tokens].unsqueeze(2)).squeeze(2)
        if len(self.params) > 1:
            z = z + self.params[1].detach()[rows].to(batch.h.dtype)
        return z

    def _block_logits(self, batch: Batch, tokens: Tensor, r0: int, r1: int) -> Tensor:
        if batch.logits is not None:
            b, t = batch.seq[tokens], batch.positions[tokens] % batch.shape[1]
            return batch.logits[b, t, r0:r1].to(batch.h.dtype)
        w = self.params[0][r0:r1].detach().to(batch.h.dtype)
        z = batch.h[tokens] @ w.T
        if len(self.params) > 1:
            z = z + self.params[1][r0:r1].detach().to(batch.h.dtype)
        return z


def _scatter(zero: Tensor, at: Tensor, inside: Tensor, x: Tensor | float | None) -> Any:
    """Per-token support values ``x [n, K]`` placed at block columns ``at`` (0 outside)."""
    if not isinstance(x, Tensor):
        return x
    return zero.scatter_add(1, at, torch.where(inside, x, 0))


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _weight_terms(w: Restricted, h: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """For a block of weight rows: the per-row factor g of the candidate's share (``P (h ⊙ h)``,
    ``P‖h‖²`` or ``κ‖h‖₁``), the drift's logit change ``D h`` and the saturation reach."""
    if isinstance(w.step, FrozenAdamStep):
        g = (h * h) @ w.coef.T
        reach = w.step.limit * h.abs().sum(1, keepdim=True)
    elif isinstance(w.step, SignStep):
        g, reach = w.coef * h.abs().sum(1, keepdim=True), None
    else:
        g, reach = w.coef * (h * h).sum(1, keepdim=True), None
    dh = None if w.drift is None else h @ w.drift.T
    return g, dh, reach


def _kind(step: StepModel) -> str:
    return {AffineStep: "affine", FrozenAdamStep: "frozen", SignStep: "sign"}[type(step)]


def _bias_terms(b: Restricted) -> tuple[str, float | Tensor, Tensor | None, float | None]:
    """(kind, coefficient, drift, limit) of a bias step on a block, as plain values."""
    limit = b.step.limit if isinstance(b.step, FrozenAdamStep) else None
    return _kind(b.step), b.coef, b.drift, limit


def _block_stats(
    z: Tensor,
    lse: Tensor,
    coef: Tensor,
    action: Tensor,
    g: Tensor,
    dh: Tensor | None,
    reach: Tensor | None,
    kind: str,
    bias_kind: str | None,
    bias_coef: float | Tensor,
    bias_drift: Tensor | None,
    bias_limit: float | None,
    fix_at: Tensor | None,
    fix_val: Tensor | None,
    scale: float,
    softcap: float | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block of head rows for n tokens, elementwise after the products (fusable: plain
    tensors and numbers only, so ``torch.compile`` sees one graph for every block).

    ``z [n, R]`` raw logits, ``lse [n]`` the policy's normaliser, ``coef [n]`` c_t, ``action [n]``
    the action's column in the block or −1; ``g``, ``dh``, ``reach`` from :func:`_weight_terms`
    for a step of ``kind``; the bias step's terms; ``fix`` adds exact-step corrections at columns
    ``fix_at``; the logit transform φ by its three numbers. Returns the block's
    ``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token, u the policy logits' change.
    """
    transform = LogitTransform(scale, softcap, temperature)
    probs = torch.exp(transform(z) - lse.unsqueeze(1))
    d1, d2 = transform.derivatives(z)
    columns = torch.arange(z.shape[1], device=z.device)
    hot = (columns == action.unsqueeze(1)).to(z.dtype)
    cv = (probs - hot) * coef.unsqueeze(1)
    if not transform.identity:
        cv = cv * d1
    u = _saturate(kind, cv, cv * g, g, reach)
    if dh is not None:
        u = u + dh
    if bias_kind is not None:
        u = u + _saturate(bias_kind, cv, cv * bias_coef, bias_coef, bias_limit)
        if bias_drift is not None:
            u = u + bias_drift
    if fix_at is not None:
        u = u.scatter_add(1, fix_at, fix_val)
    r = None
    if not transform.identity:
        r = None if d2 is None else d2 * u.square()
        u = u * d1
    v = hot - probs
    return _row_moments(v, u, r, probs)


def _change_stats(
    z: Tensor,
    u: Tensor,
    r: Tensor | None,
    action: Tensor,
    scale: float,
    softcap: float | None,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Moments of a given raw-logit change, elementwise (fusable like :func:`_block_stats`).

    ``z [n, V]`` raw logits, ``u [n, V]`` their first and ``r [n, V]`` (or None) their second
    directional derivative, ``action [n]``; the logit transform φ by its three numbers. The
    policy's logits φ(z) change by ``φ'u`` at first and ``φ'r + φ''u²`` at second order. Returns
    ``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token for the policy's logits.
    """
    transform = LogitTransform(scale, softcap, temperature)
    y = transform(z)
    probs = torch.exp(y - torch.logsumexp(y, 1, keepdim=True))
    d1, d2 = transform.derivatives(z)
    if r is not None:
        r = r * d1
    if d2 is not None:
        r = d2 * u.square() if r is None else r + d2 * u.square()
    if not transform.identity:
        u = u * d1
    columns = torch.arange(z.shape[1], device=z.device)
    v = (columns == action.unsqueeze(1)).to(z.dtype) - probs
    return _row_moments(v, u, r, probs)


def _row_moments(
    v: Tensor, u: Tensor, r: Tensor | None, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(v·u, v·r, Σπ, mean_π u, Σπ(u − mean)²)`` per token of ``[n, R]`` rows, elementwise and
    row sums only (so that ``torch.compile`` fuses it into its caller)."""
    vu = (v * u).sum(1)
    vr = torch.zeros_like(vu) if r is None else (v * r).sum(1)
    w = probs.sum(1)
    mean = (probs * u).sum(1) / torch.where(w > 0, w, torch.ones_like(w))
    m2 = (probs * (u - mean.unsqueeze(1)).square()).sum(1)
    return vu, vr, w, mean, m2


def _saturate(
    kind: str, cv: Tensor, x: Tensor, scale: float | Tensor, reach: float | Tensor | None
) -> Tensor:
    """The candidate's share of a row's change: ``x`` (affine), saturated ``x`` (frozen Adam,
    ``x / √(1 + (x / reach)²)``) or ``sign(cv)·scale`` (Adam's first step)."""
    if kind == "frozen":
        return x / torch.sqrt(1 + (x / reach).square())
    if kind == "sign":
        return torch.sign(cv) * scale
    return x


def _block_stats_eager(
    z: Tensor,
    lse: Tensor,
    coef: Tensor,
    action: Tensor,
    h: Tensor,
    parts: list[Restricted],
    fix_at: Tensor | None,
    fix_val: Tensor | None,
    transform: LogitTransform,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_block_stats` for Adam's exact step, whose weight part is elementwise in H."""
    probs = torch.exp(transform(z) - lse.unsqueeze(1))
    d1, d2 = transform.derivatives(z)
    hot = (torch.arange(z.shape[1], device=z.device) == action.unsqueeze(1)).to(z.dtype)
    v = hot - probs
    u = _token_logit_change(h, coef, v * d1, parts, None)
    if fix_at is not None:
        u = u.scatter_add(1, fix_at, fix_val)
    r = None if d2 is None else d2 * u.square()
    return LogitMoments.block(u * d1, probs, v, r)


def _with_action(best: Tensor, actions: Tensor) -> Tensor:
    """``best [n, E]`` indices with each token's action put in place of its last entry when it is
    not already among them."""
    missing = ~(best == actions.unsqueeze(1)).any(1)
    best[missing, -1] = actions[missing]
    return best


def _rows_dot(m: Tensor, x: Tensor) -> Tensor:
    """``y[t, j] = m_t[j] · x[t]``: ``x @ mᵀ`` for rows shared by all tokens (``m [R, H]``), a
    batched product for gathered rows (``m [n, K, H]``)."""
    if m.dim() == 2:
        return x @ m.T
    return torch.bmm(m, x.unsqueeze(2)).squeeze(2)


def _token_logit_change(
    h: Tensor,
    coef: Tensor,
    grad: Tensor,
    weight: list[StepModel] | list[Restricted] | Restricted,
    rows: Tensor | None,
) -> Tensor:
    """Logit change ``u_t`` of each token's own candidate update, on its support rows.

    Token t's loss gradient on the weight is rank one, ``q_t = −c_t g_t h_tᵀ`` (bias:
    ``−c_t g_t``), with ``c_t = w_t A_t`` and ``g_t = ∂ log π(a_t) / ∂z_t``. For an affine step
    ``Δ = P·q + D`` this gives ``u_t = D h_t − c_t g_t P‖h_t‖²``; for a frozen Adam step
    ``x_t = −c_t g_t ⊙ (P (h_t ⊙ h_t))`` saturated as ``x / √(1 + (x / (limit·‖h_t‖₁))²)``, which
    equals its elementwise saturation when the candidate-to-second-moment ratio is the same
    across the row and has the same limits, plus ``D h_t``; for a sign step
    ``u_t = D h_t + κ·sign(−c_t g_t)‖h_t‖₁``. Adam's exact step is evaluated elementwise.

    ``weight`` is ``[weight step, bias step]`` (or just the weight's), either as step models with
    ``rows`` (None: all V rows; or ``[n, K]`` per-token rows) or already restricted to the rows.
    Shapes: ``h [n, H]``, ``coef [n]``, ``grad [n, R]``.
    """
    parts = [restrict(s, rows) if not isinstance(s, Restricted) else s for s in weight]
    w = parts[0]
    cv = grad * (-coef).unsqueeze(1)
    if isinstance(w.step, AffineStep):
        u = cv * (w.coef * (h * h).sum(1, keepdim=True))
    elif isinstance(w.step, FrozenAdamStep):
        x = _rows_dot(w.coef, h * h).mul_(cv)
        t = x / (w.step.limit * h.abs().sum(1, keepdim=True))
        u = x.div_(t.square_().add_(1).sqrt_())
    elif isinstance(w.step, SignStep):
        u = torch.sign(cv).mul_(w.coef * h.abs().sum(1, keepdim=True))
    else:
        u = _adam_token_change(w.step, h, cv, w.rows)
    if w.drift is not None:
        u = u.addmm_(h, w.drift.T) if w.drift.dim() == 2 else u.add_(_rows_dot(w.drift, h))
    if len(parts) > 1:
        u = u.add_(parts[1](cv))
    return u


def _adam_token_change(step: AdamStep, h: Tensor, cv: Tensor, rows: Rows) -> Tensor:
    """Adam's exact per-token step on rows, as few passes as eager PyTorch allows.

    With the rank-one loss gradient ``q = cv ⊗ h`` (plus λ·p with L2 decay), in blocks of rows::

        u_j = −lr/(1-β1^k)·√(1-β2^k) · Σ_c m'_jc h_c / (√v'_jc + ε√(1-β2^k))  − [dec.] lr·λ·p_j·h

    which is :class:`~curvopt.directions.AdamStep` summed against h, rearranged so the gathered
    moments are updated in place.
    """
    n, width = cv.shape
    out = torch.empty_like(cv)
    block = max(1, CHUNK_ELEMENTS // max(1, n * h.shape[1]))
    k = step.step + 1
    root = math.sqrt(1 - step.beta2**k)
    decoupled = step.weight_decay and step.decoupled
    for c0 in range(0, width, block):
        c1 = min(c0 + block, width)
        sel = _column_rows(rows, c0, c1)
        if isinstance(sel, Tensor):  # gathered rows: one fusable function reads the state
            out[:, c0:c1] = kernels.call(
                _adam_gathered, sel.numel() * h.shape[1], step.exp_avg, step.exp_avg_sq,
                step.max_exp_avg_sq, step.param, sel, cv[:, c0:c1], h, step.beta1, step.beta2,
                step.eps * root, -step.step_size * root,
                0.0 if decoupled else step.weight_decay,
                step.lr * step.weight_decay if decoupled else 0.0,
            )  # fmt: skip
            continue
        q = cv[:, c0:c1].unsqueeze(2) * h.unsqueeze(1)
        if step.weight_decay and not step.decoupled:
            q.add_(step._read(step.param, sel), alpha=step.weight_decay)
        if step.exp_avg is None:
            v = q.square().mul_(1 - step.beta2)
            m = q.mul_(1 - step.beta1)
        else:
            # out of place: the state read may be a view of the optimizer's own tensors
            v = torch.addcmul(
                step._read(step.exp_avg_sq, sel) * step.beta2, q, q, value=1 - step.beta2
            )
            m = torch.lerp(step._read(step.exp_avg, sel), q, 1 - step.beta1)
        if step.max_exp_avg_sq is not None:
            v = torch.maximum(v, step._read(step.max_exp_avg_sq, sel))
        m.div_(v.sqrt_().add_(step.eps * root))
        u = torch.bmm(m, h.unsqueeze(2)).squeeze(2).mul_(-step.step_size * root)
        if decoupled:
            u.sub_(_rows_dot(step._read(step.param, sel), h), alpha=step.lr * step.weight_decay)
        out[:, c0:c1] = u
    return out


def _adam_gathered(
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    param: Tensor,
    rows: Tensor,
    cv: Tensor,
    h: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: float,
    l2: float,
    decay: float,
) -> Tensor:
    """``u [n, K]`` of Adam's exact per-token step on each token's rows ``[n, K]`` (see
    :func:`_adam_token_change`; ``eps`` and ``scale`` already carry √(1-β2^k)). Plain tensors
    and numbers, so that compiled it reads the state rows once, without materialising them."""
    dtype = h.dtype
    q = cv.unsqueeze(2) * h.unsqueeze(1)
    p = param[rows].to(dtype) if (l2 or decay) else None
    if l2:
        q = q + l2 * p
    if exp_avg is None:
        m, v = (1 - beta1) * q, (1 - beta2) * q * q
    else:
        m = beta1 * exp_avg[rows].to(dtype) + (1 - beta1) * q
        v = beta2 * exp_avg_sq[rows].to(dtype) + (1 - beta2) * q * q
    if max_exp_avg_sq is not None:
        v = torch.maximum(v, max_exp_avg_sq[rows].to(dtype))
    u = (m / (v.sqrt() + eps) * h.unsqueeze(1)).sum(2) * scale
    if decay:
        u = u - decay * (p * h.unsqueeze(1)).sum(2)
    return u


def _column_rows(rows: Rows, c0: int, c1: int) -> Rows:
    """The head rows of support columns ``c0:c1`` (``rows``: None = all, a slice, or [n, K])."""
    if rows is None:
        return slice(c0, c1)
    if isinstance(rows, slice):
        return slice(rows.start + c0, rows.start + c1)
    return rows[:, c0:c1]


def _elementwise_token_change(step: StepModel, h: Tensor, cv: Tensor, rows: Rows) -> Tensor:
    """Σ_c Δ_{t,j,c} h_{t,c} with Δ = step(q_t) formed elementwise, in blocks of rows (any step
    model; the only way for Adam's exact step, and the oracle of the closed forms).

    ``rows``: None (the columns of ``cv`` are all head rows), a slice of head rows, or ``[n, K]``.
    """
    n, width = cv.shape
    out = torch.empty_like(cv)
    block = max(1, CHUNK_ELEMENTS // max(1, n * h.shape[1]))
    for c0 in range(0, width, block):
        c1 = min(c0 + block, width)
        q = cv[:, c0:c1].unsqueeze(2) * h.unsqueeze(1)
        out[:, c0:c1] = (step(q, _column_rows(rows, c0, c1)) * h.unsqueeze(1)).sum(2)
    return out


def _validate(
    hidden: Tensor | None,
    actions: Tensor,
    advantages: Tensor,
    mask: Tensor,
    logits: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Check shapes, dtypes, devices and finiteness; return the mask as bool. ``hidden`` may be
    None (whole-model tracking), and then ``actions`` sets B and T."""
    for name, t in (
        ("hidden", hidden),
        ("actions", actions),
        ("advantages", advantages),
        ("mask", mask),
    ):
        if not isinstance(t, Tensor) and not (name == "hidden" and t is None):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if logits is not None and not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor or None, got {type(logits).__name__}")
    if hidden is not None:
        if not hidden.is_floating_point():
            raise TypeError(f"hidden: expected a floating-point tensor, got {hidden.dtype}")
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected shape [B, T, H], got {tuple(hidden.shape)}")
    if actions.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"actions: expected an integer tensor, got {actions.dtype}")
    if hidden is not None and tuple(actions.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"actions: expected shape {tuple(hidden.shape[:2])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(actions.shape)}"
        )
    if actions.dim() != 2:
        raise ValueError(f"actions: expected shape [B, T], got {tuple(actions.shape)}")
    B, T = actions.shape
    if not advantages.is_floating_point():
        raise TypeError(f"advantages: expected a floating-point tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages: expected shape {(B,)} or {(B, T)}, got {tuple(advantages.shape)}"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask: expected a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)}, got {tuple(mask.shape)}")
    if logits is not None:
        if not logits.is_floating_point():
            raise TypeError(f"logits: expected a floating-point tensor, got {logits.dtype}")
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
            raise ValueError(f"logits: expected shape [{B}, {T}, V], got {tuple(logits.shape)}")
    for name, t in (
        ("hidden", hidden),
        ("actions", actions),
        ("advantages", advantages),
        ("mask", mask),
        ("logits", logits),
    ):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: is on {t.device}, but the head is on {device}")
    if hidden is not None and not torch.isfinite(hidden).all():
        raise ValueError("hidden: contains non-finite values")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages: contains non-finite values")
    return mask.bool()
