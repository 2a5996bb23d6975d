"""What CAPO's decision costs, against the paper's dense method and against the logits product.

Shapes: a Qwen2.5-0.5B-sized head (V = 151,936, H = 896, no bias), N completion tokens, K = 50,
float32. In one run, each configuration is timed (warm-up, then the median of repeats) and its peak
extra memory is measured in a subprocess of its own (CPU: the rise of the resident set's high-water
mark over the inputs, VmHWM after resetting it; CUDA: ``max_memory_allocated`` over the inputs):

1. ``dense_topk``: the reference method written out — every token's head gradient over its top-K
   rows as a ``[N, K, H]`` tensor, Adam's prospective moments per token, the logit change by
   einsum (not chunked: it fits in memory at these sizes);
2. ``exact_topk``: curvopt, ``direction="exact", top_k=50`` (asserted equal to 1.);
3. ``frozen_full`` and ``sgd_full``: curvopt on the full vocabulary, frozen Adam and plain SGD;
4. ``logits_forward``: ``hidden @ W.T`` and ``log_softmax`` — the floor;
5. ``step`` / ``step_capo``: one GRPO training step (forward, loss, backward, AdamW step) of a
   transformers Qwen2 model with this head (``--layers`` layers), without and with CAPO, at the
   smallest N (two such models with their AdamW states do not fit 24 GB at N = 4,096);
6. ``forward`` / ``step_model``: that model's forward pass, and the per-token quadratic model of
   the real update over *all* its parameters (``params="all"``: one forward-mode pass).

The tracker is given the logits, as a training loop has them. Usage::

    python benchmarks/bench_tracker.py --quick --json bench.json
    python benchmarks/bench_tracker.py --json benchmarks/results/tracker.json \
        --plot docs/img/performance.png
    python benchmarks/bench_tracker.py --profile --tokens 1024   # where frozen_full's time goes
    python benchmarks/bench_tracker.py --step-model-parts        # where step_model's time goes
    python benchmarks/bench_tracker.py --trust-region 2 24 \
        --json benchmarks/results/trust-region.json

``--trust-region LAYERS...`` measures the measured whole-policy trust region instead
(:mod:`trust_region_cost`): its extra time per step in forwards of the batch, bound inactive and
active, and its peak memory, at each number of layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import trust_region_cost

import curvopt
from curvopt.heads.whole import step_logit_change
from curvopt.optimizers import planned_update

V, H, K, T = 151_936, 896, 50, 64
SEED = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(n_tokens: int, device: torch.device) -> dict:
    """Head, optimizers with one real step of state, and a batch of ``n_tokens`` tokens."""
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    head = torch.nn.Linear(H, V, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) * 0.02)
    adamw = torch.optim.AdamW(head.parameters(), lr=1e-6, weight_decay=0.01)
    sgd = torch.optim.SGD(head.parameters(), lr=1e-3)
    head.weight.grad = (torch.randn(V, H, generator=gen) * 1e-4).to(device)
    adamw.step()  # realistic moments; the weight barely moves
    head.weight.grad = None
    B = n_tokens // T
    hidden = (torch.randn(B, T, H, generator=gen) * 3).to(device)
    with torch.no_grad():
        logits = head(hidden)
        probs = torch.softmax(logits.reshape(-1, V), -1)
    actions = torch.multinomial(probs.cpu(), 1, generator=gen).reshape(B, T).to(device)
    del probs
    return {
        "head": head,
        "adamw": adamw,
        "sgd": sgd,
        "hidden": hidden,
        "logits": logits,
        "actions": actions,
        "advantages": torch.randn(B, generator=gen).to(device),
        "mask": torch.ones(B, T, dtype=torch.bool, device=device),
    }


@torch.no_grad()
def dense_topk(d: dict) -> torch.Tensor:
    """The paper's reference computation of the token-level m_F (empirical Fisher), top-K, with
    Adam's prospective moments taken from the real AdamW state."""
    opt, w = d["adamw"], d["head"].weight
    state, group = opt.state[w], opt.param_groups[0]
    beta1, beta2 = group["betas"]
    k = int(state["step"]) + 1
    h = d["hidden"].reshape(-1, H)
    top, idx = torch.topk(d["logits"].reshape(-1, V), K, dim=-1)
    probs = torch.softmax(top, -1)
    v = (idx == d["actions"].reshape(-1, 1)).float() - probs
    adv = d["advantages"].repeat_interleave(T)
    grad = -(adv[:, None, None] * v[:, :, None] * h[:, None, :])  # [N, K, H] loss gradients
    m = beta1 * state["exp_avg"][idx] + (1 - beta1) * grad
    s = beta2 * state["exp_avg_sq"][idx] + (1 - beta2) * grad * grad
    step_size = group["lr"] / (1 - beta1**k)
    delta = -step_size * m / (s.sqrt() / (1 - beta2**k) ** 0.5 + group["eps"])
    delta -= group["lr"] * group["weight_decay"] * w[idx]
    u = torch.einsum("nkh,nh->nk", delta, h)
    return 0.5 * (v * u).sum(-1).square()


def tracker_call(d: dict, optimizer: str, **kw) -> Callable[[], torch.Tensor]:
    tracker = curvopt.CurvatureTracker(d["head"], d[optimizer], **kw)
    args = (d["hidden"], d["actions"], d["advantages"], d["mask"])
    return lambda: tracker.quadratic_model(*args, logits=d["logits"]).policy_shift


def configurations(d: dict) -> dict[str, Callable[[], object]]:
    h = d["hidden"].reshape(-1, H)
    return {
        "logits_forward": lambda: torch.log_softmax(h @ d["head"].weight.T, -1),
        "dense_topk": lambda: dense_topk(d),
        "exact_topk": tracker_call(d, "adamw", direction="exact", top_k=K),
        "frozen_full": tracker_call(d, "adamw", direction="frozen"),
        "sgd_full": tracker_call(d, "sgd"),
    }


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    with torch.no_grad():
        fn()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_extra_memory(name: str, n_tokens: int, device: torch.device) -> int:
    """Run one configuration in this process and return its peak memory above the inputs."""
    d = build(n_tokens, device)
    fn = configurations(d)[name]
    with torch.no_grad():
        fn()  # warm-up: one-off allocations (and any compilation) are not the method's memory
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident set's high-water mark
    with torch.no_grad():
        fn()
    return _vm("VmHWM") - base


def memory_in_subprocess(name: str, n_tokens: int, device: torch.device) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", name, "--tokens", str(n_tokens),
         "--device", str(device)],
        check=True, capture_output=True, text=True,
        # a fixed mmap threshold: large blocks go back to the system when freed, so the
        # resident set follows live memory instead of glibc's retained heap
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


def qwen(
    n_tokens: int, layers: int, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Qwen2.5-0.5B-shaped transformers model with ``layers`` layers and this head (eager
    attention: forward-mode AD needs it), and a batch for it: ids ``[B, 8 + T]`` (8 prompt
    tokens), advantages ``[B]`` and a completion mask ``[B, T]``, ``B·T = n_tokens``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=V, hidden_size=H, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False,
        max_position_embeddings=512, attn_implementation="eager",
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to(device)
    B = n_tokens // T
    ids = torch.randint(0, V, (B, 8 + T), device=device)
    advantages = torch.randn(B, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return model, ids, advantages, mask


def grpo_step_times(n_tokens: int, layers: int, device: torch.device, repeats: int) -> dict:
    """Median time of one GRPO step of a Qwen2 model with this head, without and with CAPO."""
    model, ids, advantages, mask = qwen(n_tokens, layers, device)
    P = ids.shape[1] - T
    plain = torch.optim.AdamW(model.parameters(), lr=1e-6)
    capo = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=1e-6), head=model.lm_head)

    def step(opt) -> None:
        out = model(ids, output_hidden_states=True, logits_to_keep=T + 1)
        logits = out.logits[:, :-1]
        actions = ids[:, P:]
        keep = mask
        if opt is capo:
            hidden = out.hidden_states[-1][:, P - 1 : -1]
            keep = opt.select(hidden, actions, advantages, mask, logits=logits)
        logp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * advantages[:, None] * keep).sum() / keep.sum().clamp(min=1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync(device)

    def forward(m: torch.nn.Module) -> torch.Tensor:
        return m(ids, logits_to_keep=T + 1).logits[:, :-1]

    whole = curvopt.CurvatureTracker(model.lm_head, plain, params="all", model=model)

    def model_forward() -> None:
        with torch.no_grad():
            forward(model)
        sync(device)

    def whole_step_model() -> None:  # the real step's per-token model over every parameter
        whole.step_model(ids[:, P:], advantages, mask, forward=forward)
        sync(device)

    for opt in (plain, capo):
        step(opt)  # warm-up (and the optimizers' first steps)
    grads = [torch.randn_like(p) * 1e-4 for p in model.parameters()]  # a gradient to step on

    def with_gradient() -> None:
        for p, g in zip(model.parameters(), grads):
            p.grad = g

    times: dict[str, list[float]] = {k: [] for k in ("step", "step_capo", "forward", "step_model")}
    runs = (
        ("step", lambda: step(plain)),
        ("step_capo", lambda: step(capo)),
        ("forward", model_forward),
        ("step_model", whole_step_model),
    )
    with_gradient()
    whole_step_model()  # warm-up
    for _ in range(repeats):  # interleaved, so drift affects all alike
        for key, fn in runs:
            if key == "step_model":
                with_gradient()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
            plain.zero_grad()
    return {k: statistics.median(v) for k, v in times.items()}


def step_model_parts(n_tokens: int, layers: int, device: torch.device, repeats: int) -> dict:
    """Median times of the whole-model step model's parts, beside the model's forward: forming
    Δθ, the forward-mode pass (with the head fed a strided slice, as ``logits_to_keep`` does, and
    with the logits of every position sliced after the head), and the whole ``step_model``; and
    the head alone: its product, three such products, and ``jvp`` of its ``F.linear``."""
    model, ids, advantages, mask = qwen(n_tokens, layers, device)
    B, P = ids.shape[0], ids.shape[1] - T
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # a state, then a gradient to step on
        p.grad = torch.randn_like(p) * 1e-4
    opt.step()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-4
    tracker = curvopt.CurvatureTracker(model.lm_head, opt, params="all", model=model)

    def kept(m: torch.nn.Module) -> torch.Tensor:
        return m(ids, logits_to_keep=T + 1).logits[:, :-1]

    def every(m: torch.nn.Module) -> torch.Tensor:
        return m(ids).logits[:, P - 1 : -1]

    def planned() -> list[torch.Tensor]:
        return planned_update(tracker._steps(torch.float32, frozen=False), tracker.params, opt)

    deltas = planned()

    def tangent(forward) -> Callable[[], object]:
        return lambda: step_logit_change(model, tracker.names, tracker.params, deltas, forward)

    W, dW = model.lm_head.weight.detach(), deltas[tracker.names.index("lm_head.weight")]
    h, dh = (torch.randn(B, T, H, device=device) for _ in range(2))
    runs = {
        "forward": lambda: kept(model),
        "delta": planned,
        "jvp_logits_to_keep": tangent(kept),
        "jvp_every_position": tangent(every),
        "step_model": lambda: tracker.step_model(ids[:, P:], advantages, mask, forward=kept),
        "head_product": lambda: F.linear(h, W),
        "head_three_products": lambda: (F.linear(h, W), F.linear(dh, W), F.linear(h, dW)),
        "head_jvp": lambda: torch.func.jvp(F.linear, (h, W), (dh, dW)),
    }
    return {name: timed(fn, device, repeats) for name, fn in runs.items()}


def profile(n_tokens: int, device: torch.device, rows: int = 12) -> str:
    """``torch.profiler`` tables of the floor and of the full-vocabulary frozen-Adam model (after
    a warm-up call each): where the time of ``frozen_full`` goes beside ``logits_forward``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    d = build(n_tokens, device)
    fns = configurations(d)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name in ("logits_forward", "frozen_full"):
        with torch.no_grad():
            fns[name]()
            sync(device)
            with torch_profile(activities=activities) as prof:
                fns[name]()
                sync(device)
        out.append(f"== {name}, N = {n_tokens:,}\n")
        out.append(prof.key_averages().table(sort_by=sort, row_limit=rows))
    return "\n".join(out)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true",
        help="N = 1,024 only, one repeat, memory of the top-K pair only (about 3 minutes)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the ratios and raw numbers here")
    parser.add_argument("--plot", default=None, help="write time and memory against N here")
    parser.add_argument(
        "--profile", action="store_true",
        help="print torch.profiler tables of logits_forward and frozen_full at the first N, only",
    )  # fmt: skip
    parser.add_argument(
        "--step-model-parts", action="store_true",
        help="time the parts of the whole-model step model at the first N (--layers), only",
    )  # fmt: skip
    parser.add_argument(
        "--trust-region", type=int, nargs="+", default=None, metavar="LAYERS",
        help="time the measured trust region's step at these numbers of layers, only",
    )  # fmt: skip
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_trust-region-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    n_first = (args.tokens or [1024])[0]
    if args._trust_region_memory is not None:
        print(json.dumps(trust_region_cost.peak(args._trust_region_memory, n_first, device)))
        return
    if args.trust_region:
        rows: dict = {}
        if args.json and os.path.exists(args.json):  # rows of other layer counts are kept
            with open(args.json) as f:
                previous = json.load(f)
            if previous.get("N") == n_first:
                rows = {int(k): v for k, v in previous.get("by_layers", {}).items()}
        for layers in args.trust_region:
            rows[layers] = trust_region_cost.measure(layers, n_first, device, args.repeats or 3)
            print(trust_region_cost.report(rows, n_first), flush=True)
            if args.json:  # after each row, so that a run stopped later keeps what it measured
                rows[layers]["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
                record = {"machine": machine(device), "N": n_first, "by_layers": rows}
                with open(args.json, "w") as f:
                    json.dump(record, f, indent=2)
        return
    if args.profile:
        print(profile((args.tokens or [1024])[0], device))
        return
    if args.step_model_parts:
        n = (args.tokens or [1024])[0]
        parts = step_model_parts(n, args.layers, device, args.repeats or 3)
        print(f"N = {n:,}, {args.layers} layers, {machine(device)}")
        for name, t in parts.items():
            print(f"{name:<22}{t:>10.3f} s{t / parts['forward']:>8.2f}× forward")
        if args.json:
            record = {"machine": machine(device), "N": n, "layers": args.layers, "time_s": parts}
            record["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
        return
    if args._memory:
        print(peak_extra_memory(args._memory, args.tokens[0], device))
        return
    sizes = args.tokens or ([1024] if args.quick else [1024, 4096])
    repeats = args.repeats or (1 if args.quick else 5)
    rows: dict[int, dict] = {}
    for n in sizes:
        d = build(n, device)
        reference = dense_topk(d)
        exact = configurations(d)["exact_topk"]().reshape(-1)
        torch.testing.assert_close(exact, reference, rtol=1e-3, atol=1e-12)
        times = {name: timed(fn, device, repeats) for name, fn in configurations(d).items()}
        del d
        # --quick measures only what its JSON needs (the top-K pair); the full run measures all
        measured = ("dense_topk", "exact_topk") if args.quick else tuple(times)
        memory = {name: memory_in_subprocess(name, n, device) for name in measured}
        if n == min(sizes):  # two models' AdamW states and logits' graphs: the smallest N fits
            times.update(grpo_step_times(n, args.layers, device, repeats))
        rows[n] = {"time_s": times, "peak_extra_bytes": memory}
        floor = times["logits_forward"]
        print(f"\nN = {n:,} tokens (V = {V:,}, H = {H}, K = {K}, {device}, median of {repeats})")
        print(f"{'configuration':<16}{'time s':>10}{'× logits':>10}{'peak extra MiB':>16}")
        for name, t in times.items():
            mem = memory.get(name)
            mem_s = f"{mem / 2**20:>16.0f}" if mem is not None else f"{'':>16}"
            print(f"{name:<16}{t:>10.3f}{t / floor:>10.2f}{mem_s}")
    n = max(sizes)
    t, mem = rows[n]["time_s"], rows[n]["peak_extra_bytes"]
    e2e = rows[min(sizes)]["time_s"]
    result = {
        "dense_over_exact_topk_time": t["dense_topk"] / t["exact_topk"],
        "dense_over_exact_topk_peak_mem": mem["dense_topk"] / max(mem["exact_topk"], 1),
        "frozen_full_vocab_over_logits_forward": t["frozen_full"] / t["logits_forward"],
        "sgd_full_vocab_over_logits_forward": t["sgd_full"] / t["logits_forward"],
        "capo_step_overhead": e2e["step_capo"] / e2e["step"] - 1,
        "wholemodel_step_model_over_forward": e2e["step_model"] / e2e["forward"],
        "machine": machine(device),
        "shapes": {
            "V": V,
            "H": H,
            "K": K,
            "N": sizes,
            "layers": args.layers,
            "dtype": "float32",
            "end_to_end_N": min(sizes),
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "by_tokens": rows,
    }
    print("\n" + json.dumps({k: v for k, v in result.items() if k != "by_tokens"}, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(rows, args.plot, result["machine"])


def plot(rows: dict[int, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(rows)
    names = ["logits_forward", "dense_topk", "exact_topk", "frozen_full", "sgd_full"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        ax_t.plot(sizes, [rows[n]["time_s"][name] for n in sizes], "o-", label=name)
        ax_m.plot(
            sizes, [rows[n]["peak_extra_bytes"][name] / 2**20 for n in sizes], "o-", label=name
        )
    for ax, label in ((ax_t, "time (s, median)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("completion tokens N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"Token-level CAPO on a {V:,} × {H} head — {title}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
