"""policy_kl: the exact per-token KL between two policies, against the textbook formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt.policy import LogitTransform
from curvopt.trust_region.kl import HeadInput, policy_kl

F64 = torch.float64
TRANSFORMS = [
    LogitTransform(),
    LogitTransform(temperature=0.7),
    LogitTransform(scale=1.7, softcap=3.0, temperature=1.3),
]


def literal_kl(z0, z1, mask, transform):
    """Σ_j π0_j (log π0_j − log π1_j) per masked token, in float64, the obvious way."""
    lp0 = torch.log_softmax(transform(z0.double()), -1)[mask]
    lp1 = torch.log_softmax(transform(z1.double()), -1)[mask]
    return (lp0.exp() * (lp0 - lp1)).sum(-1)


def logits_pair(seed, B=3, T=4, V=11, size=1e-1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    z0 = 3 * torch.randn(B, T, V, generator=g, dtype=F64)
    z1 = z0 + size * torch.randn(B, T, V, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.7
    actions = torch.randint(0, V, (B, T), generator=g)
    return z0.to(dtype), z1.to(dtype), mask, actions


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "temperature", "softcap"])
@given(seed=st.integers(0, 10_000), size=st.sampled_from([1e-6, 1e-3, 1e-1, 3.0]))
def test_logits_kl_is_the_literal_kl_in_float64(transform, seed, size):
    z0, z1, mask, actions = logits_pair(seed, size=size)
    got = policy_kl(z0, z1, mask, actions, transform)
    want = literal_kl(z0, z1, mask, transform)
    # the literal formula's own float64 cancellation reaches ~1e-14 per token
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)


@given(seed=st.integers(0, 10_000), per_chunk=st.integers(1, 7))
def test_logits_kl_over_views_of_sliced_logits_with_gaps_is_the_literal_kl(seed, per_chunk):
    # completion logits sliced out of a longer sequence (not contiguous), a mask with gaps, and
    # chunks shorter than the runs of kept tokens: every token measured once, from views
    g = torch.Generator().manual_seed(seed)
    z0, z1, mask, actions = logits_pair(seed, B=4, T=9, V=13)
    long0 = torch.randn(4, 10, 13, generator=g, dtype=F64)
    long1 = long0.clone()
    long0[:, :-1], long1[:, :-1] = z0, z1
    mask[0] = True  # one whole row: a run longer than a chunk
    transform = LogitTransform(temperature=0.9)
    got = policy_kl(
        long0[:, :-1], long1[:, :-1], mask, actions, transform, block_elements=13 * per_chunk
    )
    torch.testing.assert_close(got, literal_kl(z0, z1, mask, transform), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "temperature", "softcap"])
def test_tiny_shifts_match_half_the_fisher_quadratic(transform):
    """For a shift of size ε, KL = ½ Var_π0(Δy) + O(ε³): the second-order model to relative ε."""
    z0, z1, mask, actions = logits_pair(5, V=30, size=1e-6)
    got = policy_kl(z0, z1, mask, actions, transform)
    y0, y1 = transform(z0)[mask], transform(z1)[mask]
    p0, u = torch.softmax(y0, -1), y1 - y0
    var = (p0 * u * u).sum(-1) - (p0 * u).sum(-1) ** 2
    torch.testing.assert_close(got, 0.5 * var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "temperature", "softcap"])
@given(seed=st.integers(0, 10_000), width=st.sampled_from([1, 3, 4, 100]))
def test_head_input_in_vocabulary_chunks_is_the_literal_kl(transform, seed, width):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 2, 3, 5, 13
    h0 = torch.randn(B, T, H, generator=g, dtype=F64)
    h1 = h0 + 0.05 * torch.randn(B, T, H, generator=g, dtype=F64)
    w0 = torch.randn(V, H, generator=g, dtype=F64)
    w1 = w0 + 0.05 * torch.randn(V, H, generator=g, dtype=F64)
    b0 = torch.randn(V, generator=g, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    actions = torch.randint(0, V, (B, T), generator=g)
    before, after = HeadInput(h0, w0, b0), HeadInput(h1, w1, None)
    got = policy_kl(before, after, mask, actions, transform, block_elements=width)
    want = literal_kl(h0 @ w0.T + b0, h1 @ w1.T, mask, transform)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)
    # a logits tensor on one side and the head's input on the other
    mixed = policy_kl(h0 @ w0.T + b0, after, mask, actions, transform, block_elements=width)
    torch.testing.assert_close(mixed, want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("size", [1e-3, 1e-2, 1e-1])
def test_float32_and_bf16_inputs_are_measured_in_float32_to_float32_accuracy(size):
    z0, z1, mask, actions = logits_pair(3, B=4, T=8, V=500, size=size)
    want = literal_kl(z0, z1, mask, LogitTransform())
    got = policy_kl(z0.float(), z1.float(), mask, actions, LogitTransform())
    # the logits' own float32 rounding (~1e-7 · |z|) enters the KL at first order only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    # bf16 logits are what they are; the KL of exactly those logits is computed in float32
    b0, b1 = z0.bfloat16(), z1.bfloat16()
    exact = literal_kl(b0.double(), b1.double(), mask, LogitTransform())
    torch.testing.assert_close(
        policy_kl(b0, b1, mask, actions, LogitTransform()), exact, rtol=1e-4, atol=1e-9
    )


def test_a_uniform_shift_of_the_logits_is_no_change():
    z0, _, mask, actions = logits_pair(0, V=50)
    z0 = z0.float()
    kl = policy_kl(z0, z0 + 7.0, mask, actions, LogitTransform())
    assert kl.abs().max() < 1e-12


def test_huge_changes_stay_finite_and_exact():
    z0, z1, mask, actions = logits_pair(1, V=20, size=60.0, dtype=torch.float32)
    got = policy_kl(z0, z1, mask, actions, LogitTransform())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, literal_kl(z0, z1, mask, LogitTransform()), rtol=1e-4, atol=0)


def test_non_finite_logits_give_a_non_finite_kl():
    z0, z1, mask, actions = logits_pair(2)
    mask[0, 0] = True
    z1[0, 0, 3] = torch.nan
    assert not torch.isfinite(policy_kl(z0, z1, mask, actions, LogitTransform()).sum())


def test_no_tokens_give_an_empty_result():
    z0, z1, _, actions = logits_pair(0)
    mask = torch.zeros(z0.shape[:2], dtype=torch.bool)
    assert policy_kl(z0, z1, mask, actions, LogitTransform()).shape == (0,)


@pytest.mark.parametrize("transform", TRANSFORMS[:2], ids=["identity", "temperature"])
@pytest.mark.parametrize("size", [3e2, 1e5, 1e7])
@pytest.mark.parametrize("head_input", [False, True], ids=["logits", "head input"])
def test_a_shift_of_hundreds_of_nats_is_measured_not_overflowed(transform, size, head_input):
    """exp of the logit change overflows float64 past ~700 nats: the KL is still the literal one
    (a diverging optimizer's step, which the trust region must scale down, not refuse)."""
    z0, z1, mask, actions = logits_pair(0, size=size)
    before, after = z0, z1
    if head_input:  # the logits formed from a linear head's input states, in chunks
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(*z0.shape[:2], 5, generator=g, dtype=F64)
        w0 = torch.randn(z0.shape[-1], 5, generator=g, dtype=F64)
        w1 = w0 + size * torch.randn(w0.shape, generator=g, dtype=F64)
        before, after = HeadInput(hidden, w0), HeadInput(hidden, w1)
        z0, z1 = hidden @ w0.T, hidden @ w1.T
    want = literal_kl(z0, z1, mask, transform)
    got = policy_kl(before, after, mask, actions, transform)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
