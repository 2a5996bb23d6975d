"""The example's entry point: load the policy and task, check the plan fits, run, report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from . import arith, chat, policy, report, smollm2
from .config import Config, Run, parse, plan
from .methods import METHODS, candidate_memory
from .task import Task, answer_checker, chat_renderer, from_rows, last_number, load_jsonl
from .task import regex_extractor as regex
from .train import train

__all__ = ["available_memory", "check_memory", "load_policy", "main", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(
    cfg: Config, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Task, str]:
    """The starting policy, its tokenizer, the task (prompts rendered for the policy), and the
    policy's name (``summary.json``'s ``policy``)."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else policy.default_cache_dir()
    if cfg.model is None:
        spec = policy.WarmStart(
            digits=cfg.digits, test_size=cfg.test_size or 256, target_accuracy=cfg.warm_target
        )
        model, tokenizer, path = policy.load_or_warm_start(spec, cache, device)
        source = str(path)
    else:
        path = smollm2.checkpoint(cache) if cfg.model == "smollm2" else Path(cfg.model)
        model, tokenizer = policy.load_pretrained(path, device)
        source = smollm2.NAME if cfg.model == "smollm2" else cfg.model
    check = answer_checker(regex(cfg.answer_regex) if cfg.answer_regex else last_number)
    if cfg.data is not None:
        task = from_rows(load_jsonl(cfg.data), cfg.test_size, cfg.max_new_tokens or 64, check)
    elif cfg.task == "addition" or (cfg.task == "auto" and cfg.model is None):
        task = arith.addition(cfg.digits, cfg.test_size or 256)
        if cfg.answer_regex:
            task = Task(task.sample, task.test, task.max_new_tokens, check)
    else:
        kind = chat.DEFAULT if cfg.task == "auto" else cfg.task
        task = chat.task(kind, cfg.test_size or 256, check)
    if cfg.max_new_tokens:
        task = Task(task.sample, task.test, cfg.max_new_tokens, task.check)
    return model, tokenizer, task.rendered(chat_renderer(tokenizer, cfg.chat_template)), source


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(
    model: PreTrainedModel, task: Task, runs: list[Run], cfg: Config, free: int
) -> None:
    """Refuse, before any run, a plan whose exact whole-model candidates (``capo`` with
    ``--capo-params all``) would not fit in ``free`` bytes; ``SystemExit`` with the estimate."""
    levels = {"token", "sequence", "batch"} & set(cfg.capo_levels)
    if cfg.capo_params != "all" or not levels:
        return
    for run in runs:
        if run.method != "capo":
            continue
        rows = cfg.micro_batch or run.prompts * cfg.group
        tokens = rows * task.max_new_tokens
        candidates = tokens if "token" in levels else rows if "sequence" in levels else 1
        need = candidate_memory(model, tokens, candidates, model.config.vocab_size)
        if need > free:
            raise SystemExit(
                f"--capo-params all: {run.name} models every candidate over the whole model, "
                f"about {need / 2**30:.1f} GiB for a micro-batch of {rows} completions × "
                f"{task.max_new_tokens} tokens, with {free / 2**30:.1f} GiB available. Use "
                "--capo-params head, a smaller --micro-batch, or the trust_region method."
            )


def main(argv: list[str] | None = None) -> dict:
    """Run every planned run, write the outputs, print the table; returns the summary."""
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # our own bars only: loading a local checkpoint needs no progress report
    hf_logging.disable_progress_bar()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    initial, tokenizer, task, source = load_policy(cfg, device)
    planned = plan(cfg)
    check_memory(initial, task, planned, cfg, available_memory(device))
    print(
        f"policy {source} on {device}; {len(task.test)} test problems; {len(planned)} runs of "
        f"{planned[0].steps * planned[0].prompts * cfg.group} training completions each"
    )
    runs, initial_accuracy = [], {}
    with (out / "metrics.jsonl").open("w") as metrics:

        def log(row: dict) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

        for run in planned:
            began = time.time()
            # the starting policy's accuracy is the same for every run on the same kernel
            method = METHODS[run.method]
            kernel = "eager" if method.eager(cfg) else initial.config._attn_implementation
            result = train(run, initial, tokenizer, task, cfg, log, initial_accuracy.get(kernel))
            initial_accuracy[kernel] = result["initial_accuracy"]
            result["seconds"] = time.time() - began
            runs.append(result)
    warnings = [r["no_signal"]["message"] for r in runs if r["no_signal"]]
    summary = {
        "config": asdict(cfg),
        "policy": source,
        "model": source,
        "seconds": time.time() - start,
        "warnings": warnings,
        "runs": runs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report.plot(summary, out / "metrics.jsonl", out / "accuracy.png")
    print(report.table(summary))
    for line in warnings:
        print(f"WARNING: {line}")
    print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'accuracy.png'}")
    print(f"total {summary['seconds']:.0f} s")
    return summary
