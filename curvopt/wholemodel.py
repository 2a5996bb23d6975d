"""Beyond the last layer: the quadratic model over any set of a model's parameters (torch.func).

The caller describes the policy by a ``forward`` callable: given the model, it returns the raw
logits ``[B, T, V]`` of the completion tokens (e.g. ``lambda m: m(ids, attention_mask=am).logits
[:, P - 1 : -1]``). Parameters are swapped in with ``torch.func.functional_call``, so the same
callable serves the current parameters, perturbed ones and dual (forward-mode) tensors.

Two uses:

- :func:`step_logit_change`: the update Δθ the optimizer is about to take (from its state and the
  current ``.grad``), and the logit change it causes, ``u_t = J_t Δθ`` for every token in one
  forward-mode pass (a second, nested pass gives ``r_t = Δθᵀ∇²z_t Δθ``).
- :func:`candidate_moments`: the paper's per-token, per-sequence or batch candidates over the
  tracked parameters, exactly: per-token gradients (``jacrev``), each candidate's update through the
  optimizer's step model, then ``jvp``. It materialises a parameter-sized tensor per token: for
  small models and as the oracle of the cheap paths.

Forward-mode AD must be implemented for the model's kernels (with transformers, build the model
with ``attn_implementation="eager"``). Nested ``jvp`` runs with autograd enabled, which some
kernels (e.g. ``silu``) need for their second forward derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from . import kernels
from .directions import AdamStep, StepModel, adam_delta
from .quadratic import LogitMoments

if TYPE_CHECKING:
    from .tracker import CurvatureTracker

__all__ = ["Forward", "candidate_moments", "resolve_params", "step_logit_change"]

Forward = Callable[[nn.Module], Tensor]

# Candidates per vmapped forward-mode pass.
VMAP_CHUNK = 8


class _Call(nn.Module):
    """``forward(model)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
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
    model: nn.Module, names: Sequence[str], forward: Forward
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
    forward: Forward,
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


def planned_update(
    steps: Sequence[StepModel], params: Sequence[Tensor], optimizer: torch.optim.Optimizer
) -> list[Tensor]:
    """Δθ the optimizer is about to take: its step model applied to each ``.grad`` (negated where
    the group maximizes, as torch does). A parameter without a gradient is not stepped by torch
    optimizers, so its Δ is 0."""
    maximize = {
        id(p): bool(g.get("maximize", False)) for g in optimizer.param_groups for p in g["params"]
    }
    out = []
    for step, p in zip(steps, params):
        if p.grad is None:
            out.append(torch.zeros_like(p, dtype=step.dtype))
            continue
        g = p.grad.detach().to(step.dtype)
        g = -g if maximize.get(id(p), False) else g
        if isinstance(step, AdamStep):  # a whole parameter, elementwise: fused when large
            tensors = (step.param, step.exp_avg, step.exp_avg_sq, step.max_exp_avg_sq)
            state = [step._read(t, None) for t in tensors]
            hyper = (step.lr, step.beta1, step.beta2, step.eps, step.weight_decay)
            hyper += (step.decoupled, step.step)
            out.append(kernels.call(adam_delta, g.numel(), g, *state, *hyper))
        else:
            out.append(step(g))
    return out


def candidate_moments(
    tracker: CurvatureTracker,
    forward: Forward,
    actions: Tensor,
    advantages: Tensor,
    candidates: Sequence[tuple[Tensor, Tensor]],
    steps: Sequence[StepModel],
    dtype: torch.dtype,
) -> list[LogitMoments]:
    """Exact moments of each candidate over the tracked parameters.

    ``candidates``: per candidate, the flat indices ``[n]`` into ``[B*T]`` of its tokens and their
    weights ``[n]``. ``advantages`` is ``[B, T]``. Returns, per candidate, the moments (``v·u``,
    ``uᵀFu``, ``v·r``) of its tokens under its own update.
    """
    if not candidates:
        return []
    logits = _logits_fn(tracker.model, tracker.names, forward)
    params = tuple(p.detach().to(dtype) for p in tracker.params)
    transform = tracker.transform
    flat_actions = actions.reshape(-1)

    def log_probs(p: tuple[Tensor, ...]) -> Tensor:
        z = transform(logits(p))
        lp = torch.log_softmax(z.reshape(-1, z.shape[-1]), -1)
        return lp.gather(1, flat_actions.unsqueeze(1)).squeeze(1)

    with torch.enable_grad():
        per_token = jacrev(log_probs)(params)  # [B*T, *shape] per parameter
    coef = advantages.reshape(-1).to(dtype)
    deltas = []
    for tokens, weights in candidates:
        c = coef[tokens] * weights.to(dtype)
        # ∇f_S = Σ_t w_t A_t ∇ log π_t
        grads = [torch.tensordot(c, g[tokens], dims=([0], [0])) for g in per_token]
        deltas.append(tuple(step(-g) for step, g in zip(steps, grads)))

    def change(delta: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        def tangent(p: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
            return jvp(logits, (p,), (delta,))

        (z, u), (_, r) = jvp(tangent, (params,), (delta,))
        return z, u, r

    stacked = [torch.stack(parts) for parts in zip(*deltas)]
    with torch.enable_grad():
        z, u, r = vmap(change, chunk_size=VMAP_CHUNK)(tuple(stacked))
    out = []
    for i, (tokens, _) in enumerate(candidates):
        zi = z[i].reshape(-1, z.shape[-1])[tokens].detach()
        ui = u[i].reshape(-1, u.shape[-1])[tokens].detach()
        ri = r[i].reshape(-1, r.shape[-1])[tokens].detach()
        d1, d2 = transform.derivatives(zi)
        probs = torch.softmax(transform(zi), -1)
        v = -probs
        v[torch.arange(tokens.numel()), flat_actions[tokens]] += 1
        # logits of the policy: φ(z); their first and second directional derivatives
        rt = ri * d1 if d2 is None else ri * d1 + d2 * ui.square()
        m = LogitMoments(tokens.numel(), dtype, zi.device)
        m.add(ui * d1, probs, v, rt)
        out.append(m)
    return out
