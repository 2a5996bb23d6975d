"""The GRPO example's objective: advantages, completion mask, the loss on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from grpolab.loss import completion_mask, group_advantages, policy_loss, token_logps
from hypothesis import given
from hypothesis import strategies as st


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 1/4, unbiased std 1/2; group 2: all equal, so no signal
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / 0.5
    torch.testing.assert_close(group_advantages(rewards, 4, eps=1e-12), expected)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale=False),
        torch.tensor([0.75, -0.25, -0.25, -0.25] + [0] * 4),
    )


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4), st.integers(1, 3))
def test_advantages_are_centred_and_scaled_per_group(group_rewards, repeats):
    rewards = torch.tensor(group_rewards * repeats)
    adv = group_advantages(rewards, 4).view(-1, 4)
    torch.testing.assert_close(adv.sum(1), torch.zeros(repeats), atol=1e-5, rtol=0)
    if len(set(group_rewards)) > 1:
        torch.testing.assert_close(adv.std(1), torch.full((repeats,), 1.0), atol=1e-3, rtol=0)


def test_advantages_reject_a_ragged_batch():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(6), 4)


def test_completion_mask_stops_after_the_first_eos():
    eos = 1
    completions = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0], [5, 6, 1, 1]])
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool
    )
    assert torch.equal(completion_mask(completions, eos), expected)


def test_token_logps_use_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    actions = torch.tensor([[1]])
    expected = torch.log_softmax(logits / 0.5, -1)[0, 0, 1]
    torch.testing.assert_close(token_logps(logits, actions, temperature=0.5)[0, 0], expected)


def _case() -> dict:
    """Ratios [[1.5, 0.5], [2, 0.5]], advantages [+1, −1], ε = 0.2.

    Per-token loss −min(ρA, clip(ρ)A):
    seq 0: −min(1.5, 1.2) = −1.2 (clipped), −min(0.5, 0.8) = −0.5;
    seq 1: −min(−2, −1.2) = 2, −min(−0.5, −0.8) = 0.8 (clipped).
    """
    old = torch.log(torch.tensor([[0.2, 0.4], [0.1, 0.6]], dtype=torch.float64))
    ratio = torch.tensor([[1.5, 0.5], [2.0, 0.5]], dtype=torch.float64)
    return {
        "logps": (old + ratio.log()).requires_grad_(),
        "old_logps": old,
        "advantages": torch.tensor([1.0, -1.0], dtype=torch.float64),
    }


@pytest.mark.parametrize(
    ("loss_type", "mask", "expected"),
    [
        ("grpo", [[1, 1], [1, 1]], ((-1.2 - 0.5) / 2 + (2 + 0.8) / 2) / 2),
        ("bnpo", [[1, 1], [1, 1]], (-1.2 - 0.5 + 2 + 0.8) / 4),
        ("dr_grpo", [[1, 1], [1, 1]], (-1.2 - 0.5 + 2 + 0.8) / (2 * 5)),
        # a token out of the mask leaves numerator and normaliser
        ("grpo", [[1, 0], [1, 1]], (-1.2 / 1 + (2 + 0.8) / 2) / 2),
        ("bnpo", [[1, 0], [1, 1]], (-1.2 + 2 + 0.8) / 3),
        ("dr_grpo", [[1, 0], [1, 1]], (-1.2 + 2 + 0.8) / (2 * 5)),
    ],
)
def test_loss_by_hand(loss_type, mask, expected):
    case = _case()
    mask = torch.tensor(mask, dtype=torch.bool)
    loss, stats = policy_loss(**case, mask=mask, loss_type=loss_type, max_completion_length=5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    clipped = [[True, False], [False, True]]
    assert stats["clip_frac"].item() == pytest.approx(
        (torch.tensor(clipped) & mask).sum().item() / mask.sum().item()
    )


def test_gradient_flows_only_through_unclipped_kept_tokens():
    case = _case()
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, _ = policy_loss(**case, mask=mask, loss_type="bnpo")
    loss.backward()
    # d(−ρA)/d logp = −ρA on unclipped tokens; clipped and masked-out tokens get nothing
    expected = torch.tensor([[0.0, -0.5], [2.0, 0.0]], dtype=torch.float64) / 3
    torch.testing.assert_close(case["logps"].grad, expected)


def test_kl_to_the_reference_by_hand():
    case = _case()
    mask = torch.ones(2, 2, dtype=torch.bool)
    d = 0.1  # ref − logp on every token
    ref = case["logps"].detach() + d
    k3 = math.exp(d) - d - 1
    base, _ = policy_loss(**case, mask=mask, loss_type="bnpo")
    loss, stats = policy_loss(**case, mask=mask, loss_type="bnpo", ref_logps=ref, beta=0.5)
    assert (loss - base).item() == pytest.approx(0.5 * k3, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-12)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(**case, mask=mask, beta=0.5)


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(**_case(), mask=torch.ones(2, 2, dtype=torch.bool), loss_type="ppo")
