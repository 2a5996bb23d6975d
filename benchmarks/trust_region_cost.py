"""What the measured trust region costs, in forwards of the same batch, and its peak memory.

A Qwen2.5-0.5B-shaped transformers model (V = 151,936, H = 896, ``layers`` layers, SDPA
attention, untied head), N completion tokens (``T = 64`` per completion after 8 prompt tokens).
One GRPO step is forward (completion logits, ``logits_to_keep``), loss, backward, AdamW step. It
is timed bare and with ``CAPO(opt, model=model, max_policy_shift=b)`` for a bound that is never
reached (*inactive*: one trial forward) and one a quarter of the unscaled step's KL (*active*:
two or more, as where the bound binds in training), against
the model's no-grad forward of the batch; all interleaved (the order rotated each round), medians
of ``repeats``. The extra time of a trust-region step is ``(step with it − bare step) / forward``
of the medians; each round's is kept too (``extra_forwards_rounds``), to show the spread. The
time spent inside curvopt's own calls of each trust-region step (``select``, and ``CAPO.step``
beyond the wrapped optimizer's step), over the forward, is ``extra_forwards_inside``: the same
quantity without the noise of the step's forward and backward (but blind to any effect of the
trust region on them).

Peak memory is the rise of the resident set's high-water mark (CPU; CUDA: max allocated) over
the model, optimizer state and gradients, for the bare step and for each trust-region step, in a
process of its own; the trust region's extra is the difference.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import curvopt

V, H, T, PROMPT, SEED = 151_936, 896, 64, 8, 0
BOUNDS = {"inactive": 1e9, "active": 1e9}
#: the active bound, as a share of the unscaled step's KL (set after the warm-up): the search then
#: needs a scale of about ½, as a step does where the bound binds in training
ACTIVE_SHARE = 0.25


def qwen(layers: int, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=V, hidden_size=H, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False,
        max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(device).eval()


def batch(n_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    B = n_tokens // T
    ids = torch.randint(0, V, (B, PROMPT + T), generator=g).to(device)
    return {
        "ids": ids,
        "actions": ids[:, PROMPT:],
        "advantages": torch.randn(B, generator=g).to(device),
        "mask": torch.ones(B, T, dtype=torch.bool, device=device),
    }


def completion_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, logits_to_keep=T + 1).logits[:, :-1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_steps(model: torch.nn.Module, b: dict, device: torch.device) -> dict[str, Callable]:
    """One callable per configuration: the bare step, the trust-region steps, the forward."""

    def forward(m: torch.nn.Module) -> torch.Tensor:
        return completion_logits(m, b["ids"])

    # seconds spent in curvopt during the last step: in select, and in CAPO.step outside the
    # wrapped optimizer's own step (timed by its step hooks)
    inside = {"s": 0.0}

    def clock() -> float:
        sync(device)
        return time.perf_counter()

    def step(opt: torch.optim.Optimizer) -> None:
        inside["s"] = 0.0
        logits = forward(model)
        keep = b["mask"]
        if isinstance(opt, curvopt.CAPO):
            start = clock()
            keep = opt.select(
                None, b["actions"], b["advantages"], b["mask"], logits=logits, forward=forward
            )
            inside["s"] += clock() - start
        logp = torch.log_softmax(logits, -1).gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1)
        (-(logp * b["advantages"][:, None] * keep).sum() / keep.sum()).backward()
        own["s"] = 0.0  # stays 0 if the trust region does not take the step
        start = clock()
        opt.step()
        if isinstance(opt, curvopt.CAPO):
            inside["s"] += clock() - start - own["s"]
        opt.zero_grad()
        sync(device)

    # one optimizer for every configuration (a trust-region step changes nothing but the scale)
    bare = torch.optim.AdamW(model.parameters(), lr=1e-6)
    own = {"s": 0.0, "start": 0.0}  # the bare optimizer's own step, by its hooks

    def before_step(*_: object) -> None:
        own["start"] = clock()

    def after_step(*_: object) -> None:
        own["s"] = clock() - own["start"]

    bare.register_step_pre_hook(before_step)
    bare.register_step_post_hook(after_step)
    regions = {
        name: curvopt.CAPO(bare, model=model, max_policy_shift=bound)
        for name, bound in BOUNDS.items()
    }

    def no_grad_forward() -> None:
        with torch.no_grad():
            forward(model)
        sync(device)

    runs = {"forward": no_grad_forward, "step": lambda: step(bare)}
    for name, opt in regions.items():
        runs[f"step_{name}"] = lambda opt=opt: step(opt)
    runs["_trials"] = lambda: {n: o.stats.get("trust_region_trials") for n, o in regions.items()}
    runs["_inside"] = lambda: inside["s"]

    def calibrate() -> None:  # after a step of each: the active bound a share of the step's KL
        regions["active"].max_policy_shift = (
            ACTIVE_SHARE * regions["inactive"].stats["step_policy_shift"]
        )

    runs["_calibrate"] = calibrate
    return runs


def times(layers: int, n_tokens: int, device: torch.device, repeats: int) -> dict:
    """Median seconds of each configuration, interleaved (each round in an order rotated by one,
    so that no configuration always follows the same one); trials of each trust-region step;
    every round's seconds."""
    model = qwen(layers, device)
    runs = make_steps(model, batch(n_tokens, device), device)
    trials, calibrate = runs.pop("_trials"), runs.pop("_calibrate")
    inside = runs.pop("_inside")
    for fn in runs.values():
        fn()  # warm-up, and the optimizer's state
    calibrate()
    out: dict[str, list[float]] = {k: [] for k in runs}
    spent: dict[str, list[float]] = {name: [] for name in BOUNDS}
    counts: dict[str, list[float]] = {name: [] for name in BOUNDS}
    keys = list(runs)
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            runs[key]()
            out[key].append(time.perf_counter() - start)
            if key.startswith("step_"):
                spent[key.removeprefix("step_")].append(inside())
        for name, n in trials().items():
            counts[name].append(n)
    medians = {k: statistics.median(v) for k, v in out.items()}
    return {
        "time_s": medians,
        "trials": {k: statistics.median(v) for k, v in counts.items()},
        "rounds_s": out,
        "inside_s": spent,
    }


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak(layers: int, n_tokens: int, device: torch.device) -> dict[str, int]:
    """Peak memory of each step above the model, state and gradients (one process)."""
    model = qwen(layers, device)
    runs = make_steps(model, batch(n_tokens, device), device)
    runs.pop("_trials")
    runs.pop("_inside")
    calibrate = runs.pop("_calibrate")
    for fn in runs.values():
        fn()  # state allocated, compiled kernels warm
    calibrate()
    out = {}
    for key in ("step", "step_inactive", "step_active"):
        gc.collect()
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            runs[key]()
            out[key] = torch.cuda.max_memory_allocated(device) - base
            continue
        base = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident set's high-water mark
        runs[key]()
        out[key] = _vm("VmHWM") - base
    return out


def peak_in_subprocess(layers: int, n_tokens: int, device: torch.device) -> dict[str, int]:
    """:func:`peak` in a fresh process (``bench_tracker.py --_trust-region-memory``)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_tracker.py")
    out = subprocess.run(
        [sys.executable, script, "--_trust-region-memory", str(layers),
         "--tokens", str(n_tokens), "--device", str(device)],
        check=True, capture_output=True, text=True,
        # freed large blocks go back to the system, so the resident set follows live memory
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(layers: int, n_tokens: int, device: torch.device, repeats: int) -> dict:
    """Times, trials and peak memory at ``layers`` layers; the extra time in forwards."""
    row = times(layers, n_tokens, device, repeats)
    t = row["time_s"]
    row["extra_forwards"] = {
        name: (t[f"step_{name}"] - t["step"]) / t["forward"] for name in BOUNDS
    }
    # the same from the time spent in curvopt's own calls within each trust-region step (select,
    # and CAPO.step beyond the optimizer's step): free of the noise of the step's forward and
    # backward, blind to any effect the trust region has on them
    row["extra_forwards_inside"] = {
        name: statistics.median(v) / t["forward"] for name, v in row["inside_s"].items()
    }
    rounds = row["rounds_s"]
    row["extra_forwards_rounds"] = {  # the same, round by round: the spread
        name: [
            (x - s) / f
            for x, s, f in zip(rounds[f"step_{name}"], rounds["step"], rounds["forward"])
        ]
        for name in BOUNDS
    }
    try:
        row["peak_extra_bytes"] = peak_in_subprocess(layers, n_tokens, device)
    except subprocess.CalledProcessError as error:  # e.g. killed for memory: keep the times
        row["peak_extra_bytes"] = None
        row["peak_error"] = f"the memory process failed ({error.returncode})"
    row["logits_bytes"] = n_tokens * V * 4
    return row


def report(rows: dict[int, dict], n_tokens: int) -> str:
    lines = [
        f"N = {n_tokens:,} tokens; extra time of a trust-region step in forwards of the batch",
        f"{'layers':>6} {'forward s':>10} {'step s':>8} {'inactive':>9} {'active':>7} "
        f"{'trials':>7} {'peak extra MiB (bare / inactive / active)':>42}",
    ]
    for layers, row in rows.items():
        t, m, x = row["time_s"], row["peak_extra_bytes"], row["extra_forwards"]
        keys = ("step", "step_inactive", "step_active")
        mem = "–" if m is None else " / ".join(f"{m[k] / 2**20:.0f}" for k in keys)
        lines.append(
            f"{layers:>6} {t['forward']:>10.2f} {t['step']:>8.2f} {x['inactive']:>9.2f} "
            f"{x['active']:>7.2f} {row['trials']['active']!s:>7} {mem:>42}"
        )
    for layers, row in rows.items():
        spread = row.get("extra_forwards_rounds")
        if spread:
            lines.append(f"{layers} layers, round by round: " + "; ".join(
                f"{name} {min(v):.2f}–{max(v):.2f}" for name, v in spread.items()
            ))  # fmt: skip
        inner = row.get("extra_forwards_inside")
        if inner:
            lines.append(f"{layers} layers, time inside curvopt's calls: " + "; ".join(
                f"{name} {v:.2f}" for name, v in inner.items()
            ))  # fmt: skip
    return "\n".join(lines)
