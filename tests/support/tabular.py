"""Exact tabular problems: softmax policies over a table of logits on small discounted MDPs.

The policy is a "last layer" with one-hot features: ``nn.Linear(S, A, bias=False)`` applied to the
one-hot state e_s gives the logits z_s = W[:, s], π(·|s) = softmax(z_s). Every quantity is exact
(a linear solve), differentiable in W, and float64:

    P_π[s, s'] = Σ_a π(a|s) P(s'|s, a),   r_π[s] = Σ_a π(a|s) r(s, a)
    V^π = (I − γ P_π)⁻¹ r_π,   Q^π = r + γ P V^π,   A^π = Q^π − V^π,   J(π) = ρ₀ᵀ V^π
    d̃^π = ρ₀ᵀ (I − γ P_π)⁻¹      (unnormalised discounted visitation, Σ_s d̃^π(s) = 1/(1−γ))

A contextual bandit is the case γ = 0 (ρ₀ is the context distribution; transitions never matter).
Objectives that are linear in the policy, ``E(θ') = Σ_s Σ_a π_θ'(a|s) X(s, a)`` for a fixed payoff
table X, cover both the policy-improvement surrogate of Kakade & Langford / TRPO at θ,

    L_θ(θ') = Σ_s d̃^{π_θ}(s) Σ_a π_θ'(a|s) A^{π_θ}(s, a)      (X = d̃·A, frozen at θ; L_θ(θ) = 0),

and the importance-weighted objective of a sampled subset S of tokens,
``f̃_S(θ') = Σ_{t∈S} w_t A_t π_θ'(a_t|s_t) / π_θ(a_t|s_t)`` (the objective whose second-order model
at θ is curvopt's m_H of S). The performance-difference lemma reads
J(θ') − J(θ) = Σ_s d̃^{π_θ'}(s) Σ_a π_θ'(a|s) A^{π_θ}(s, a), so L_θ and J − J(θ) agree to first
order, and exactly when γ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

DTYPE = torch.float64


@dataclass
class Tabular:
    """A finite discounted MDP: ``transitions [S, A, S]`` P(s'|s, a), ``rewards [S, A]``,
    ``initial [S]`` ρ₀, discount ``gamma`` in [0, 1)."""

    transitions: Tensor
    rewards: Tensor
    initial: Tensor
    gamma: float

    @property
    def states(self) -> int:
        return self.rewards.shape[0]

    @property
    def actions(self) -> int:
        return self.rewards.shape[1]


@dataclass
class Solution:
    """Everything exact about a policy: ``probs [S, A]``, ``values [S]``, ``q [S, A]``,
    ``advantages [S, A]``, ``visitation [S]`` (d̃, unnormalised) and ``objective`` J."""

    probs: Tensor
    values: Tensor
    q: Tensor
    advantages: Tensor
    visitation: Tensor
    objective: Tensor


def random_mdp(gen: torch.Generator, states: int, actions: int, gamma: float) -> Tabular:
    """Dirichlet-like transitions and initial distribution, rewards uniform in [−1, 1]."""
    transitions = torch.rand(states, actions, states, generator=gen, dtype=DTYPE) ** 2 + 1e-3
    initial = torch.rand(states, generator=gen, dtype=DTYPE) + 0.1
    rewards = 2 * torch.rand(states, actions, generator=gen, dtype=DTYPE) - 1
    return Tabular(
        transitions / transitions.sum(-1, keepdim=True), rewards, initial / initial.sum(), gamma
    )


def tabular_head(gen: torch.Generator, states: int, actions: int, scale: float) -> nn.Linear:
    """The policy: ``nn.Linear(S, A, bias=False)`` with N(0, scale²) logits."""
    head = nn.Linear(states, actions, bias=False).to(DTYPE)
    with torch.no_grad():
        head.weight.copy_(scale * torch.randn(actions, states, generator=gen, dtype=DTYPE))
    return head


def policy(weight: Tensor) -> Tensor:
    """π(a|s) ``[S, A]`` of the logit table ``weight [A, S]`` (the head's weight)."""
    return torch.softmax(weight.T, -1)


def solve(mdp: Tabular, weight: Tensor) -> Solution:
    """The exact V, Q, A, d̃ and J of the policy with logit table ``weight`` (differentiable)."""
    probs = policy(weight)
    p_pi = torch.einsum("sa,sat->st", probs, mdp.transitions)
    r_pi = (probs * mdp.rewards).sum(-1)
    system = torch.eye(mdp.states, dtype=DTYPE) - mdp.gamma * p_pi
    values = torch.linalg.solve(system, r_pi)
    q = mdp.rewards + mdp.gamma * mdp.transitions @ values
    visitation = torch.linalg.solve(system.T, mdp.initial)
    return Solution(probs, values, q, q - values[:, None], visitation, mdp.initial @ values)


def objective(mdp: Tabular, weight: Tensor) -> Tensor:
    """J(θ) = ρ₀ᵀ V^π."""
    return solve(mdp, weight).objective


def expected_payoff(payoff: Tensor, weight: Tensor) -> Tensor:
    """E(θ') = Σ_s Σ_a π_θ'(a|s) X(s, a) for a payoff table ``X [S, A]``."""
    return (policy(weight) * payoff).sum()


def surrogate_payoff(base: Solution) -> Tensor:
    """X = d̃^θ(s) A^θ(s, a): the payoff whose expectation is the surrogate L_θ."""
    return (base.visitation[:, None] * base.advantages).detach()


def state_distribution(mdp: Tabular, base: Solution) -> Tensor:
    """d^π = (1 − γ) d̃^π, the normalised discounted visitation (ρ₀ for a bandit)."""
    return (1 - mdp.gamma) * base.visitation


def mean_divergences(mdp: Tabular, base: Solution, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(E_{s∼d^π} KL(π_θ(·|s) ‖ π_θ'(·|s)), E_{s∼d^π} TV(π_θ(·|s), π_θ'(·|s))), TV = ½‖·‖₁."""
    new = policy(weight)
    d = state_distribution(mdp, base)
    kl = (base.probs * (torch.log(base.probs) - torch.log(new))).sum(-1)
    tv = 0.5 * (base.probs - new).abs().sum(-1)
    return d @ kl, d @ tv


@dataclass
class Rollouts:
    """A batch of sampled trajectories as curvopt sees it: ``hidden [B, T, S]`` one-hot states,
    ``actions [B, T]``, ``advantages [B, T]`` (the exact A^π of each step), ``mask [B, T]``."""

    hidden: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor


def sample_rollouts(
    mdp: Tabular,
    base: Solution,
    gen: torch.Generator,
    sequences: int,
    horizon: int,
    advantages: str = "exact",
) -> Rollouts:
    """Trajectories s₀ ∼ ρ₀, a_t ∼ π, s_{t+1} ∼ P, each continuing with probability γ (so their
    states are distributed as d^π), cut at ``horizon``. Each step's advantage is its exact A^π
    (``"exact"``) or the Monte-Carlo estimate ``Σ_{k≥t} r_k − V^π(s_t)`` (``"monte-carlo"``; the
    continuation probability plays the discount, so it is unbiased for Q^π − V^π up to the cut)."""
    S = mdp.states
    states = torch.zeros(sequences, horizon, dtype=torch.long)
    actions = torch.zeros(sequences, horizon, dtype=torch.long)
    mask = torch.zeros(sequences, horizon, dtype=torch.bool)
    probs = base.probs.detach()
    for b in range(sequences):
        s = int(torch.multinomial(mdp.initial, 1, generator=gen))
        for t in range(horizon):
            a = int(torch.multinomial(probs[s], 1, generator=gen))
            states[b, t], actions[b, t], mask[b, t] = s, a, True
            if float(torch.rand((), generator=gen, dtype=DTYPE)) >= mdp.gamma:
                break
            s = int(torch.multinomial(mdp.transitions[s, a], 1, generator=gen))
    hidden = nn.functional.one_hot(states, S).to(DTYPE)
    if advantages == "exact":
        adv = base.advantages.detach()[states, actions]
    else:
        rewards = mdp.rewards[states, actions] * mask
        to_go = rewards.flip(1).cumsum(1).flip(1)
        adv = to_go - base.values.detach()[states]
    return Rollouts(hidden, actions, adv * mask, mask)


@st.composite
def mdps(draw, gammas=(0.0, 0.1, 0.5, 0.8)) -> tuple[Tabular, nn.Linear, torch.Generator]:
    """A random instance (MDP, policy head at a random point, generator for what follows)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    states, actions = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    mdp = random_mdp(gen, states, actions, draw(st.sampled_from(gammas)))
    return mdp, tabular_head(gen, states, actions, draw(st.sampled_from([0.5, 1.5]))), gen
