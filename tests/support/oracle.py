"""The slow, obviously-right definition of every quantity, for tests.

Each candidate's update Δ is found by deep-copying the model together with the real optimizer and
stepping the copy on loss −f_S (+f_S for a maximizing optimizer); the quadratic terms come from
autograd and ``torch.func.jvp`` on the tracked parameters, never from logit-space formulas.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp


def candidates(mask: Tensor, level: str) -> list[tuple[list[tuple[int, int]], list[float]]]:
    """The candidate subsets of ``mask`` at ``level`` as (tokens, weights) pairs."""
    B, T = mask.shape
    seqs = [[(b, t) for t in range(T) if mask[b, t]] for b in range(B)]
    if level == "token":
        return [([bt], [1.0]) for s in seqs for bt in s]
    if level == "sequence":
        return [(s, [1.0 / len(s)] * len(s)) for s in seqs if s]
    nonempty = [s for s in seqs if s]
    tokens = [bt for s in nonempty for bt in s]
    weights = [1.0 / (len(nonempty) * len(s)) for s in nonempty for _ in s]
    return [(tokens, weights)] if tokens else []


def log_prob(z: Tensor, a: int, rows: Tensor | None) -> Tensor:
    """log π(a) under softmax(z), or the top-K log-likelihood over ``rows``
    (``z_a·1[a ∈ rows] − logsumexp(z[rows])``)."""
    if rows is None:
        return torch.log_softmax(z, -1)[a]
    inside = bool((rows == a).any())
    return (z[a] if inside else 0.0) - torch.logsumexp(z[rows], -1)


def oracle(head: nn.Module, optimizer, hidden: Tensor, *args, **kwargs) -> list[dict]:
    """:func:`oracle_model` for a head applied to ``hidden [B, T, H]``."""
    return oracle_model(head, optimizer, lambda m: m(hidden), *args, **kwargs)


def oracle_model(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    logits_of: Callable[[nn.Module], Tensor],
    actions: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    level: str,
    top_k: int | None = None,
    tracked: Sequence[str] | None = None,
) -> list[dict]:
    """For each candidate: tokens, first_order, second_order, empirical and true policy shift.

    ``logits_of(module)`` gives the logits ``[B, T, V]``; ``tracked`` names the parameters the
    quadratic model is over (default: every trainable parameter of ``model``).
    """
    B, T = mask.shape
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(B, T)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if tracked is not None:
        named = [(n, p) for n, p in named if n in tracked]
    names, params = [n for n, _ in named], [p for _, p in named]
    with torch.no_grad():
        logits = logits_of(model)
    rows = None if top_k is None else torch.topk(logits, top_k, dim=-1).indices

    def row(b: int, t: int) -> Tensor | None:
        return None if rows is None else rows[b, t]

    maximize = any(g.get("maximize", False) for g in optimizer.param_groups)
    out = []
    for tokens, weights in candidates(mask, level):

        def f(module: nn.Module, tokens=tokens, weights=weights) -> Tensor:
            z = logits_of(module)
            total = z.new_zeros(())
            for (b, t), w in zip(tokens, weights):
                total = total + w * adv[b, t] * log_prob(z[b, t], int(actions[b, t]), row(b, t))
            return total

        model_c, opt_c = copy.deepcopy((model, optimizer))
        before = dict((n, p.detach().clone()) for n, p in model_c.named_parameters())
        opt_c.zero_grad()
        (f(model_c) if maximize else -f(model_c)).backward()
        opt_c.step()
        after = dict(model_c.named_parameters())
        delta = [after[n].detach() - before[n] for n in names]

        value = f(model)
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        first = sum((g * d).sum() for g, d in zip(grads, delta))
        hvp = torch.autograd.grad(first, params, allow_unused=True)
        d_hess_d = sum((h * d).sum() for h, d in zip(hvp, delta) if h is not None)

        # logits_of must call the module it is given: swap the parameters inside a holder
        def swapped(*ps):
            holder = _Holder(model, logits_of)
            return functional_call(
                holder, {"m." + n: p for n, p in zip(names, ps)}, (), strict=False
            )

        detached = tuple(p.detach() for p in params)
        z0, dz = jvp(swapped, detached, tuple(delta))
        score_term = empirical = true = z0.new_zeros(())
        for (b, t), w in zip(tokens, weights):
            r = row(b, t)
            a = int(actions[b, t])
            zbt, dzbt = z0[b, t], dz[b, t]
            lp_all = torch.log_softmax(zbt if r is None else zbt[r], -1)
            dsub = dzbt if r is None else dzbt[r]
            dlp_all = dsub - (lp_all.exp() * dsub).sum()
            if r is None:
                s = dlp_all[a]
            else:
                hit = (r == a).nonzero()
                s = dlp_all[hit[0, 0]] if hit.numel() else -(lp_all.exp() * dsub).sum()
            score_term = score_term + w * adv[b, t] * s**2
            empirical = empirical + w * s**2
            true = true + w * (lp_all.exp() * dlp_all**2).sum()
        out.append(
            {
                "tokens": tokens,
                "first_order": first.detach(),
                "second_order": 0.5 * (score_term + d_hess_d).detach(),
                "policy_empirical": 0.5 * empirical.detach(),
                "policy_true": 0.5 * true.detach(),
            }
        )
    return out


class _Holder(nn.Module):
    def __init__(self, model: nn.Module, logits_of: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.m, self.fn = model, logits_of

    def forward(self) -> Tensor:
        return self.fn(self.m)


def candidate_update(head: nn.Module, optimizer: torch.optim.Optimizer, f) -> list[Tensor]:
    """Δ: what a copy of ``optimizer`` does to the head's parameters stepping on −f(head)."""
    head_c, opt_c = copy.deepcopy((head, optimizer))
    params_c = [p for p in head_c.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params_c]
    maximize = any(g.get("maximize", False) for g in opt_c.param_groups)
    opt_c.zero_grad()
    (f(head_c) if maximize else -f(head_c)).backward()
    opt_c.step()
    return [p.detach() - b for p, b in zip(params_c, before)]


def elementwise_token_change(rule, h: Tensor, cv: Tensor, rows) -> Tensor:
    """Σ_c Δ_{t,j,c} h_{t,c} with Δ = rule(q_t), q_t = cv_t ⊗ h_t, formed elementwise column by
    column (any update rule; the oracle of the rank-one closed forms).

    ``rows``: None (the columns of ``cv`` are all head rows), a slice of head rows, or ``[n, K]``.
    """
    out = torch.empty_like(cv)
    for c in range(cv.shape[1]):
        if rows is None:
            at = slice(c, c + 1)
        elif isinstance(rows, slice):
            at = slice(rows.start + c, rows.start + c + 1)
        else:
            at = rows[:, c : c + 1]
        q = cv[:, c : c + 1].unsqueeze(2) * h.unsqueeze(1)
        out[:, c : c + 1] = (rule(q, at) * h.unsqueeze(1)).sum(2)
    return out
