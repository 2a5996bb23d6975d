"""Two processes (gloo, CPU, DDP) give the decisions, statistics and parameters of one process
on the concatenated batch: batch level and statistics are global, token and sequence local."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TinyPolicy, make_batch, policy_loss
from torch.nn.parallel import DistributedDataParallel

from curvopt import CAPO

WORLD = 2
# thresholds chosen so that each setting rejects some tokens but not all, and skips a step
SETTINGS = [
    dict(direction="exact", top_k=None, levels=("token", "sequence", "batch"), delta_f=2e-4),
    dict(direction="frozen", top_k=3, levels=("batch", "token"), delta_f=5e-5),
    dict(direction="shadow", top_k=None, levels=("sequence", "batch"), delta_f=1e-4),
]
# "exact" adds no reduction the others lack (the full-vocabulary batch level is "shadow"'s, token
# candidates are local): slow
SLOW = {"exact"}
CAPO_KW = dict(rule="symmetric", delta_h=5e-2, track_realised=True)


def make(setting: dict):
    torch.manual_seed(0)
    model = TinyPolicy()
    opt = CAPO(
        torch.optim.AdamW(model.parameters(), lr=3e-3), head=model.lm_head, **setting, **CAPO_KW
    )
    return model, opt


def shard(batch: dict, rank: int) -> dict:
    half = batch["x"].shape[0] // WORLD
    return {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}


def step(model, opt, batch: dict):
    """One select on the whole batch; loss = mean over the ranks' shards of their token-mean
    losses (what DDP's gradient averaging gives when each rank holds one shard)."""
    h, logits = model(batch["x"])
    keep = opt.select(h, batch["actions"], batch["advantages"], batch["mask"], logits=logits)
    half = keep.shape[0] // WORLD
    losses = [
        policy_loss(logits[s], batch["actions"][s], batch["advantages"][s], keep[s])
        for s in (slice(r * half, (r + 1) * half) for r in range(WORLD))
    ]
    (sum(losses) / WORLD).backward()
    opt.step()
    opt.zero_grad()
    return keep, dict(opt.stats)


def split_step(model, opt, batch: dict):
    """As ``step``, with one select per rank's shard (the ranks' micro-batches, accumulated) and
    a closure: the single-process twin of ``ddp_step`` with ``step_reject_frac``."""
    half = batch["x"].shape[0] // WORLD
    parts = [shard(batch, r) for r in range(WORLD)]
    keeps = []
    for part in parts:
        h, logits = model(part["x"])
        keeps.append(
            opt.select(h, part["actions"], part["advantages"], part["mask"], logits=logits)
        )

    def closure():
        opt.zero_grad()
        losses = [
            policy_loss(model(p["x"])[1], p["actions"], p["advantages"], k)
            for p, k in zip(parts, keeps)
        ]
        loss = sum(losses) / WORLD
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    opt.zero_grad()
    assert all(k.shape[0] == half for k in keeps)
    return torch.cat(keeps), dict(opt.stats)


def ddp_step(ddp, opt, part: dict) -> tuple:
    h, logits = ddp(part["x"])
    keep = opt.select(h, part["actions"], part["advantages"], part["mask"], logits=logits)

    def closure():
        opt.zero_grad()
        loss = policy_loss(ddp(part["x"])[1], part["actions"], part["advantages"], keep)
        loss.backward()
        return loss

    policy_loss(logits, part["actions"], part["advantages"], keep).backward()
    opt.step(closure if opt.step_reject_frac else None)
    opt.zero_grad()
    return keep, dict(opt.stats)


# how long a rank waits for the others (the default of gloo and the store): generous, so that a
# loaded machine slows the test down rather than failing it
TIMEOUT = timedelta(minutes=10)


def spawn_ranks(worker, *args) -> None:
    """Run ``worker(rank, port, *args)`` in ``WORLD`` processes, ``port`` the one of a store held by
    this process: bound to a port the system chose (no race for a free port) before the ranks
    start, so each rank joins it with :func:`init_rank`."""
    here = os.path.dirname(os.path.abspath(__file__))  # spawned workers import this module
    support = os.path.join(os.path.dirname(here), "support")
    path = os.pathsep.join([here, support, os.environ.get("PYTHONPATH", "")])
    old, os.environ["PYTHONPATH"] = os.environ.get("PYTHONPATH"), path
    try:
        # port 0: the system picks a free port, and this store holds it until the ranks are done
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        mp.spawn(worker, args=(store.port, *args), nprocs=WORLD, join=True)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def init_rank(rank: int, port: int) -> None:
    """Join the process group of :func:`spawn_ranks` (gloo) as ``rank``."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=TIMEOUT)


def worker(rank: int, port: int, setting: dict, batches: list[dict], path: str) -> None:
    init_rank(rank, port)
    model, opt = make(setting)
    ddp = DistributedDataParallel(model)
    # one function per step, so no autograd graph (which references DDP's reducer) outlives it
    results = [ddp_step(ddp, opt, shard(batch, rank)) for batch in batches]
    torch.save(
        {"results": results, "params": [p.detach() for p in model.parameters()]}, f"{path}.{rank}"
    )
    # tear down DDP's reducer before its process group, or gloo may abort at exit
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(setting: dict, batches: list[dict]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out")
        spawn_ranks(worker, setting, batches, path)
        return [torch.load(f"{path}.{r}", weights_only=False) for r in range(WORLD)]


def assert_match(single: list[tuple], ranks: list[dict], model) -> float:
    """Ranks' keeps, statistics and parameters == the single process's; the summed
    ``rejected_frac``."""
    rejected = 0.0
    for i, (keep, stats) in enumerate(single):
        assert torch.equal(torch.cat([r["results"][i][0] for r in ranks]), keep), f"step {i}"
        rejected += stats["rejected_frac"]
        for r in ranks:
            other = r["results"][i][1]
            assert other.keys() == stats.keys()
            for k, v in stats.items():
                assert other[k] == pytest.approx(v, rel=1e-4, abs=1e-10), (i, k)
    for p0, p1, p in zip(ranks[0]["params"], ranks[1]["params"], model.parameters(), strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, p.detach(), rtol=1e-5, atol=1e-6)
    return rejected


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param(
            s, id=s["direction"], marks=[pytest.mark.slow] if s["direction"] in SLOW else []
        )
        for s in SETTINGS
    ],
)
def test_two_ranks_match_one_process_on_the_concatenated_batch(setting):
    batches = [make_batch(i, B=4) for i in range(3)]
    model, opt = make(setting)
    single = [step(model, opt, b) for b in batches]
    rejected = assert_match(single, run_ranks(setting, batches), model)
    assert 0 < rejected < len(single)  # decisions are exercised


def test_rejection_before_scaling_is_local_and_its_closure_global():
    """Each rank rejects among its own tokens; all ranks re-evaluate together (DDP's backward is
    a collective) when any rank rejected, and scale by the global prediction."""
    setting = dict(levels=(), max_policy_shift=1e-5, shift_estimate="jvp", step_reject_frac=0.25)
    batches = [make_batch(i, B=4) for i in range(3)]
    model, opt = make(setting)
    single = [split_step(model, opt, b) for b in batches]
    assert_match(single, run_ranks(setting, batches), model)
    rejected = [stats["step_rejected"] for _, stats in single]
    assert rejected[0] > 0 and rejected[-1] == 0  # both branches are exercised


def empty_worker(rank: int, port: int, setting: dict, batches: list[dict], path: str) -> None:
    """Rank 0 holds every sequence, rank 1 none (e.g. all of its completions filtered out)."""
    init_rank(rank, port)
    model, opt = make(setting)
    ddp = DistributedDataParallel(model)
    results = [
        ddp_step(ddp, opt, b if rank == 0 else {k: v[:0] for k, v in b.items()}) for b in batches
    ]
    torch.save(
        {"results": results, "params": [p.detach() for p in model.parameters()]}, f"{path}.{rank}"
    )
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def test_an_empty_micro_batch_on_one_rank_still_takes_part_in_the_collectives():
    """Its select and step join every reduction (the ranks would hang otherwise) and add nothing:
    the run is one process's on rank 0's batch (DDP averages its gradient with rank 1's zero)."""
    setting = dict(direction="frozen", top_k=None, levels=("token", "sequence", "batch"))
    batches = [make_batch(i, B=4) for i in range(2)]
    model, opt = make(dict(setting, delta_f=1e-4))
    single = []
    for b in batches:
        h, logits = model(b["x"])
        keep = opt.select(h, b["actions"], b["advantages"], b["mask"], logits=logits)
        (policy_loss(logits, b["actions"], b["advantages"], keep) / WORLD).backward()
        opt.step()
        opt.zero_grad()
        single.append((keep, dict(opt.stats)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out")
        spawn_ranks(empty_worker, dict(setting, delta_f=1e-4), batches, path)
        ranks = [torch.load(f"{path}.{r}", weights_only=False) for r in range(WORLD)]
    for i, (keep, stats) in enumerate(single):
        assert torch.equal(ranks[0]["results"][i][0], keep)
        assert ranks[1]["results"][i][0].shape == (0, keep.shape[1])
        for r in ranks:
            assert r["results"][i][1] == pytest.approx(stats, rel=1e-5, abs=1e-10)
    for p0, p1, p in zip(ranks[0]["params"], ranks[1]["params"], model.parameters(), strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, p.detach(), rtol=1e-5, atol=1e-6)
