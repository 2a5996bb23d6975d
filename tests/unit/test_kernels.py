"""The fused (torch.compile) block path gives what the eager one gives."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyPolicy, make_batch, policy_loss

from curvopt import CurvatureTracker, fusion
from curvopt.optimizers import loss_gradients, read_rules


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(direction="frozen"), id="frozen"),
        # the frozen kernels again, over the shadow moments: slow
        pytest.param(dict(direction="shadow"), id="shadow", marks=pytest.mark.slow),
        pytest.param(dict(direction="exact", top_k=5), id="exact-topk"),
    ],
)
def test_compiled_blocks_equal_eager_blocks(kw, monkeypatch):
    torch.manual_seed(0)
    model = TinyPolicy(vocab=40).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tracker = CurvatureTracker(model.lm_head, opt, temperature=0.8, **kw)
    for i in range(2):  # Adam and the shadow moments get state
        batch = make_batch(i, V=40)
        batch["x"] = batch["x"].double()
        batch["advantages"] = batch["advantages"].double()
        h, logits = model(batch["x"])
        tracker.quadratic_model(h, batch["actions"], batch["advantages"], batch["mask"])
        policy_loss(logits, batch["actions"], batch["advantages"], batch["mask"]).backward()
        opt.step()
        tracker.observe_step()
        opt.zero_grad()
    batch = make_batch(5, V=40)
    h, logits = model(batch["x"].double())
    args = (h.detach(), batch["actions"], batch["advantages"].double(), batch["mask"])
    monkeypatch.setenv("CURVOPT_COMPILE", "0")
    eager = tracker.quadratic_model(*args)
    monkeypatch.setenv("CURVOPT_COMPILE", "1")
    fused = tracker.quadratic_model(*args)
    assert fusion._compiled and not fusion._broken  # the fused path did run
    for key in ("first_order", "second_order", "policy_shift"):
        torch.testing.assert_close(getattr(fused, key), getattr(eager, key), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("warm", [0, 2], ids=["first-step", "with-state"])
@pytest.mark.parametrize("kind", ["adam-l2", "adamw-amsgrad"])
def test_compiled_adam_trial_point_is_theta0_plus_the_optimizers_own_step(kind, warm, monkeypatch):
    # a trial point θ0 + s·Δθ formed in one fused pass equals the eager one, and both equal the
    # start plus s times the step the optimizer itself takes (float64)
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(300, 7, dtype=torch.float64))
    if kind == "adam-l2":
        opt = torch.optim.Adam([p], lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, amsgrad=True)
    for _ in range(warm):
        p.grad = torch.randn_like(p)
        opt.step()
    p.grad = torch.randn_like(p)
    rule = read_rules(opt, [p], frozen=False, dtype=torch.float64)[0]
    (q,) = loss_gradients([rule], [p], opt)
    start = p.detach().clone()
    monkeypatch.setenv("CURVOPT_COMPILE", "0")
    eager = rule.point(q, p.detach(), 0.37, torch.empty_like(start))
    monkeypatch.setenv("CURVOPT_COMPILE", "1")
    buffer = torch.full((p.numel() + 16,), torch.nan, dtype=p.dtype)
    fused = rule.point(q, p.detach(), 0.37, buffer[16:].view(p.shape))  # into a view, offset
    assert fused.data_ptr() == buffer[16:].data_ptr() and buffer[:16].isnan().all()
    assert fusion._compiled and not fusion._broken  # the fused path did run
    assert torch.equal(p.detach(), start)  # θ0 is read, never written
    opt.step()
    want = start + 0.37 * (p.detach() - start)
    torch.testing.assert_close(fused, eager, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(eager, want, rtol=1e-12, atol=1e-14)


def test_fuses_says_whether_work_of_a_size_is_compiled(monkeypatch):
    monkeypatch.setenv("CURVOPT_COMPILE", "0")
    assert not fusion.fuses(1 << 30)
    monkeypatch.setenv("CURVOPT_COMPILE", "1")
    assert fusion.fuses(1)
    monkeypatch.setenv("CURVOPT_COMPILE", "auto")
    assert fusion.fuses(fusion.MIN_ELEMENTS) and not fusion.fuses(fusion.MIN_ELEMENTS - 1)
    monkeypatch.setattr(fusion, "_broken", True)  # a compiler that failed: never again
    assert not fusion.fuses(1 << 30)
