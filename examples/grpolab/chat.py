"""Short chat questions with a numeric answer, for pretrained instruct models, generated in code.

Each problem is a chat: a one-line system message, two fixed worked examples (user question,
assistant answer) and the question. The completion earns reward 1 when its last number is the
answer (:func:`~grpolab.task.last_number`). Kinds (``--task``):

- ``larger``: "Which is larger, 47 or 52?" — two distinct numbers from 10 to 99;
- ``smallest``: "What is the smallest of 47, 12 and 85?" — three distinct numbers from 10 to 99;
- ``next``: "What number comes after 479?" — from 10 to 998;
- ``sum``: "What is 7 + 8?" — one-digit operands (81 problems).

Greedy accuracy of SmolLM2-135M-Instruct at the start, ``benchmarks/real_model_tasks.py``:
``larger`` 42 %, ``smallest`` 42 %, ``next`` 45 %, ``sum`` 13 %. ``next`` is the default: in the
15–85 % range, and without a shortcut — on ``larger`` GRPO settled within 128 completions on a
deterministic policy at chance (44.5 %), while on ``next`` it reached 84 %.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import permutations

from .task import Checker, Message, Problem, Task

__all__ = ["DEFAULT", "KINDS", "task"]

SYSTEM = "Reply with the number only."
#: completion budget: the answer's digits and the end-of-turn token, with slack
MAX_NEW_TOKENS = 8

Question = tuple[str, int]


def _larger(x: tuple[int, ...]) -> Question:
    return f"Which is larger, {x[0]} or {x[1]}?", max(x)


def _smallest(x: tuple[int, ...]) -> Question:
    return f"What is the smallest of {x[0]}, {x[1]} and {x[2]}?", min(x)


def _next(x: tuple[int, ...]) -> Question:
    return f"What number comes after {x[0]}?", x[0] + 1


def _sum(x: tuple[int, ...]) -> Question:
    return f"What is {x[0]} + {x[1]}?", x[0] + x[1]


Operands = Callable[[], list[tuple[int, ...]]]

#: per kind: how a question is written, every operand tuple (built on use), and the two worked
#: examples (answers in different positions, so the examples teach no position)
KINDS: dict[str, tuple[Callable[[tuple[int, ...]], Question], Operands, list]] = {
    "larger": (_larger, lambda: list(permutations(range(10, 100), 2)), [(63, 28), (35, 71)]),
    "smallest": (
        _smallest,
        lambda: list(permutations(range(10, 100), 3)),
        [(54, 19, 86), (72, 90, 43)],
    ),
    "next": (_next, lambda: [(n,) for n in range(10, 999)], [(38,), (605,)]),
    "sum": (_sum, lambda: [(a, b) for a in range(1, 10) for b in range(1, 10)], [(4, 3), (6, 9)]),
}
DEFAULT = "next"


def _chat(kind: str, operands: tuple[int, ...]) -> Problem:
    write, _, shots = KINDS[kind]
    messages: list[Message] = [{"role": "system", "content": SYSTEM}]
    for shot in shots:
        question, answer = write(shot)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": str(answer)},
        ]
    question, answer = write(operands)
    messages.append({"role": "user", "content": question})
    return Problem(tuple(messages), str(answer))


def task(kind: str, test_size: int, check: Checker, seed: int = 1234) -> Task:
    """The ``kind`` task: ``test_size`` problems held out (chosen with ``seed``, never the worked
    examples'), the rest drawn uniformly for training."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    _, operands, shots = KINDS[kind]
    space = [x for x in operands() if x not in shots]
    if not 0 < test_size <= len(space) // 2:
        raise ValueError(
            f"test_size: at most half of the {len(space)} {kind} problems may be held out, "
            f"got {test_size}"
        )
    order = list(range(len(space)))
    random.Random(seed).shuffle(order)
    test = [_chat(kind, space[i]) for i in order[:test_size]]
    train = [space[i] for i in order[test_size:]]

    def sample(rng: random.Random, n: int) -> list[Problem]:
        return [_chat(kind, rng.choice(train)) for _ in range(n)]

    return Task(sample, test, MAX_NEW_TOKENS, check)
