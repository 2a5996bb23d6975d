"""The slow, obviously-right definition of every quantity, for tests.

Each candidate's update Δ is found by deep-copying the head together with the real optimizer and
stepping the copy on loss −f_S (+f_S for a maximizing optimizer); the quadratic terms come from
autograd and ``torch.func.jvp`` on the head's parameters, never from logit-space formulas.
"""

from __future__ import annotations

import copy

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


def oracle(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    hidden: Tensor,
    actions: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    level: str,
    top_k: int | None = None,
) -> list[dict]:
    """For each candidate: tokens, first_order, second_order, empirical and true policy shift."""
    B, T = mask.shape
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(B, T)
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with torch.no_grad():
        logits = head(hidden)
    rows = None if top_k is None else torch.topk(logits, top_k, dim=-1).indices
    out = []
    for tokens, weights in candidates(mask, level):

        def f(module: nn.Module, tokens=tokens, weights=weights) -> Tensor:
            total = hidden.new_zeros(())
            for (b, t), w in zip(tokens, weights):
                r = None if rows is None else rows[b, t]
                z = module(hidden[b, t])
                total = total + w * adv[b, t] * log_prob(z, int(actions[b, t]), r)
            return total

        delta = candidate_update(head, optimizer, f)
        value = f(head)
        grads = torch.autograd.grad(value, params, create_graph=True)
        first = sum((g * d).sum() for g, d in zip(grads, delta))
        hvp = torch.autograd.grad(first, params)
        d_hess_d = sum((h * d).sum() for h, d in zip(hvp, delta))
        score_term = empirical = true = hidden.new_zeros(())
        for (b, t), w in zip(tokens, weights):
            r = None if rows is None else rows[b, t]
            a = int(actions[b, t])

            def lp(*ps, b=b, t=t, r=r, a=a):
                z = functional_call(head, {n: p for (n, _), p in zip(named, ps)}, (hidden[b, t],))
                return log_prob(z, a, r)

            def lp_all(*ps, b=b, t=t, r=r):
                z = functional_call(head, {n: p for (n, _), p in zip(named, ps)}, (hidden[b, t],))
                return torch.log_softmax(z if r is None else z[r], -1)

            detached = tuple(p.detach() for p in params)
            _, s = jvp(lp, detached, tuple(delta))
            lps, dlps = jvp(lp_all, detached, tuple(delta))
            score_term = score_term + w * adv[b, t] * s**2
            empirical = empirical + w * s**2
            true = true + w * (lps.exp() * dlps**2).sum()
        out.append(
            {
                "tokens": tokens,
                "first_order": first.detach(),
                "second_order": 0.5 * (score_term + d_hess_d).detach(),
                "policy_empirical": 0.5 * empirical,
                "policy_true": 0.5 * true,
            }
        )
    return out
