"""GRPO on verifiable arithmetic, with and without CAPO, on a laptop CPU.

The experiment of the paper's Fig. 1 (Melo, Abate, Gal, ICLR 2026) at toy scale: a tiny Qwen2
model warm-started on two-digit addition is trained with GRPO in two regimes,

- conservative: learning rate η, ``conservative_prompts × group`` completions per step;
- aggressive: learning rate ``aggressive_lr_mult · η`` (5η) and 12× fewer completions per step,

and with CAPO in the aggressive regime. Every run sees the same number of training completions;
test accuracy (greedy decoding on a fixed held-out set) is plotted against them. Methods:

- ``grpo``: the clipped-ratio GRPO loss on every completion token;
- ``capo``: the paper's CAPO: the loss only on the tokens ``opt.select`` keeps (default: the
  paper's symmetric rule |m_H| < 1e-2, m_F < 1e-4 on the last layer's quadratic model);
- ``capo_step``: CAPO's curvature-aware step alone: no token is rejected, and each step is scaled
  so that its predicted KL is at most ``--max-policy-shift``.

CAPO changes two lines of the loop: the optimizer is wrapped, and the loss is computed on
``keep = opt.select(hidden, actions, advantages, mask, logits=logits)`` instead of ``mask``.

    python examples/grpo.py --quick          # one seed, a minute or two on 2 CPU cores
    python examples/grpo.py                  # five seeds
    python examples/grpo.py --methods grpo-aggressive capo-aggressive capo_step-aggressive
    python examples/grpo.py --model PATH --data problems.jsonl   # any local causal LM

Outputs in ``--out``: ``summary.json``, ``metrics.jsonl`` (one row per optimizer step and run),
``accuracy.png``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

# everything is built or loaded locally; never reach for the Hub (set before transformers loads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import arith
import policy
import report
import torch
from grpo_loss import LossType, group_advantages, policy_loss, token_logps
from rollout import Rollout, greedy_accuracy, rollout
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

import curvopt

#: what the per-step metrics keep of ``CAPO.stats`` (those present: some need options)
CAPO_STATS = (
    "rejected_frac",
    "tokens",
    "kept_tokens",
    "objective_shift_mean",
    "policy_shift_mean",
    "policy_shift_realised",
    "policy_shift_step_model",
    "step_policy_shift",
    "step_scale",
    "step_rejected",
)
METHODS = tuple(
    f"{method}-{regime}"
    for method in ("grpo", "capo", "capo_step")
    for regime in ("conservative", "aggressive")
)


@dataclass
class Config:
    """Command-line options (``--name`` or ``--name-with-dashes``; booleans take ``--no-name``)."""

    methods: list[str] = field(
        default_factory=lambda: [
            "grpo-conservative",
            "grpo-aggressive",
            "capo-aggressive",
            "capo_step-aggressive",
        ],
        metadata={
            "help": "runs to make, each METHOD-REGIME: grpo; capo (the paper's token rejection); "
            f"capo_step (CAPO's curvature-aware step alone); from {METHODS}"
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "RL seeds"})
    steps: int = field(
        default=1920,
        metadata={
            "help": "optimizer steps of the aggressive regime; every run trains on the same "
            "number of completions, steps × aggressive_prompts × group"
        },
    )
    quick: bool = field(
        default=False, metadata={"help": "one seed and fewer steps: a few minutes on 2 CPU cores"}
    )
    out: str = field(default="runs/grpo", metadata={"help": "output directory"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when present), cpu, cuda"})
    threads: int = field(
        default=1, metadata={"help": "CPU threads for torch (tiny models run fastest on one)"}
    )

    # the task and the policy
    model: str | None = field(
        default=None,
        metadata={"help": "a local causal-LM directory with its tokenizer (default: warm start)"},
    )
    data: str | None = field(
        default=None,
        metadata={"help": 'JSONL with {"prompt", "answer"} rows (default: generated addition)'},
    )
    digits: int = field(default=2, metadata={"help": "operand digits of the generated task"})
    test_size: int = field(default=256, metadata={"help": "held-out problems for test accuracy"})
    max_new_tokens: int = field(
        default=0, metadata={"help": "completion budget (0: the task's, 64 for --data)"}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "warm-start cache (default: $CURVOPT_CACHE or ~/.cache/curvopt)"},
    )
    warm_target: float = field(
        default=0.35, metadata={"help": "warm start stops at this validation accuracy"}
    )

    # GRPO
    lr: float = field(default=6e-5, metadata={"help": "conservative learning rate η"})
    aggressive_lr_mult: float = field(default=5.0, metadata={"help": "aggressive lr / η"})
    group: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    conservative_prompts: int = field(default=24, metadata={"help": "prompts per step"})
    aggressive_prompts: int = field(default=2, metadata={"help": "prompts per step"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sampling top-k (0: off)"})
    num_iterations: int = field(
        default=1, metadata={"help": "optimizer steps per batch of completions (μ)"}
    )
    epsilon_low: float = field(default=0.2, metadata={"help": "ratio clip below"})
    epsilon_high: float = field(default=0.2, metadata={"help": "ratio clip above"})
    loss_type: LossType = field(default="grpo", metadata={"help": "loss normalisation"})
    scale_rewards: bool = field(
        default=True, metadata={"help": "divide advantages by the group's reward std"}
    )
    beta: float = field(default=0.0, metadata={"help": "KL-to-initial-policy coefficient"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    micro_batch: int = field(
        default=0, metadata={"help": "completions per forward (0: the whole batch)"}
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "completions between evaluations (0: one conservative batch)"},
    )
    realised_kl: bool = field(
        default=True,
        metadata={"help": "log the step's KL on the batch's tokens (one extra forward)"},
    )

    # CAPO
    capo_rule: Literal["symmetric", "theorem"] = field(
        default="symmetric", metadata={"help": "symmetric: |m_H| < δ_H and m_F < δ_F"}
    )
    delta_h: float = field(default=1e-2, metadata={"help": "objective-shift threshold δ_H"})
    delta_f: float = field(default=1e-4, metadata={"help": "policy-shift threshold δ_F"})
    capo_levels: list[str] = field(
        default_factory=lambda: ["token"], metadata={"help": "token, sequence, batch"}
    )
    capo_direction: Literal["frozen", "exact", "shadow"] = field(
        default="frozen", metadata={"help": "candidate-update model"}
    )
    capo_fisher: Literal["empirical", "true"] = field(
        default="empirical", metadata={"help": "Fisher estimate of the policy shift"}
    )
    capo_params: Literal["head", "all"] = field(
        default="head",
        metadata={
            "help": "parameters CAPO models: the head (the paper's closed forms) or all of the "
            "model (exact per-token candidates via torch.func; small models only)"
        },
    )
    max_policy_shift: float = field(
        default=1e-7,
        metadata={
            "help": "capo_step: scale each step so the predicted mean KL of the update is at most "
            "this; the KL of the parameters CAPO models, with --capo-params head the head's share"
        },
    )
    step_reject_frac: float = field(
        default=0.0,
        metadata={
            "help": "capo_step: before scaling, reject up to this fraction of the tokens whose "
            "predicted KL under the actual update exceeds --max-policy-shift, largest first"
        },
    )


#: what ``--quick`` changes (options given on the command line still win)
QUICK = {"seeds": [0], "steps": 960, "out": "runs/grpo-quick"}


@dataclass
class Run:
    """One training run: a method in a regime with a seed."""

    method: Literal["grpo", "capo", "capo_step"]
    regime: Literal["conservative", "aggressive"]
    seed: int
    lr: float
    prompts: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.regime}"

    @property
    def family(self) -> str:
        """``"grpo"`` or ``"capo"`` (either CAPO mechanism), as ``summary.json`` names it."""
        return "grpo" if self.method == "grpo" else "capo"


def parse(argv: list[str] | None = None) -> Config:
    """The config from ``argv``; ``--quick`` first swaps in the quick defaults."""
    parser = HfArgumentParser(Config)
    (cfg,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    if cfg.quick:
        parser.set_defaults(**QUICK)
        (cfg,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        parser.error(f"--methods: expected names from {METHODS}, got {bad}")
    return cfg


def plan(cfg: Config) -> list[Run]:
    """The runs of ``cfg``, all on the same completion budget."""
    budget = cfg.steps * cfg.aggressive_prompts * cfg.group
    runs = []
    for seed in cfg.seeds:
        for name in cfg.methods:
            method, regime = name.rsplit("-", 1)
            aggressive = regime == "aggressive"
            prompts = cfg.aggressive_prompts if aggressive else cfg.conservative_prompts
            lr = cfg.lr * (cfg.aggressive_lr_mult if aggressive else 1.0)
            steps = max(1, budget // (prompts * cfg.group))
            runs.append(Run(method, regime, seed, lr, prompts, steps))  # type: ignore[arg-type]
    return runs


def warmup_cosine(steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ``warmup_ratio · steps``, then cosine to 0."""
    warmup = max(1, math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def make_optimizer(model: PreTrainedModel, run: Run, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, wrapped in CAPO for the CAPO runs (the only place the methods differ).

    ``capo``: the paper's token rejection (``cfg``'s rule, thresholds and levels), full steps.
    ``capo_step``: no rejection; every step scaled so its predicted KL is at most
    ``cfg.max_policy_shift``.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=cfg.weight_decay)
    if run.method == "grpo":
        return opt
    step = run.method == "capo_step"
    return curvopt.CAPO(
        opt,
        head=model.get_output_embeddings(),
        rule=cfg.capo_rule,
        delta_h=cfg.delta_h,
        delta_f=cfg.delta_f,
        # capo_step: no candidate models, no rejection; the step controller alone
        levels=() if step else tuple(cfg.capo_levels),
        direction=cfg.capo_direction,
        fisher=cfg.capo_fisher,
        # the loss optimises softmax(logits / temperature): tell CAPO which policy it models
        temperature=cfg.temperature,
        track_realised=True,
        params=cfg.capo_params,
        model=model,
        max_policy_shift=cfg.max_policy_shift if step else None,
        shift_estimate="jvp",
        step_reject_frac=cfg.step_reject_frac if step else 0.0,
    )


def forward(
    model: PreTrainedModel, batch: Rollout, rows: slice, hidden: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head logits ``[b, T, V]`` at the positions that predict the completion tokens, and the
    states entering the head ``[b, T, H]`` when ``hidden``."""
    out = model(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        output_hidden_states=hidden,
    )
    # position t predicts token t + 1
    span = slice(batch.prompt_width - 1, -1)
    states = out.hidden_states[-1][:, span] if hidden else None
    return out.logits[:, span], states


def completion_logits(model: PreTrainedModel, batch: Rollout, rows: slice) -> torch.Tensor:
    """The head logits ``[b, T, V]`` of ``batch[rows]``'s completion tokens under ``model``."""
    return forward(model, batch, rows, hidden=False)[0]


def micro_batches(batch: Rollout, cfg: Config) -> list[slice]:
    """Row ranges of ``cfg.micro_batch`` completions (one range without micro-batching)."""
    size = batch.completions.shape[0]
    width = cfg.micro_batch or size
    return [slice(i, i + width) for i in range(0, size, width)]


@torch.no_grad()
def batch_logps(model: PreTrainedModel, batch: Rollout, cfg: Config) -> torch.Tensor:
    """``log π(a_t | h_t)`` ``[B, T]`` of the completions under ``model`` (no grad)."""
    return torch.cat(
        [
            token_logps(
                forward(model, batch, rows, False)[0], batch.completions[rows], cfg.temperature
            )
            for rows in micro_batches(batch, cfg)
        ]
    )


def train_step(
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batch: Rollout,
    advantages: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    cfg: Config,
) -> dict[str, float]:
    """``num_iterations`` optimizer steps on one batch of completions; their mean statistics.

    ``old`` and ``ref`` are the completions' log-probabilities ``[B, T]`` under the sampling
    policy and the reference policy (None without a KL term).
    """
    chunks = micro_batches(batch, cfg)
    capo = isinstance(opt, curvopt.CAPO)
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    def chunk_loss(
        rows: slice, logits: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_loss(
            token_logps(logits, batch.completions[rows], cfg.temperature),
            old[rows],
            advantages[rows],
            keep,
            loss_type=cfg.loss_type,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high,
            max_completion_length=batch.max_new_tokens,
            ref_logps=None if ref is None else ref[rows],
            beta=cfg.beta,
        )

    def clip() -> float:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()

    def reevaluate(keeps: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A closure: the gradients again, with ``keeps`` as the step's own rejection left them
        (it clears their entries in place)."""

        def closure() -> torch.Tensor:
            opt.zero_grad()
            losses = []
            for rows, keep in zip(chunks, keeps):
                loss = chunk_loss(rows, completion_logits(model, batch, rows), keep)[0]
                (loss / len(chunks)).backward()
                losses.append(loss.detach())
            clip()
            return torch.stack(losses).mean()

        return closure

    for _ in range(cfg.num_iterations):
        keeps = []
        for rows in chunks:
            logits, hidden = forward(model, batch, rows, hidden=capo)
            actions, mask = batch.completions[rows], batch.mask[rows]
            keep = mask
            if capo:
                keep = opt.select(
                    hidden,
                    actions,
                    advantages[rows],
                    mask,
                    logits=logits,
                    # how CAPO recomputes these logits when it models more than the head
                    forward=partial(completion_logits, batch=batch, rows=rows),
                )
            keeps.append(keep)
            loss, stats = chunk_loss(rows, logits, keep)
            (loss / len(chunks)).backward()
            add("loss", loss.item() / len(chunks))
            add("clip_frac", stats["clip_frac"].item() / len(chunks))
            add("kl_ref", stats["kl"].item() / len(chunks))
        add("grad_norm", clip())
        add("lr", opt.param_groups[0]["lr"])
        opt.step(reevaluate(keeps) if capo and opt.step_reject_frac else None)
        sched.step()
        opt.zero_grad()
        if capo:
            # which side of the baseline CAPO's rejections fall on (after the step's own)
            for rows, keep in zip(chunks, keeps):
                mask = batch.mask[rows]
                adv = advantages[rows, None].expand_as(mask)
                for side, sel in (("pos", mask & (adv > 0)), ("neg", mask & (adv < 0))):
                    add(f"tokens_{side}", sel.sum().item())
                    add(f"rejected_{side}", (sel & ~keep).sum().item())
            s = opt.stats
            for key in CAPO_STATS:
                if key in s:
                    add(key, s[key])
    sides = {}
    if capo:
        for side in ("pos", "neg"):
            n = sums.pop(f"tokens_{side}")
            sides[f"rejected_frac_{side}"] = sums.pop(f"rejected_{side}") / n if n else 0.0
    out = {k: v / cfg.num_iterations for k, v in sums.items()} | sides
    if capo:
        # token counts add up over the iterations rather than average
        out["tokens"], out["kept_tokens"] = sums["tokens"], sums["kept_tokens"]
        out["skipped_steps"] = opt.stats["skipped_steps"]
    else:
        out["rejected_frac"] = 0.0
    return out


@torch.no_grad()
def step_kl(model: PreTrainedModel, batch: Rollout, before: torch.Tensor, cfg: Config) -> float:
    """k3 estimate of KL(π_before ‖ π_after) on the sampled completion tokens.

    ``before`` are the tokens' log-probabilities when they were sampled; the completions are
    samples of π_before (exactly so with ``top_k=0``), so the mean of ``r − 1 − log r``
    (``r = π_after / π_before``) is an unbiased, non-negative estimate that needs one forward and
    no ``[B, T, V]`` storage.
    """
    after = batch_logps(model, batch, cfg)
    log_r = after - before
    k3 = (torch.exp(log_r) - 1 - log_r) * batch.mask
    return (k3.sum() / batch.mask.sum().clamp(min=1)).item()


def load_policy(
    cfg: Config, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, arith.Task, str]:
    """The starting policy, its tokenizer, the task, and where the policy came from."""
    if cfg.data is not None:
        task = arith.Task.from_jsonl(cfg.data, cfg.test_size, cfg.max_new_tokens or 64)
    else:
        task = arith.Task.addition(cfg.digits, cfg.test_size)
        if cfg.max_new_tokens:
            task = arith.Task(task.sample, task.test, cfg.max_new_tokens)
    if cfg.model is not None:
        model, tokenizer = policy.load_pretrained(cfg.model, device)
        return model, tokenizer, task, cfg.model
    spec = policy.WarmStart(
        digits=cfg.digits, test_size=cfg.test_size, target_accuracy=cfg.warm_target
    )
    cache = Path(cfg.cache_dir) if cfg.cache_dir else policy.default_cache_dir()
    model, tokenizer, path = policy.load_or_warm_start(spec, cache, device)
    return model, tokenizer, task, str(path)


def train(
    run: Run,
    initial: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: arith.Task,
    cfg: Config,
    log: Callable[[dict], None],
) -> dict:
    """One run from a copy of ``initial``; returns its ``summary.json`` entry."""
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    model = copy.deepcopy(initial)
    # dropout off throughout: the policy that samples is the policy the loss differentiates
    model.eval()
    reference = initial if cfg.beta else None
    opt = make_optimizer(model, run, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(run.steps, cfg.warmup_ratio))
    per_step = run.prompts * cfg.group
    eval_every = cfg.eval_every or cfg.conservative_prompts * cfg.group

    def evaluate() -> float:
        return greedy_accuracy(model, tokenizer, task.test, task.max_new_tokens)

    curve = [[0, evaluate()]]
    tokens = kept = 0.0
    bar = tqdm(range(run.steps), desc=f"{run.name} seed {run.seed}", dynamic_ncols=True)
    for step in bar:
        batch = rollout(
            model,
            tokenizer,
            task.sample(rng, run.prompts),
            cfg.group,
            task.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
        )
        advantages = group_advantages(batch.rewards, cfg.group, scale=cfg.scale_rewards)
        old = batch_logps(model, batch, cfg)
        ref = batch_logps(reference, batch, cfg) if reference is not None else None
        stats = train_step(model, opt, sched, batch, advantages, old, ref, cfg)
        if cfg.realised_kl:
            stats["kl_realised"] = step_kl(model, batch, old, cfg)
        tokens += stats.get("tokens", 0.0)
        kept += stats.get("kept_tokens", 0.0)
        completions = (step + 1) * per_step
        row = {
            "method": run.family,
            "variant": run.method,
            "regime": run.regime,
            "seed": run.seed,
            "step": step + 1,
            "completions": completions,
            "reward_mean": batch.rewards.mean().item(),
            "completion_length": batch.mask.sum(1).float().mean().item(),
            **stats,
        }
        crossed = completions // eval_every > (completions - per_step) // eval_every
        if crossed or step + 1 == run.steps:
            curve.append([completions, evaluate()])
            row["test_accuracy"] = curve[-1][1]
        log(row)
        bar.set_postfix(
            acc=f"{curve[-1][1]:.2f}",
            reward=f"{row['reward_mean']:.2f}",
            rejected=f"{stats['rejected_frac']:.1%}",
        )
    bar.close()
    accuracies = [a for _, a in curve]
    return {
        "method": run.family,
        "variant": run.method,
        "regime": run.regime,
        "seed": run.seed,
        "completions": run.steps * per_step,
        "steps": run.steps,
        "lr": run.lr,
        "completions_per_step": per_step,
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "rejected_frac": 1.0 - kept / tokens if tokens else 0.0,
        "curve": curve,
    }


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict:
    """Run every planned run, write the outputs, print the table; returns the summary."""
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    # our own bars only: loading a local checkpoint needs no progress report
    hf_logging.disable_progress_bar()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    initial, tokenizer, task, source = load_policy(cfg, device)
    planned = plan(cfg)
    print(
        f"policy {source} on {device}; {len(task.test)} test problems; {len(planned)} runs of "
        f"{planned[0].steps * planned[0].prompts * cfg.group} training completions each"
    )
    runs = []
    with (out / "metrics.jsonl").open("w") as metrics:

        def log(row: dict) -> None:
            metrics.write(json.dumps(row) + "\n")

        for run in planned:
            began = time.time()
            result = train(run, initial, tokenizer, task, cfg, log)
            result["seconds"] = time.time() - began
            runs.append(result)
    summary = {
        "config": asdict(cfg),
        "policy": source,
        "seconds": time.time() - start,
        "runs": runs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report.plot(summary, out / "metrics.jsonl", out / "accuracy.png")
    print(report.table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'accuracy.png'}")
    print(f"total {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
