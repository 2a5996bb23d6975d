"""The training loop: one optimizer step on a batch of completions, and one run.

A step: sample ``G`` completions per prompt, group advantages, then ``num_iterations``
optimizer steps on the clipped-ratio loss over the tokens the method keeps (:mod:`.methods`),
then what the step did to the policy (:func:`.measure.step_kl`). The first iteration's forward is
the policy that sampled the batch: its log-probabilities, detached, are the ratio's denominator
for every iteration (as TRL does), so no separate forward computes them.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import Config, Run
from .loss import group_advantages, policy_loss, token_logps
from .measure import Before, SignalMonitor, StepInputs, step_kl, summarise_steps
from .methods import METHODS, Method
from .rollout import Rollout, completion_logits, forward, greedy_accuracy, micro_batches, rollout
from .task import Task

__all__ = ["train", "train_step", "warmup_cosine"]


def warmup_cosine(steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier for 0-based step ``s``: a linear warm-up over ``w = max(1, ⌈ratio·steps⌉)``
    steps, ``(s + 1) / (w + 1)`` (so step 1 never runs at the full lr), then cosine to 0."""
    warmup = max(1, math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


@torch.no_grad()
def reference_logps(
    reference: nn.Module, batch: Rollout, chunks: list[slice], cfg: Config
) -> Tensor:
    """``log π_ref(a_t | h_t)`` ``[B, T]`` of the completions under the reference policy."""
    return torch.cat(
        [
            token_logps(
                completion_logits(reference, batch, rows), batch.completions[rows], cfg.temperature
            )
            for rows in chunks
        ]
    )


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    method: Method,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batch: Rollout,
    advantages: Tensor,
    ref: Tensor | None,
    cfg: Config,
) -> tuple[dict[str, float], Before]:
    """``num_iterations`` optimizer steps on one batch of completions: their mean statistics,
    and the policy before them (logits and head inputs kept when ``cfg.realised_kl``).

    ``ref``: the completions' log-probabilities ``[B, T]`` under the reference policy (None
    without a KL term).
    """
    chunks = micro_batches(batch, cfg.micro_batch)
    capo = method.family == "capo"
    sums: dict[str, float] = defaultdict(float)
    before = Before(keep=cfg.realised_kl)

    def chunk_loss(
        i: int, rows: slice, logits: Tensor, keep: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(
            token_logps(logits, batch.completions[rows], cfg.temperature),
            before.logps[i],
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

    def reevaluate(keeps: list[Tensor]) -> Callable[[], Tensor]:
        """A closure: the gradients again, with ``keeps`` as the step's own rejection left them
        (it clears their entries in place)."""

        def closure() -> Tensor:
            opt.zero_grad()
            losses = []
            for i, (rows, keep) in enumerate(zip(chunks, keeps)):
                loss = chunk_loss(i, rows, completion_logits(model, batch, rows), keep)[0]
                (loss / len(chunks)).backward()
                losses.append(loss.detach())
            clip()
            return torch.stack(losses).mean()

        return closure

    for iteration in range(cfg.num_iterations):
        keeps = []
        for i, rows in enumerate(chunks):
            logits, hidden = forward(model, batch, rows, hidden=method.hidden or before.keep)
            if iteration == 0:
                logps = token_logps(logits.detach(), batch.completions[rows], cfg.temperature)
                before.add(logps, logits, hidden, model.get_output_embeddings())
            keep = method.select(
                opt,
                logits,
                hidden,
                batch.completions[rows],
                advantages[rows],
                batch.mask[rows],
                # how CAPO recomputes these logits when it models more than the head
                forward=partial(completion_logits, batch=batch, rows=rows),
            )
            keeps.append(keep)
            loss, stats = chunk_loss(i, rows, logits, keep)
            (loss / len(chunks)).backward()
            sums["loss"] += loss.item() / len(chunks)
            sums["clip_frac"] += stats["clip_frac"].item() / len(chunks)
            sums["kl_ref"] += stats["kl"].item() / len(chunks)
        sums["grad_norm"] += clip()
        sums["lr"] += opt.param_groups[0]["lr"]
        opt.step(reevaluate(keeps) if method.reevaluates(cfg) else None)
        sched.step()
        opt.zero_grad()
        if capo:
            # which side of the baseline the rejections fall on (after the step's own)
            for rows, keep in zip(chunks, keeps):
                mask = batch.mask[rows]
                adv = advantages[rows, None].expand_as(mask)
                for side, sel in (("pos", mask & (adv > 0)), ("neg", mask & (adv < 0))):
                    sums[f"tokens_{side}"] += sel.sum().item()
                    sums[f"rejected_{side}"] += (sel & ~keep).sum().item()
            for key, value in method.stats(opt).items():
                sums[key] += value
    sides = {}
    if capo:
        for side in ("pos", "neg"):
            n = sums.pop(f"tokens_{side}")
            sides[f"rejected_frac_{side}"] = sums.pop(f"rejected_{side}") / n if n else 0.0
    out = {k: v / cfg.num_iterations for k, v in sums.items()} | sides
    if capo:
        # token counts add up over the iterations rather than average
        out["tokens"], out["kept_tokens"] = sums["tokens"], sums["kept_tokens"]
        out["skipped_steps"] = opt.stats["skipped_steps"]  # type: ignore[attr-defined]
    else:
        out["rejected_frac"] = 0.0
    return out, before


def train(
    run: Run,
    initial: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: Config,
    log: Callable[[dict], None],
    initial_accuracy: float | None = None,
) -> dict:
    """One run from a copy of ``initial``; returns its ``summary.json`` entry.

    ``initial_accuracy``: ``initial``'s test accuracy when already measured (it is the same for
    every run with the same attention kernel), else measured here.
    """
    method = METHODS[run.method]
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    model = copy.deepcopy(initial)
    if method.eager(cfg) and model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    # dropout off throughout: the policy that samples is the policy the loss differentiates
    model.eval()
    reference = initial if cfg.beta else None
    opt = method.optimizer(model, run.lr, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(run.steps, cfg.warmup_ratio))
    per_step = run.prompts * cfg.group
    eval_every = cfg.eval_every or cfg.conservative_prompts * cfg.group
    monitor = SignalMonitor(cfg.no_signal_steps, run.name, run.seed)

    eval_seconds = 0.0

    def evaluate() -> float:
        nonlocal eval_seconds
        began = time.time()
        accuracy = greedy_accuracy(model, tokenizer, task.test, task.max_new_tokens, task.check)
        eval_seconds += time.time() - began
        return accuracy

    curve = [[0, evaluate() if initial_accuracy is None else initial_accuracy]]
    tokens = kept = 0.0
    rows: list[dict] = []
    bar = tqdm(range(run.steps), desc=f"{run.name} seed {run.seed}", dynamic_ncols=True)
    for step in bar:
        began = time.time()
        batch = rollout(
            model,
            tokenizer,
            task.sample(rng, run.prompts),
            cfg.group,
            task.max_new_tokens,
            task.check,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
        )
        advantages = group_advantages(batch.rewards, cfg.group, scale=cfg.scale_rewards)
        chunks = micro_batches(batch, cfg.micro_batch)
        ref = None if reference is None else reference_logps(reference, batch, chunks, cfg)
        stats, before = train_step(model, opt, method, sched, batch, advantages, ref, cfg)
        if cfg.realised_kl:
            stats |= step_kl(model, StepInputs(batch, chunks, before), cfg.temperature)
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
            **monitor.update(step + 1, batch),
            **stats,
            # sampling, the update and its measurement; evaluation not included
            "step_seconds": time.time() - began,
        }
        crossed = completions // eval_every > (completions - per_step) // eval_every
        if crossed or step + 1 == run.steps:
            curve.append([completions, evaluate()])
            row["test_accuracy"] = curve[-1][1]
        log(row)
        rows.append(row)
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
        "label": method.label,
        "regime": run.regime,
        "seed": run.seed,
        "test_size": len(task.test),
        "attention": model.config._attn_implementation,
        "completions": run.steps * per_step,
        "steps": run.steps,
        "lr": run.lr,
        "completions_per_step": per_step,
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "rejected_frac": 1.0 - kept / tokens if tokens else 0.0,
        "curve": curve,
        "eval_seconds": eval_seconds,
        **summarise_steps(rows, method.bound(cfg)),
        "no_signal": monitor.report(),
    }
