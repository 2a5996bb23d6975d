"""The whole-policy trust region through CAPO on transformers models: the realised KL of every
step, by literal forwards before and after it, is within the bound — with SDPA attention, tied
embeddings, bf16, autocast, LoRA, gradient accumulation and any optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lm import completion_logits, completions, literal_kl, policy_loss, tiny_qwen

import curvopt
from curvopt.settings import DEFAULT_MAX_POLICY_SHIFT


def one_step(model, opt, batch, forward=None, autocast=None):
    """The issue's one line, then literal forwards: (stats, unscaled-free realised KL)."""
    ids = batch["ids"]
    forward = forward or (lambda m: completion_logits(m, ids))
    if autocast:
        with torch.autocast("cpu", dtype=autocast):
            logits = forward(model)
    else:
        logits = forward(model)
    keep = opt.select(
        None, batch["actions"], batch["advantages"], batch["mask"], logits=logits, forward=forward
    )
    policy_loss(logits, batch, keep).backward()
    before = logits.detach()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        if autocast:
            with torch.autocast("cpu", dtype=autocast):
                after = forward(model)
        else:
            after = forward(model)
    return dict(opt.stats), literal_kl(before, after, keep)


def unscaled_kl(model, optimizer_factory, batch):
    """The KL of the bare optimizer's step on a copy (what the bound has to cut down)."""
    twin = copy.deepcopy(model)
    opt = optimizer_factory(twin)
    logits = completion_logits(twin, batch["ids"])
    policy_loss(logits, batch, batch["mask"]).backward()
    opt.step()
    with torch.no_grad():
        return literal_kl(logits.detach(), completion_logits(twin, batch["ids"]), batch["mask"])


def test_the_one_line_form_bounds_the_whole_policy_of_a_tied_sdpa_model():
    model = tiny_qwen()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._attn_implementation == "sdpa"
    bound = 1e-3

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=3e-2)

    for seed in range(2):
        batch = completions(seed)
        assert unscaled_kl(model, adamw, batch) > 10 * bound
        if seed == 0:
            opt = curvopt.CAPO(adamw(model), model=model, levels=(), max_policy_shift=bound)
        stats, realised = one_step(model, opt, batch)
        assert 0.5 * bound <= realised <= 1.1 * bound
        assert stats["policy_shift_realised"] == pytest.approx(realised, rel=1e-3)
        assert stats["step_policy_shift"] > 10 * bound and 0 < stats["step_scale"] < 1


def test_built_from_the_model_alone_it_is_the_trust_region_at_the_default_bound():
    model = tiny_qwen()
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=1.0), model=model)
    assert opt.max_policy_shift == DEFAULT_MAX_POLICY_SHIFT and opt.settings.levels == ()
    stats, realised = one_step(model, opt, completions(0))
    assert stats["step_scale"] < 1
    assert realised <= 1.1 * DEFAULT_MAX_POLICY_SHIFT


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_and_any_attention_kernel(attention, dtype):
    model = tiny_qwen(attention=attention, dtype=dtype)
    bound = 1e-3
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    opt.max_policy_shift = bound
    stats, realised = one_step(model, opt, completions(1))
    assert stats["step_scale"] < 1
    # bf16 logits: the KL of exactly those logits, measured in float32; the step taken is
    # rounded to bf16 after the trial, so allow that rounding's share
    tolerance = 1.1 if dtype == torch.float32 else 1.5
    assert 0.3 * bound <= realised <= tolerance * bound


def test_trial_forwards_run_under_the_training_forward_autocast():
    model = tiny_qwen()
    bound = 1e-3
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    stats, realised = one_step(model, opt, completions(2), autocast=torch.bfloat16)
    assert stats["step_scale"] < 1
    assert realised <= 1.5 * bound
    assert stats["policy_shift_realised"] == pytest.approx(realised, rel=0.2)


def test_gradient_accumulation_bounds_the_step_over_all_its_micro_batches():
    model = tiny_qwen()
    bound = 5e-4
    opt = curvopt.CAPO(
        torch.optim.AdamW(model.parameters(), lr=3e-2), model=model, max_policy_shift=bound
    )
    batch = completions(3, B=6)
    parts = [slice(0, 2), slice(2, 6)]
    befores, keeps = [], []
    for sl in parts:
        ids = batch["ids"][sl]
        logits = completion_logits(model, ids)
        part = {k: v[sl] for k, v in batch.items()}
        keep = opt.select(
            None, part["actions"], part["advantages"], part["mask"], logits=logits,
            forward=lambda m, ids=ids: completion_logits(m, ids),
        )  # fmt: skip
        (policy_loss(logits, part, keep) * keep.sum() / batch["mask"].sum()).backward()
        befores.append(logits.detach())
        keeps.append(keep)
    opt.step()
    with torch.no_grad():
        after = completion_logits(model, batch["ids"])
    realised = literal_kl(torch.cat(befores), after, torch.cat(keeps))
    assert opt.stats["step_scale"] < 1 and opt.stats["tokens"] == batch["mask"].sum()
    assert 0.5 * bound <= realised <= 1.1 * bound


def adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False)


class SignSGD(torch.optim.Optimizer):
    """A user-written optimizer curvopt knows nothing about."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class MyAdamW(torch.optim.AdamW):
    pass


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=30.0, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.3),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=3e-2),
    "adafactor": adafactor,
    "sign_sgd": lambda ps: SignSGD(ps, lr=3e-2),
    "my_adamw": lambda ps: MyAdamW(ps, lr=3e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_optimizer(name):
    model = tiny_qwen()
    bound = 1e-4
    batch = completions(4)
    assert unscaled_kl(model, lambda m: OPTIMIZERS[name](m.parameters()), batch) > 10 * bound
    opt = curvopt.CAPO(OPTIMIZERS[name](model.parameters()), model=model, max_policy_shift=bound)
    stats, realised = one_step(model, opt, batch)
    assert 0.5 * bound <= realised <= 1.1 * bound
    assert stats["step_scale"] < 1


def test_lora_moves_only_the_adapters_and_bounds_the_whole_policy():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_qwen(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    bound = 1e-4
    opt = curvopt.CAPO(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3),
        model=model,
        max_policy_shift=bound,
    )
    for seed in range(3):  # LoRA's B starts at 0: the first step moves nothing of the policy
        stats, realised = one_step(model, opt, completions(seed))
    assert stats["step_scale"] < 1
    assert 0.5 * bound <= realised <= 1.1 * bound
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_token_rejection_needs_a_trainable_output_layer():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_qwen(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"trust region|frozen"):
        curvopt.CAPO(
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
            model=model,
            levels=("token",),
        )


# ---------------------------------------------------------------- bad input and faults


@pytest.mark.parametrize("bound", [0.0, -1e-3, math.nan, math.inf])
def test_bad_bounds_raise(bound):
    model = tiny_qwen()
    with pytest.raises(ValueError, match="max_policy_shift"):
        curvopt.CAPO(torch.optim.AdamW(model.parameters()), model=model, max_policy_shift=bound)


def state_of(model, opt):
    """The parameters and the wrapped optimizer's state."""
    return [p.detach().clone() for p in model.parameters()], str(opt.optimizer.state_dict())


def assert_state(model, opt, state):
    for p, q in zip(model.parameters(), state[0], strict=True):
        assert torch.equal(p, q)
    assert str(opt.optimizer.state_dict()) == state[1]


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_a_forward_that_does_not_match_the_mask_raises_naming_it(name):
    model = tiny_qwen()
    factory = OPTIMIZERS.get(name) or (lambda ps: torch.optim.AdamW(ps, lr=3e-2))
    opt = curvopt.CAPO(factory(model.parameters()), model=model)
    batch = completions(5)
    state = state_of(model, opt)
    with pytest.raises(ValueError, match="forward"):
        logits = completion_logits(model, batch["ids"])
        keep = opt.select(
            None, batch["actions"], batch["advantages"], batch["mask"], logits=logits,
            forward=lambda m: m(batch["ids"]).logits,  # every position, not the completion's
        )  # fmt: skip
        policy_loss(logits, batch, keep).backward()
        opt.step()
    opt.zero_grad()
    assert_state(model, opt, state)


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_a_non_finite_kl_means_no_step_counted_and_warned(name):
    model = tiny_qwen()
    factory = OPTIMIZERS.get(name) or (lambda ps: torch.optim.AdamW(ps, lr=3e-2))
    opt = curvopt.CAPO(factory(model.parameters()), model=model)
    batch = completions(6)
    state = state_of(model, opt)

    def forward(m):
        out = completion_logits(m, batch["ids"])
        return out if torch.is_grad_enabled() else out * math.nan

    logits = forward(model)
    keep = opt.select(
        None, batch["actions"], batch["advantages"], batch["mask"], logits=logits, forward=forward
    )
    policy_loss(logits, batch, keep).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.stats["skipped_steps"] == 1 and opt.stats["steps"] == 0
    assert opt.stats["step_scale"] == 0.0
    opt.zero_grad()
    assert_state(model, opt, state)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_at_kept_positions_raise_naming_them_before_any_change(bad):
    model = tiny_qwen()
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    batch = completions(8)
    state = state_of(model, opt)
    logits = completion_logits(model, batch["ids"]).detach()
    masked_out = (~batch["mask"]).nonzero()
    if len(masked_out):  # a non-finite logit where the mask is off is no error
        b, t = masked_out[0].tolist()
        quiet = logits.clone()
        quiet[b, t, 3] = bad
        opt.select(None, batch["actions"], batch["advantages"], batch["mask"], logits=quiet,
                   forward=lambda m: completion_logits(m, batch["ids"]))  # fmt: skip
        opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    b, t = batch["mask"].nonzero()[-1].tolist()
    logits[b, t, 5] = bad
    with pytest.raises(ValueError, match="logits: contains non-finite values"):
        opt.select(None, batch["actions"], batch["advantages"], batch["mask"], logits=logits,
                   forward=lambda m: completion_logits(m, batch["ids"]))  # fmt: skip
    assert_state(model, opt, state)
    opt.select(None, batch["actions"], batch["advantages"], batch["mask"],
               logits=completion_logits(model, batch["ids"]),
               forward=lambda m: completion_logits(m, batch["ids"]))  # fmt: skip
    assert opt.stats["tokens"] == batch["mask"].sum()  # the failed call recorded nothing


@pytest.mark.parametrize("empty", ["no rows", "no tokens"])
def test_an_empty_micro_batch_is_a_no_op(empty):
    model = tiny_qwen()
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    batch = completions(7)
    calls = []
    if empty == "no rows":  # e.g. every completion of this rank filtered out
        part = {k: v[:0] for k, v in batch.items()}
        logits = torch.zeros(0, batch["mask"].shape[1], model.config.vocab_size)
    else:
        part = dict(batch, mask=torch.zeros_like(batch["mask"]))
        logits = completion_logits(model, part["ids"])

    def forward(m):
        calls.append(1)
        return completion_logits(m, part["ids"])

    keep = opt.select(
        None, part["actions"], part["advantages"], part["mask"], logits=logits, forward=forward
    )
    assert keep.shape == part["mask"].shape and not keep.any()
    stats, _ = one_step(model, opt, batch)  # the same window: the empty one adds nothing
    assert stats["tokens"] == batch["mask"].sum()
    assert calls == []  # never run: it has no token to measure


def test_resume_from_state_dict_is_bit_exact():
    model = tiny_qwen()

    def build(m):
        return curvopt.CAPO(torch.optim.AdamW(m.parameters(), lr=3e-2), model=m)

    opt = build(model)
    one_step(model, opt, completions(0))
    twin = copy.deepcopy(model)
    twin_opt = build(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.trust_region.search.exponent == opt.trust_region.search.exponent
    for seed in (1, 2):
        a, _ = one_step(model, opt, completions(seed))
        b, _ = one_step(twin, twin_opt, completions(seed))
        assert a == b
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_loose_bound_is_the_bare_optimizer_bit_for_bit():
    model = tiny_qwen()
    twin = copy.deepcopy(model)
    opt = curvopt.CAPO(
        torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, max_policy_shift=1e9
    )
    bare = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    for seed in range(3):
        batch = completions(seed)
        stats, _ = one_step(model, opt, batch)
        assert stats["step_scale"] == 1.0 and stats["trust_region_trials"] == 1
        policy_loss(completion_logits(twin, batch["ids"]), batch, batch["mask"]).backward()
        bare.step()
        bare.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
