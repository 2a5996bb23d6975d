"""CAPOGRPOTrainer: TRL's own loss over the kept tokens only, for every loss type of trl 1.16;
the CAPO settings on the command line; the example's smoke run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import Tensor

pytest.importorskip("trl")

import trl_capo as example
from transformers import HfArgumentParser, PretrainedConfig, Qwen2ForCausalLM
from trl import GRPOTrainer

import curvopt
from curvopt.integrations.trl import (
    GLOBAL_NORMALISER,
    CAPOConfig,
    CAPOGRPOTrainer,
    logit_transform,
)
from curvopt.settings import DEFAULT_MAX_POLICY_SHIFT

ROOT = Path(__file__).resolve().parents[2]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
TEMPERATURE = 0.7
LR = 1e-3
B, P, T = 4, 3, 6
# The paper's token rejection, without the trust region (the trainer's default)
TOKEN_REJECTION = dict(capo_levels=["token"], capo_max_policy_shift=None)


@pytest.fixture(scope="module")
def tokenizer():
    return example.make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny policy saved to disk: with beta > 0 TRL loads the reference model from its path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    example.make_model(tokenizer, hidden_size=32, layers=1).save_pretrained(path)
    return path


def _config(tmp_path, **overrides) -> CAPOConfig:
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=T,
        num_iterations=2,
        temperature=TEMPERATURE,
        beta=0.05,
        learning_rate=LR,
    )
    settings.update(overrides)
    return CAPOConfig(**settings)


def _trainer(model, tokenizer, args: CAPOConfig) -> CAPOGRPOTrainer:
    trainer = CAPOGRPOTrainer(
        model=model,
        reward_funcs=example.arithmetic_reward,
        args=args,
        train_dataset=example.make_problems(8, 1, 0),
        processing_class=tokenizer,
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop before each step
    return trainer


def _inputs(model, tools: bool = False, seed: int = 1) -> dict:
    """One buffered GRPO micro-batch: a left-padded prompt, completions of different lengths,
    mixed advantages, old and reference log-probabilities away from the current ones; with
    ``tools``, tool-output tokens inside two completions (attended to, out of the loss)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(2, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[0, 0], prompt_mask[0, 0] = 0, 0
    completion_ids = torch.randint(2, vocab, (B, T), generator=g)
    lengths = torch.tensor([6, 4, 5, 2])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    with torch.no_grad():
        logits = model(
            torch.cat([prompt_ids, completion_ids], 1),
            attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        ).logits[:, P - 1 : -1]
    logps = torch.log_softmax(logits / TEMPERATURE, -1)
    logps = logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": logps + 0.1 * torch.randn(B, T, generator=g),
        "ref_per_token_logps": logps + 0.2 * torch.randn(B, T, generator=g),
    }
    if tools:
        tool_mask = torch.ones(B, T, dtype=torch.long)
        tool_mask[0, 1:3] = tool_mask[2, 2:4] = 0
        inputs["tool_mask"] = tool_mask
        inputs["num_items_in_batch"] = (completion_mask * tool_mask).sum()
    return inputs


def _loss_mask(inputs: dict) -> Tensor:
    """The tokens TRL trains on."""
    return (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool()


def _expected_keep(model, inputs: dict, delta_f: float | None = None) -> tuple[Tensor, float]:
    """The keep mask from an independent forward and tracker, and its δ_F (default: between two
    tokens' m_F, to reject about half of them)."""
    mask = _loss_mask(inputs)
    with torch.no_grad():
        states = model.model(
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        ).last_hidden_state[:, P - 1 : -1]
    # the trainer's optimizer before its first step: AdamW, no weight decay (TrainingArguments')
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    tracker = curvopt.CurvatureTracker(model.lm_head, optimizer, temperature=TEMPERATURE)
    args = (states, inputs["completion_ids"], inputs["advantages"], mask)
    if delta_f is None:
        m_f = tracker.quadratic_model(*args).policy_shift[mask].sort().values
        middle = m_f.numel() // 2
        delta_f = float(m_f[middle - 1] + m_f[middle]) / 2
    keep = curvopt.SampleRejector("theorem", -1e9, delta_f).select(tracker, *args).keep
    return keep, delta_f


@pytest.mark.parametrize(
    ("loss_type", "tools"), [(t, False) for t in LOSS_TYPES] + [("bnpo", True)]
)
def test_gradient_is_trl_loss_over_kept_tokens(loss_type, tools, model_dir, tokenizer, tmp_path):
    """The step's gradient and logged loss are TRL's own loss with its loss mask replaced by the
    keep mask (attention unchanged; dapo/cispo/vespo normalised by the kept token count); the loss
    forward is the only forward, and the buffered inputs are left as they were."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    model.gradient_checkpointing_enable()
    inputs = _inputs(model, tools)
    keep, delta_f = _expected_keep(model, inputs)
    assert 0 < keep.sum() < _loss_mask(inputs).sum()
    sequence = "sequence" if loss_type == "luspo" else "token"
    args = _config(
        tmp_path,
        loss_type=loss_type,
        importance_sampling_level=sequence,
        **TOKEN_REJECTION,
        capo_delta_h=-1e9,
        capo_delta_f=delta_f,
    )
    trainer = _trainer(model, tokenizer, args)
    snapshot = {k: v.clone() for k, v in inputs.items()}
    forwards = []
    counter = model.model.register_forward_hook(lambda *_: forwards.append(1))
    # the second of num_iterations=2 passes: the micro-batch comes from the buffer, no generation
    trainer._buffered_inputs, trainer._step = [inputs], 1
    loss = trainer.training_step(model, None)
    counter.remove()
    grads = [p.grad.clone() for p in model.parameters()]

    assert len(forwards) == 1
    assert trainer.capo.stats["kept_tokens"] == keep.sum()
    assert inputs.keys() == snapshot.keys()
    assert all(torch.equal(inputs[k], snapshot[k]) for k in inputs)

    model.zero_grad()
    reference = {**inputs, "tool_mask": keep.long()}  # TRL's loss mask, attention untouched
    if loss_type in GLOBAL_NORMALISER:
        reference["num_items_in_batch"] = keep.sum()
    expected = GRPOTrainer._compute_loss(trainer, model, reference)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_the_default_keeps_trl_loss_mask_and_measures_without_logits(
    model_dir, tokenizer, tmp_path
):
    """The default, the trust region alone: every token TRL trains on is kept, and each trial
    forward of the step runs the model with logits_to_keep=1, so the head never forms
    [B, T, V]."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    inputs = _inputs(model)
    trainer = _trainer(model, tokenizer, _config(tmp_path, learning_rate=1.0))
    assert trainer.capo.rejector.levels == () and trainer.capo.tracker is None
    trainer._buffered_inputs, trainer._step = [inputs], 1
    trainer.training_step(model, None)
    assert trainer.capo.stats["kept_tokens"] == _loss_mask(inputs).sum()
    assert "objective_shift_mean" not in trainer.capo.stats
    head_outputs = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: head_outputs.append(out.shape))
    trainer.capo.step()
    hook.remove()
    stats = trainer.capo.stats
    assert len(head_outputs) == stats["trust_region_trials"] >= 2
    assert all(shape == (B, 1, model.config.vocab_size) for shape in head_outputs)
    assert 0 < stats["step_scale"] < 1
    assert stats["policy_shift_realised"] <= 1.1 * trainer.capo.max_policy_shift


def test_the_output_layers_predicted_bound_is_still_available(model_dir, tokenizer, tmp_path):
    """``capo_shift_estimate="jvp"``: the step scaled by the output layer's quadratic model."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    args = _config(tmp_path, capo_shift_estimate="jvp", capo_max_policy_shift=1e-12)
    trainer = _trainer(model, tokenizer, args)
    assert trainer.capo.trust_region is None and trainer.capo.predicted is not None
    trainer._buffered_inputs, trainer._step = [_inputs(model)], 1
    trainer.training_step(model, None)
    trainer.capo.step()
    assert 0 < trainer.capo.stats["step_scale"] < 1


def test_dapo_normalises_by_the_kept_tokens_of_the_whole_step(model_dir, tokenizer, tmp_path):
    """Two accumulated micro-batches: the step's gradient is the sum of TRL's dapo losses with the
    kept token count of the whole step as normaliser, and the logged losses add up to it."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    batches = [_inputs(model, seed=1), _inputs(model, seed=2)]
    keep0, delta_f = _expected_keep(model, batches[0])
    keeps = [keep0, _expected_keep(model, batches[1], delta_f)[0]]
    tokens = sum(_loss_mask(b).sum() for b in batches)
    kept = sum(k.sum() for k in keeps)
    assert 0 < kept < tokens
    for b in batches:  # TRL counts the generation batch: both micro-batches
        b["num_items_in_batch"] = tokens
    args = _config(
        tmp_path,
        loss_type="dapo",
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        **TOKEN_REJECTION,
        capo_delta_h=-1e9,
        capo_delta_f=delta_f,
    )
    trainer = _trainer(model, tokenizer, args)
    trainer.current_gradient_accumulation_steps = 2
    trainer._buffered_inputs, trainer._step = batches, 2  # second iteration over the buffer
    sync = trainer.accelerator.gradient_state
    logged = 0.0
    for last in (False, True):
        sync._set_sync_gradients(last)  # as Trainer's loop does for each micro-batch
        logged += float(trainer.training_step(model, None))
    grads = [p.grad.clone() for p in model.parameters()]
    assert trainer.capo.stats["kept_tokens"] == kept

    model.zero_grad()
    expected = 0.0
    for b, keep in zip(batches, keeps):
        loss = GRPOTrainer._compute_loss(
            trainer, model, {**b, "tool_mask": keep.long(), "num_items_in_batch": kept}
        )
        loss.backward()
        expected += float(loss)
    assert logged == pytest.approx(expected, rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_policy_is_the_one_trl_optimises(model_dir, tokenizer, tmp_path):
    trainer = _trainer(Qwen2ForCausalLM.from_pretrained(model_dir), tokenizer, _config(tmp_path))
    transform = trainer.capo.transform
    assert (transform.temperature, transform.scale, transform.softcap) == (TEMPERATURE, 1.0, None)
    assert trainer.capo.head is trainer.model.lm_head


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, (1.0, None)),
        ({"final_logit_softcapping": 30.0}, (1.0, 30.0)),
        ({"logit_scale": 0.25, "final_logit_softcapping": 30.0}, (0.25, 30.0)),
        ({"output_multiplier": 2.0}, (2.0, None)),
        ({"logits_scaling": 4.0}, (0.25, None)),
    ],
)
def test_logit_transform_reads_the_model_config(attributes, expected):
    class Model:
        config = PretrainedConfig(**attributes)

    assert logit_transform(Model()) == expected


def test_config_parses_from_the_command_line(tmp_path):
    parser = HfArgumentParser(CAPOConfig)
    command_line = (
        f"--output_dir {tmp_path} --bf16 false --capo_rule symmetric --capo_delta_h 1e-2 "
        "--capo_delta_f 2e-4 --capo_levels token sequence --capo_top_k 50 --capo_fisher true "
        "--capo_direction shadow --capo_track_realised --capo_max_policy_shift 3e-4 "
        "--capo_shift_estimate jvp"
    )
    (args,) = parser.parse_args_into_dataclasses(command_line.split())
    assert (args.capo_rule, args.capo_delta_h, args.capo_delta_f) == ("symmetric", 1e-2, 2e-4)
    assert (args.capo_levels, args.capo_top_k) == (["token", "sequence"], 50)
    assert (args.capo_fisher, args.capo_direction) == ("true", "shadow")
    assert args.capo_track_realised
    assert (args.capo_max_policy_shift, args.capo_shift_estimate) == (3e-4, "jvp")
    paper = f"--output_dir {tmp_path} --bf16 false --capo_levels token --capo_max_policy_shift none"
    (args,) = parser.parse_args_into_dataclasses(paper.split())
    assert (args.capo_levels, args.capo_max_policy_shift) == (["token"], None)
    defaults = _config(tmp_path)
    assert (defaults.capo_levels, defaults.capo_max_policy_shift) == ([], DEFAULT_MAX_POLICY_SHIFT)
    assert (defaults.capo_shift_estimate, defaults.capo_rule, defaults.capo_delta_f) == (
        "measured",
        "theorem",
        1e-4,
    )
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(f"--output_dir {tmp_path} --capo_rule x".split())
    with pytest.raises(ValueError, match="levels"):
        _config(tmp_path, capo_levels=["token", "tokens"])
    with pytest.raises(ValueError, match="capo_max_policy_shift"):
        _config(tmp_path, capo_max_policy_shift="off")
    with pytest.raises(ValueError, match="capo_max_policy_shift"):
        _config(tmp_path, capo_max_policy_shift=0.0)


def test_a_tied_head_needs_no_flag_and_the_token_models_warn(tokenizer, tmp_path):
    """Tied embeddings train with the trust region without a word; token rejection warns that
    its model leaves out the embedding's share; capo_allow_tied_head is a deprecated no-op."""
    torch.manual_seed(0)
    model = example.make_model(tokenizer, hidden_size=32, layers=1)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer(model, tokenizer, _config(tmp_path, beta=0.0))
    with pytest.warns(UserWarning, match="tied to the input embedding.*embedding's share"):
        trainer = _trainer(model, tokenizer, _config(tmp_path, beta=0.0, **TOKEN_REJECTION))
    assert trainer.capo.tracker.params[0] is model.model.embed_tokens.weight
    with pytest.warns(DeprecationWarning, match="capo_allow_tied_head"):
        args = _config(tmp_path, capo_allow_tied_head=True)
    assert args.capo_levels == []


@pytest.mark.parametrize(
    ("attribute", "backend"),
    [
        ("is_deepspeed_enabled", "DeepSpeed"),
        ("is_fsdp_enabled", "FSDP"),
        ("is_distributed_loading_by_transformers", "tensor parallelism"),
    ],
)
def test_sharding_backends_raise_naming_what_is_supported(
    attribute, backend, model_dir, tokenizer, tmp_path
):
    trainer = _trainer(Qwen2ForCausalLM.from_pretrained(model_dir), tokenizer, _config(tmp_path))
    setattr(trainer, attribute, True)
    with pytest.raises(ValueError, match=f"not support .*{backend}.*one process or with DDP"):
        trainer._check_supported()


def test_global_normaliser_with_entropy_bonus_raises_with_token_rejection(
    model_dir, tokenizer, tmp_path
):
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="entropy bonus"):
        _trainer(
            model,
            tokenizer,
            _config(tmp_path, loss_type="dapo", entropy_coef=0.01, **TOKEN_REJECTION),
        )
    _trainer(model, tokenizer, _config(tmp_path, loss_type="bnpo", entropy_coef=0.01))
    # the trust region alone keeps every token: nothing to renormalise
    _trainer(model, tokenizer, _config(tmp_path, loss_type="dapo", entropy_coef=0.01))


def test_smoke_run_prints_the_trust_region_metrics(tmp_path, capsys):
    """``examples/trl_capo.py --smoke``: the default configuration, the trust region, bounds both
    steps and prints the step scale and the realised KL."""
    trainer = example.main(["--smoke", "--output_dir", str(tmp_path)])
    assert trainer.optimizer.optimizer is trainer.capo  # accelerate wraps CAPO, which steps
    assert trainer.capo.stats["steps"] == 2
    bound = trainer.capo.max_policy_shift
    assert bound == DEFAULT_MAX_POLICY_SHIFT
    logged = [h for h in trainer.state.log_history if "capo/skipped_frac" in h]
    assert len(logged) == 2
    for entry in logged:
        assert 0 < entry["capo/step_scale"] <= 1 and entry["capo/skipped_frac"] == 0
        assert 0 < entry["capo/policy_shift_realised"] <= 1.1 * bound
        assert entry["capo/step_policy_shift"] >= entry["capo/policy_shift_realised"]
    printed = capsys.readouterr().out
    assert re.search(r"^capo/step_scale\s+\S+$", printed, flags=re.M)
    assert re.search(r"^capo/policy_shift_realised\s+\S+$", printed, flags=re.M)


def test_two_processes_log_the_same_global_metrics(tmp_path):
    """Under DDP (two CPU processes, gloo) training runs and every rank logs the same CAPO
    metrics, reduced over both ranks' different completions. Each rank prints to its own file
    (two processes printing to one pipe can interleave their lines on a loaded machine), and the
    run may take its time there."""
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [f"--log-dir={logs}", "--redirects=3"]
    command += [str(ROOT / "examples" / "trl_capo.py"), "--smoke", "--output_dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    errors = "".join(p.read_text()[-3000:] for p in sorted(logs.rglob("stderr.log")))
    assert run.returncode == 0, run.stderr[-3000:] + errors
    outputs = sorted(logs.rglob("stdout.log"))
    assert len(outputs) == 2, outputs
    printed = []
    for output in outputs:
        metrics = defaultdict(list)
        for line in output.read_text().splitlines():
            match = re.fullmatch(r"(capo/\w+)\s+(\S+)", line.strip())
            if match:
                metrics[match[1]].append(float(match[2]))
        printed.append(metrics)
    assert "capo/rejected_frac" in printed[0]
    assert printed[0] == printed[1]
    for values in printed[0].values():
        assert len(values) == 1 and math.isfinite(values[0])
