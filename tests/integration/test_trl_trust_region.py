"""CAPOGRPOTrainer's default, the measured whole-policy trust region, through ``trainer.train()``:
each optimizer step's realised KL, by literal float64 forwards before and after it on the step's
completions, is within the bound — tied embeddings, LoRA, gradient accumulation, Adafactor; with
nothing to reject or scale it trains bit for bit as GRPOTrainer; a second ``train()`` keeps one
CAPO."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

pytest.importorskip("trl")

import trl_capo as example
from trl import GRPOTrainer

from curvopt.integrations.trl import CAPOConfig, CAPOGRPOTrainer, transformers_model
from curvopt.settings import DEFAULT_MAX_POLICY_SHIFT

TEMPERATURE = 0.7
BOUND = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    return example.make_tokenizer()


def reward(completions: list[str], **_: object) -> list[float]:
    """A reward that varies within every group, so that each step has a policy gradient."""
    return [float(len(c) % 3) for c in completions]


def make_model(tokenizer, *, tied: bool = False):
    torch.manual_seed(0)
    model = example.make_model(tokenizer, hidden_size=32, layers=1)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def config(tmp_path, **overrides) -> CAPOConfig:
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        temperature=TEMPERATURE,
        beta=0.0,
        seed=0,
    )
    settings.update(overrides)
    return CAPOConfig(**settings)


def trainer_for(model, tokenizer, args, cls=CAPOGRPOTrainer, **kwargs):
    return cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=example.make_problems(32, 1, 0),
        processing_class=tokenizer,
        **kwargs,
    )


class Steps:
    """Each optimizer step of ``trainer``: its micro-batches (the inputs of TRL's loss forward),
    the policy's parameters before it, after the bare optimizer's step on a copy (``unscaled``)
    and after it, and CAPO's statistics."""

    def __init__(self, trainer: CAPOGRPOTrainer) -> None:
        trainer.create_optimizer()
        self.policy = transformers_model(trainer.accelerator.unwrap_model(trainer.model))
        self.steps: list[dict] = []
        self._batches: list[dict[str, Tensor]] = []
        compute_loss = trainer._compute_loss

        def record(model, inputs):
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            self._batches.append({k: inputs[k].clone() for k in keys})
            return compute_loss(model, inputs)

        trainer._compute_loss = record
        trainer.capo.register_step_pre_hook(lambda *_: self._before(trainer))
        trainer.capo.register_step_post_hook(lambda *_: self._after(trainer))

    def _params(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.policy.named_parameters()}

    def _before(self, trainer) -> None:
        before = self._params()
        self.steps.append(
            {
                "batches": self._batches,
                "before": before,
                "unscaled": self._unscaled(trainer, before),
            }
        )
        self._batches = []

    def _unscaled(self, trainer, before: dict[str, Tensor]) -> dict[str, Tensor]:
        """The parameters after the bare optimizer's step, taken on a deep copy of it (its
        parameters and state; a parameter's copy leaves its gradient behind)."""
        optimizer = trainer.capo.optimizer
        names = {id(p): n for n, p in self.policy.named_parameters()}
        twin = copy.deepcopy(optimizer)
        pairs = [
            (p, q)
            for group, twin_group in zip(optimizer.param_groups, twin.param_groups)
            for p, q in zip(group["params"], twin_group["params"])
        ]
        for p, q in pairs:
            q.grad = None if p.grad is None else p.grad.clone()
        twin.step()
        return before | {names[id(p)]: q.detach().clone() for p, q in pairs}

    def _after(self, trainer) -> None:
        self.steps[-1].update(after=self._params(), stats=dict(trainer.capo.stats))

    def literal_kl(self, step: dict, after: str = "after") -> float:
        """Mean over the step's completion tokens of KL(π_before ‖ π_after), the full softmax of
        float64 forwards of a copy of the policy."""
        reference = copy.deepcopy(self.policy).double()
        logps = []
        for params in (step["before"], step[after]):
            with torch.no_grad():
                for name, p in reference.named_parameters():
                    p.copy_(params[name])
                logps.append([_completion_logps(reference, b) for b in step["batches"]])
        kls = [
            (lp0.exp() * (lp0 - lp1)).sum(-1)[b["completion_mask"].bool()]
            for lp0, lp1, b in zip(*logps, step["batches"])
        ]
        return float(torch.cat(kls).mean())


def _completion_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """log π(·|prefix) ``[B, T, V]`` of each completion position, at TRL's temperature: the
    backbone, then the output layer (the model's own forward is TRL's patched one)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    states = model.base_model(ids, attention_mask=mask).last_hidden_state
    P = batch["prompt_ids"].shape[1]
    logits = model.get_output_embeddings()(states[:, P - 1 : -1])
    return torch.log_softmax(logits / TEMPERATURE, -1)


def assert_bounded(steps: Steps, bound: float) -> None:
    """Every step, by literal forwards: the bare optimizer's step would have moved the policy by
    at least 10× the bound, the step taken moved it within the bound (and by at least half of it),
    and CAPO's measurements of both agree."""
    assert len(steps.steps) == 2
    for step in steps.steps:
        stats = step["stats"]
        unscaled, realised = steps.literal_kl(step, "unscaled"), steps.literal_kl(step)
        assert unscaled >= 10 * bound
        assert 0 < stats["step_scale"] < 1
        assert 0.5 * bound <= realised <= 1.1 * bound
        assert stats["step_policy_shift"] == pytest.approx(unscaled, rel=1e-3)
        assert stats["policy_shift_realised"] == pytest.approx(realised, rel=1e-3)


def test_the_default_bounds_the_whole_policy_of_a_tied_model(tokenizer, tmp_path):
    """Tied embeddings, no flag; two micro-batches per step (gradient accumulation)."""
    args = config(tmp_path, learning_rate=0.1, gradient_accumulation_steps=2)
    assert (args.capo_levels, args.capo_max_policy_shift) == ([], DEFAULT_MAX_POLICY_SHIFT)
    trainer = trainer_for(make_model(tokenizer, tied=True), tokenizer, args)
    steps = Steps(trainer)
    trainer.train()
    assert len(steps.steps[0]["batches"]) == 2
    assert_bounded(steps, DEFAULT_MAX_POLICY_SHIFT)
    logged = [h for h in trainer.state.log_history if "capo/step_scale" in h]
    names = ("step_scale", "step_policy_shift", "policy_shift_realised", "trust_region_trials")
    for entry, step in zip(logged, steps.steps):
        for name in names:
            assert entry[f"capo/{name}"] == step["stats"][name]
        assert entry["capo/skipped_frac"] == 0.0


def test_lora_moves_only_the_adapters_and_bounds_the_whole_policy(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    args = config(tmp_path, learning_rate=0.2, capo_max_policy_shift=BOUND)
    trainer = trainer_for(make_model(tokenizer), tokenizer, args, peft_config=lora)
    steps = Steps(trainer)
    trainer.train()
    assert_bounded(steps, BOUND)
    for step in steps.steps:
        moved = {n for n in step["before"] if not torch.equal(step["before"][n], step["after"][n])}
        assert moved and all("lora_" in n for n in moved)


def test_lora_with_token_rejection_names_the_trust_region(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    args = config(tmp_path, capo_levels=["token"], capo_max_policy_shift=None)
    with pytest.raises(ValueError, match=r"lm_head.*capo_levels=\[\] and capo_max_policy_shift"):
        trainer_for(make_model(tokenizer), tokenizer, args, peft_config=lora)


@pytest.mark.parametrize("bound", [None, 1e9], ids=["off", "inactive"])
def test_keeping_everything_trains_as_grpo_trainer_bit_for_bit(bound, tokenizer, tmp_path):
    """Nothing rejected and nothing scaled (the trust region off, or a bound no step reaches):
    the parameters after two steps are GRPOTrainer's, bit for bit."""
    settings = dict(learning_rate=1e-2, gradient_accumulation_steps=2)
    grpo = trainer_for(
        make_model(tokenizer), tokenizer, config(tmp_path / "grpo", **settings), GRPOTrainer
    )
    grpo.train()
    args = config(tmp_path / "capo", capo_max_policy_shift=bound, **settings)
    capo = trainer_for(make_model(tokenizer), tokenizer, args)
    capo.train()
    assert capo.capo.stats["steps"] == 2
    if bound is not None:
        assert capo.capo.stats["step_scale"] == 1.0
    for (name, a), b in zip(grpo.model.named_parameters(), capo.model.parameters()):
        assert torch.equal(a, b), name


def test_a_second_train_keeps_one_capo_and_logs_once_per_step(tokenizer, tmp_path):
    trainer = trainer_for(make_model(tokenizer), tokenizer, config(tmp_path, learning_rate=1e-2))
    appended: list[int] = []
    log = trainer.log

    def count_then_log(logs, *args):
        appended.append(len(trainer._metrics["train"]["capo/step_scale"]))
        return log(logs, *args)

    trainer.log = count_then_log
    trainer.train()
    capo = trainer.capo
    trainer.train()
    assert trainer.capo is capo and trainer.optimizer.optimizer is capo
    assert isinstance(capo.optimizer, torch.optim.AdamW)  # not accelerate's wrapper again
    assert capo.stats["steps"] == 4
    assert appended == [1, 1, 0, 1, 1, 0]  # each train() ends with a summary log


def test_adafactor_trains_within_the_trust_region(tokenizer, tmp_path):
    """The trust region with an optimizer curvopt cannot model: each step taken at full learning
    rate with its state kept aside, then shrunk to the bound."""
    args = config(tmp_path, optim="adafactor", learning_rate=0.1)
    trainer = trainer_for(make_model(tokenizer), tokenizer, args)
    steps = Steps(trainer)
    trainer.train()
    assert type(trainer.capo.optimizer).__name__ == "Adafactor"
    assert_bounded(steps, DEFAULT_MAX_POLICY_SHIFT)


def test_adafactor_with_token_rejection_raises_naming_the_trust_region(tokenizer, tmp_path):
    args = config(tmp_path, optim="adafactor", capo_levels=["token"], capo_max_policy_shift=None)
    trainer = trainer_for(make_model(tokenizer), tokenizer, args)
    with pytest.raises(TypeError, match=r"optim='adafactor'.*Adafactor.*capo_levels=\[\]"):
        trainer.train()


def test_a_step_not_taken_is_logged_as_skipped(tokenizer, tmp_path):
    """An infinite learning rate: the KL at every trial point is not finite, so no step is
    taken (the parameters stay as they were) and each is logged with skipped_frac 1."""
    args = config(tmp_path, learning_rate=math.inf)
    trainer = trainer_for(make_model(tokenizer), tokenizer, args)
    steps = Steps(trainer)
    with pytest.warns(RuntimeWarning, match="not taken"):
        trainer.train()
    for step in steps.steps:
        assert all(torch.equal(step["before"][n], step["after"][n]) for n in step["before"])
    assert trainer.capo.stats["skipped_steps"] == 2
    logged = [h for h in trainer.state.log_history if "capo/skipped_frac" in h]
    assert [h["capo/skipped_frac"] for h in logged] == [1.0, 1.0]
