"""Beyond the last layer: the quadratic model over any set of a model's parameters (torch.func).

The caller describes the policy by a ``forward`` callable: given the model, it returns the raw
logits ``[B, T, V]`` of the completion tokens (e.g. ``lambda m: m(ids, attention_mask=am).logits
[:, P - 1 : -1]``). Parameters are swapped in with ``torch.func.functional_call``, so the same
callable serves the current parameters, perturbed ones and dual (forward-mode) tensors.

Two uses:

- :func:`step_logit_change`: the logit change that the update Δθ the optimizer is about to take
  causes, ``u_t = J_t Δθ`` for every token in one forward-mode pass (a second, nested pass gives
  ``r_t = Δθᵀ∇²z_t Δθ``).
- :class:`WholeModel`: the paper's per-token, per-sequence or batch candidates over the tracked
  parameters, exactly: per-token gradients (``jacrev``), each candidate's update through the
  optimizer's update rule, then ``jvp``. It materialises a parameter-sized tensor per token: for
  small models and as the oracle of the cheap paths.

Forward-mode AD must be implemented for the model's kernels (with transformers, build the model
with ``attn_implementation="eager"``). Nested ``jvp`` runs with autograd enabled, which some
kernels (e.g. ``silu``) need for their second forward derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ..inputs import Batch, Forward, Inputs, LogitsForward
from ..optimizers.rules import UpdateRule
from ..policy import LogitTransform
from ..quadratic import LogitMoments, Moments, action_residual
from .base import Candidate, Change, Group, Head, StepChange, jvp, kl_of_change

__all__ = ["CANDIDATES_PER_VMAP", "WholeModel", "resolve_params", "step_logit_change"]

# Candidates per vmapped forward-mode pass: each holds a parameter-sized update.
CANDIDATES_PER_VMAP = 8

Params = tuple[Tensor, ...]


class _Call(nn.Module):
    """``forward(model)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: LogitsForward) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self) -> Tensor:
        return self.fn(self.model)


def resolve_params(
    spec: str | Sequence[nn.Module | nn.Parameter], model: nn.Module
) -> tuple[list[str], list[nn.Parameter]]:
    """Names (as in ``model.named_parameters()``) and tensors of the tracked parameters.

    ``spec``: ``"all"`` (every trainable parameter of ``model``) or a sequence of modules and
    parameters of ``model`` (a module contributes all its trainable parameters).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if spec == "all":
        chosen = [p for p in model.parameters() if p.requires_grad]
    elif isinstance(spec, str):
        raise ValueError(
            f"params: expected 'head', 'all' or a list of modules/parameters, got {spec!r}"
        )
    else:
        chosen = []
        for item in spec:
            if isinstance(item, nn.Module):
                chosen.extend(p for p in item.parameters() if p.requires_grad)
            elif isinstance(item, Tensor):
                chosen.append(item)
            else:
                raise TypeError(
                    f"params: expected modules or parameters, got {type(item).__name__}"
                )
    seen, out_names, out = set(), [], []
    for p in chosen:
        if id(p) in seen:
            continue
        if id(p) not in names:
            raise ValueError("params: a tracked parameter is not a parameter of model")
        seen.add(id(p))
        out_names.append(names[id(p)])
        out.append(p)
    if not out:
        raise ValueError("params: selects no trainable parameter")
    return out_names, out


def _logits_fn(
    model: nn.Module, names: Sequence[str], forward: LogitsForward
) -> Callable[[tuple[Tensor, ...]], Tensor]:
    call = _Call(model, forward)
    keys = ["model." + n for n in names]

    def logits(params: tuple[Tensor, ...]) -> Tensor:
        return functional_call(call, dict(zip(keys, params)), (), strict=False)

    return logits


def step_logit_change(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    forward: LogitsForward,
    *,
    curvature: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(z, u, r)``: the logits ``[B, T, V]``, their change ``J Δθ`` along ``deltas`` and, with
    ``curvature``, their second directional derivative ``Δθᵀ∇²z Δθ`` (else None)."""
    logits = _logits_fn(model, names, forward)
    primals = tuple(p.detach() for p in params)
    tangents = tuple(d.to(p.dtype) for d, p in zip(deltas, primals))
    with torch.enable_grad():
        if not curvature:
            z, u = jvp(logits, (primals,), (tangents,))
            return z.detach(), u.detach(), None

        def change(p: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
            return jvp(logits, (p,), (tangents,))

        (z, u), (_, r) = jvp(change, (primals,), (tangents,))
    return z.detach(), u.detach(), r.detach()


class WholeModel(Head):
    """Any set of a model's parameters, with the policy given by a ``forward`` callable."""

    reduces_over_groups = False

    def __init__(
        self, model: nn.Module, names: list[str], params: list[Tensor], transform: LogitTransform
    ) -> None:
        self.model = model
        self.names = names
        self.params = params
        self.transform = transform

    def _forward(self, inputs: Inputs) -> LogitsForward:
        if not callable(inputs.forward):
            raise TypeError(
                "forward: tracking params other than 'head' needs a callable mapping the "
                f"model to the completion logits [B, T, V], got {type(inputs.forward).__name__}"
            )
        return _logits_only(inputs.forward)

    def complete(self, inputs: Inputs) -> Inputs:
        forward = self._forward(inputs)
        if inputs.logits is None:
            return replace(inputs, logits=forward(self.model).detach())
        return inputs

    def vocab(self, logits: Tensor | None, h: Tensor) -> int:
        assert logits is not None  # complete() computed them
        return logits.shape[-1]

    def check(self, batch: Batch) -> None:
        assert batch.logits is not None
        if not torch.isfinite(batch.logits.sum(-1, dtype=torch.float64)[batch.mask]).all():
            raise ValueError("logits: the forward's logits are non-finite at masked-in positions")

    def step_change(
        self, inputs: Inputs, deltas: Sequence[Tensor], dtype: torch.dtype, curvature: bool
    ) -> StepChange:
        # the forward-mode pass also gives the logits: no separate forward for them
        z, u, r = step_logit_change(
            self.model, self.names, self.params, deltas, self._forward(inputs), curvature=curvature
        )

        def chunk(batch: Batch, sl: slice) -> Change:
            # the logits were checked finite once, when the batch was gathered
            return (
                batch.at(z, sl).to(dtype),
                batch.at(u, sl).to(dtype),
                None if r is None else batch.at(r, sl).to(dtype),
            )

        return StepChange(z, chunk)

    def realised_shift(
        self, hidden: Tensor, before: Sequence[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        raise ValueError("params: with whole-model tracking measure with kl_of_change")

    def snapshot(self, batches: Sequence[Inputs]) -> list[Tensor]:
        """Each batch's logits."""
        return [self._forward(b)(self.model).detach() for b in batches]

    def measure(
        self, inputs: Inputs, index: int, before: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        z0 = before[index][inputs.mask]
        z1 = self._forward(inputs)(self.model).detach()[inputs.mask]
        return kl_of_change(self.transform, z0, z1.to(z0.dtype) - z0)

    def token_moments(self, batch: Batch, tokens: Tensor, rules: list[UpdateRule]) -> Moments:
        ones = torch.ones_like(batch.adv[tokens])
        singletons = [(tokens[i : i + 1], ones[i : i + 1]) for i in range(tokens.numel())]
        moments = self._moments(batch, singletons, rules)
        if not moments:
            empty = batch.adv[tokens]
            return Moments(empty, empty, empty)
        return Moments(*(torch.cat(parts) for parts in zip(*moments)))

    def subset_moments(
        self,
        batch: Batch,
        candidates: Sequence[Candidate],
        rules: list[UpdateRule],
        group: Group,
    ) -> list[Moments]:
        return self._moments(batch, candidates, rules)

    def _moments(
        self, batch: Batch, candidates: Sequence[Candidate], rules: list[UpdateRule]
    ) -> list[Moments]:
        """Exact moments of each candidate over the tracked parameters: per candidate, the
        moments (``v·u``, ``uᵀFu``, ``v·r``) of its tokens under its own update."""
        if not candidates:
            return []
        assert batch.forward is not None
        B, T = batch.shape
        dtype, device = batch.h.dtype, batch.h.device
        tokens = torch.cat([c for c, _ in candidates])
        pos = batch.positions[tokens]
        flat_actions = torch.zeros(B * T, dtype=torch.long, device=device)
        flat_actions[pos] = batch.actions[tokens]
        coef = torch.zeros(B * T, dtype=dtype, device=device)
        coef[pos] = batch.adv[tokens]
        logits = _logits_fn(self.model, self.names, _logits_only(batch.forward))
        params = tuple(p.detach().to(dtype) for p in self.params)
        transform = self.transform

        def log_probs(p: Params) -> Tensor:
            z = transform(logits(p))
            lp = torch.log_softmax(z.reshape(-1, z.shape[-1]), -1)
            return lp.gather(1, flat_actions.unsqueeze(1)).squeeze(1)

        with torch.enable_grad():
            per_token = jacrev(log_probs)(params)  # [B*T, *shape] per parameter
        deltas = []
        for members, weights in candidates:
            at = batch.positions[members]
            c = coef[at] * weights.to(dtype)
            # ∇f_S = Σ_t w_t A_t ∇ log π_t
            grads = [torch.tensordot(c, g[at], dims=([0], [0])) for g in per_token]
            deltas.append(tuple(rule(-g) for rule, g in zip(rules, grads)))

        def change(delta: Params) -> tuple[Tensor, Tensor, Tensor]:
            def tangent(p: Params) -> tuple[Tensor, Tensor]:
                return jvp(logits, (p,), (delta,))

            (z, u), (_, r) = jvp(tangent, (params,), (delta,))
            return z, u, r

        stacked = [torch.stack(parts) for parts in zip(*deltas)]
        with torch.enable_grad():
            z, u, r = vmap(change, chunk_size=CANDIDATES_PER_VMAP)(tuple(stacked))
        out = []
        for i, (members, _) in enumerate(candidates):
            at = batch.positions[members]
            zi = z[i].reshape(-1, z.shape[-1])[at].detach()
            ui = u[i].reshape(-1, u.shape[-1])[at].detach()
            ri = r[i].reshape(-1, r.shape[-1])[at].detach()
            d1, d2 = transform.derivatives(zi)
            probs = torch.softmax(transform(zi), -1)
            v = action_residual(probs, flat_actions[at])
            # logits of the policy: φ(z); their first and second directional derivatives
            rt = ri * d1 if d2 is None else ri * d1 + d2 * ui.square()
            m = LogitMoments(members.numel(), dtype, zi.device)
            m.add(ui * d1, probs, v, rt)
            out.append(m.moments)
        return out


def _logits_only(forward: Forward) -> LogitsForward:
    """``forward``, required to return the logits themselves (forward-mode AD differentiates
    them; a :class:`~curvopt.inputs.HeadInput` is for the measured trust region)."""

    def logits(model: nn.Module) -> Tensor:
        out = forward(model)
        if not isinstance(out, Tensor):
            raise TypeError(
                "forward: tracking params other than 'head' differentiates the logits: it must "
                f"return the completion logits [B, T, V] (a Tensor), got {type(out).__name__}"
            )
        return out

    return logits
