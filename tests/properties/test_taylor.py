"""On exact softmax problems the quadratic model is the second-order Taylor model.

A contextual bandit with S states and V actions, a linear (tabular or feature) softmax policy, and
J(θ) = Σ_s ρ_s Σ_a π_θ(a|s) r(s, a), ρ uniform. Passing every action of every state as the tokens of
one batch, with advantages chosen so that the batch weights give w·A = ρ_s π(a|s) r(s, a), makes
the batch candidate's f the exact policy-gradient surrogate of J, its Ĥ exactly ∇²J, and its m_F
(true Fisher) the second-order model of the mean KL. The candidate update is η·D (every supported
optimizer's step is linear in the learning rate η), so along g(η) = J(θ + ηD) Taylor's theorem
gives ``|g(η) − g(0) − m_H(η)| ≤ η³/6 · max_{[0,η]} |g'''|``, and the same for the KL.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import warm_up
from torch import nn
from torch.func import functional_call

from curvopt import CurvatureTracker


def bandit(seed: int, S: int, V: int, tabular: bool):
    g = torch.Generator().manual_seed(seed)
    H = S if tabular else 3
    head = nn.Linear(H, V, bias=not tabular).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    if tabular:
        features = torch.eye(S, dtype=torch.float64)
    else:
        features = torch.randn(S, H, generator=g, dtype=torch.float64)
    rewards = torch.randn(S, V, generator=g, dtype=torch.float64)
    return head, features, rewards


def make_optimizer(kind: str, head: nn.Module) -> torch.optim.Optimizer:
    params = head.parameters()
    return {
        "sgd": lambda: torch.optim.SGD(params, lr=1e-2),
        "sgd-momentum": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.01),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    }[kind]()


def quadratic_model(head, optimizer, features, rewards, direction="exact"):
    S, V = rewards.shape
    hidden = features[:, None, :].expand(S, V, features.shape[1])
    actions = torch.arange(V).expand(S, V)
    with torch.no_grad():
        probs = torch.softmax(head(features), -1)
    advantages = V * probs * rewards  # w = 1/(S·V), so w·A = π(a|s) r(s,a) / S
    mask = torch.ones(S, V, dtype=torch.bool)
    tracker = CurvatureTracker(head, optimizer, fisher="true", direction=direction)
    return tracker.quadratic_model(hidden, actions, advantages, mask, level="batch")


def unit_direction(head, optimizer, features, rewards) -> list[torch.Tensor]:
    """D: the optimizer's step on the exact policy gradient, per unit learning rate."""
    moved, opt = copy.deepcopy((head, optimizer))
    opt.zero_grad()
    logp = torch.log_softmax(moved(features), -1)
    (-(logp.exp().detach() * rewards * logp).sum(-1).mean()).backward()
    opt.step()
    lr = optimizer.param_groups[0]["lr"]
    return [(a.detach() - b.detach()) / lr for a, b in zip(moved.parameters(), head.parameters())]


def along(head, direction, features, rewards):
    """(J(θ + sD), mean KL(π_θ ‖ π_{θ+sD})) as functions of the scalar s."""
    names = [n for n, _ in head.named_parameters()]
    base = [p.detach() for p in head.parameters()]
    with torch.no_grad():
        logp0 = torch.log_softmax(head(features), -1)

    def logp(s):
        params = {n: b + s * d for n, b, d in zip(names, base, direction)}
        return torch.log_softmax(functional_call(head, params, (features,)), -1)

    def objective(s):
        return (logp(s).exp() * rewards).sum(-1).mean()

    def kl(s):
        return (logp0.exp() * (logp0 - logp(s))).sum(-1).mean()

    return objective, kl


def third_derivative_bound(fn, eta: float, points: int = 33) -> float:
    """max |fn'''| on a grid of [0, η] (autograd), with a 10 % margin for the grid."""
    values = []
    for s in torch.linspace(0, eta, points, dtype=torch.float64):
        s = s.clone().requires_grad_(True)
        d = fn(s)
        for _ in range(3):
            (d,) = torch.autograd.grad(d, s, create_graph=True)
        values.append(abs(float(d)))
    return 1.1 * max(values)


# slow: the halving test below and the MDP version in test_theorem.py check the same order in the
# default run
@pytest.mark.slow
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["sgd", "sgd-momentum", "adam", "adamw"]),
    tabular=st.booleans(),
    warm=st.integers(0, 3),
)
def test_quadratic_model_error_is_bounded_by_the_third_order_remainder(seed, kind, tabular, warm):
    head, features, rewards = bandit(seed, S=3, V=4, tabular=tabular)
    optimizer = make_optimizer(kind, head)
    snapshot = copy.deepcopy(head.state_dict())
    warm_up(head, optimizer, warm, torch.Generator().manual_seed(seed))
    head.load_state_dict(snapshot)  # the warm state, at the bandit's own point
    direction = unit_direction(head, optimizer, features, rewards)
    objective, kl = along(head, direction, features, rewards)
    with torch.no_grad():
        j0 = objective(torch.tensor(0.0, dtype=torch.float64))
    for eta in (4e-2, 1e-2, 2.5e-3):
        optimizer.param_groups[0]["lr"] = eta
        qm = quadratic_model(head, optimizer, features, rewards)
        s = torch.tensor(eta, dtype=torch.float64)
        with torch.no_grad():
            error_h = abs(float(objective(s) - j0 - qm.objective_shift))
            error_f = abs(float(kl(s) - qm.policy_shift))
        assert error_h <= eta**3 / 6 * third_derivative_bound(objective, eta) + 1e-15
        assert error_f <= eta**3 / 6 * third_derivative_bound(kl, eta) + 1e-15


def test_halving_the_step_divides_the_error_by_eight():
    """The asymptotic rate on one instance, and the first-order model alone only by four."""
    head, features, rewards = bandit(0, S=3, V=4, tabular=True)
    direction = unit_direction(head, torch.optim.SGD(head.parameters(), lr=1.0), features, rewards)
    objective, kl = along(head, direction, features, rewards)
    zero = torch.tensor(0.0, dtype=torch.float64)
    errors = []
    for eta in (4e-3, 2e-3):
        qm = quadratic_model(head, torch.optim.SGD(head.parameters(), lr=eta), features, rewards)
        s = torch.tensor(eta, dtype=torch.float64)
        with torch.no_grad():
            dj = objective(s) - objective(zero)
            errors.append(
                [
                    float((dj - qm.objective_shift).abs()),
                    float((kl(s) - qm.policy_shift).abs()),
                    float((dj - qm.first_order).abs()),
                ]
            )
    (h1, k1, f1), (h2, k2, f2) = errors
    assert 7.0 < h1 / h2 < 9.0
    assert 7.0 < k1 / k2 < 9.0
    assert 3.5 < f1 / f2 < 4.5
