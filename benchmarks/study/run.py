"""Running a study: one call of the GRPO example's ``main`` per run, each in a fresh process.

A run writes ``summary.json`` last, so a directory holding one is finished; :func:`execute`
skips those, and an interrupted study resumes where it stopped. A failed run is reported and
left unfinished (the next invocation tries it again).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Job", "Variant", "done", "example_args", "example_main", "execute", "run_dir"]


@dataclass(frozen=True)
class Variant:
    """A method as a study names it: the example's options and how to describe it.

    ``family``: ``"grpo"`` or ``"capo"``; ``rule``: ``"none"``, ``"symmetric"``, ``"theorem"``,
    ``"max_policy_shift"`` (predicted) or ``"trust_region"`` (measured); ``params``: what CAPO
    models (``"-"``, ``"head"``, ``"all"``); ``bound``: the KL bound per step, if any.
    """

    name: str
    family: str
    rule: str
    params: str
    label: str
    args: tuple[str, ...]
    bound: float | None = None


@dataclass(frozen=True)
class Job:
    """One run: the example's command-line arguments and the directory it writes."""

    argv: tuple[str, ...]
    where: Path


def run_dir(out: Path, variant: str, seed: int, lr: float | None = None) -> Path:
    """Where one run writes: ``variants/NAME/seedS`` or ``sweep/NAME/lrX/seedS``."""
    if lr is None:
        return out / "variants" / variant / f"seed{seed}"
    return out / "sweep" / variant / f"lr{lr:g}" / f"seed{seed}"


def example_args(
    variant: Variant, seed: int, where: Path, lr: float | None, extra: Sequence[str]
) -> tuple[str, ...]:
    """The example's arguments for one run (``lr``: the aggressive learning rate itself)."""
    argv = [*variant.args, "--seeds", str(seed), "--out", str(where)]
    if lr is not None:
        argv += ["--lr", repr(lr), "--aggressive-lr-mult", "1"]
    return (*argv, *extra)


def done(where: Path) -> bool:
    """Whether the run in ``where`` finished (its ``summary.json`` exists)."""
    return (where / "summary.json").exists()


def example_main(argv: Sequence[str]) -> None:
    """The GRPO example's ``main`` (imported here, in the run's own process)."""
    from grpolab.cli import main

    main(list(argv))


Target = Callable[[Sequence[str]], object]


def _call(target: Target, job: Job) -> bool:
    """``target(job.argv)`` with stdout and stderr in ``job.where/log.txt``; True when it
    returned (a failure's traceback goes to the log)."""
    job.where.mkdir(parents=True, exist_ok=True)
    with (job.where / "log.txt").open("w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                target(job.argv)
            except BaseException:  # a run's failure, whatever it is, must not end the study
                traceback.print_exc()
                return False
    return True


def _child(target: Target, job: Job) -> None:
    raise SystemExit(0 if _call(target, job) else 1)


def execute(jobs: Sequence[Job], workers: int, target: Target = example_main) -> list[Job]:
    """Run the unfinished ``jobs``, ``workers`` at a time, each in a fresh process (``workers=0``:
    one after the other in this process). Returns the jobs that ran; prints one line per run."""
    todo = [j for j in jobs if not done(j.where)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)}", flush=True)
    # spawn, not fork: the children start clean of this process's torch threads
    context = multiprocessing.get_context("spawn")

    def one(job: Job) -> None:
        began = time.time()
        if workers:
            process = context.Process(target=_child, args=(target, job))
            process.start()
            process.join()
            ok = process.exitcode == 0
        else:
            ok = _call(target, job)
        state = "ok" if ok else f"FAILED (see {job.where / 'log.txt'})"
        print(f"{job.where}: {time.time() - began:.0f} s {state}", flush=True)

    if workers:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, todo))
    else:
        for job in todo:
            one(job)
    return todo
