"""What the policy is trained on: problems, their checker, held-out splits, prompt rendering.

A :class:`Problem` is a prompt (text, or chat messages) with the answer its completion must reach.
A :class:`Task` draws training problems on demand, holds a fixed test set and checks completions.

Answer extraction (the checker of ``--data`` rows and of the generated real-model task):

- :func:`last_number` (default): the last number in the completion — an optional minus sign,
  digits, an optional decimal part; thousands separators only in the canonical form ``1,234``
  (so the list ``11,08`` reads as ``11`` then ``08``);
- :func:`regex_extractor` (``--answer-regex R``): the last match of ``R``, its first group when
  it has one, stripped.

The extracted text earns reward 1 when it equals the expected answer: numerically when both read
as numbers (``3.0`` = ``3``, ``1,234`` = ``1234``), else as stripped strings. No answer, 0.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

__all__ = [
    "Message",
    "Problem",
    "Task",
    "answer_checker",
    "chat_renderer",
    "from_rows",
    "last_number",
    "load_jsonl",
    "regex_extractor",
    "same_answer",
]

Message = dict[str, str]
Extractor = Callable[[str], str | None]
Checker = Callable[[str, str], float]
ChatMode = Literal["auto", "none"]

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One prompt with the answer its completion must reach.

    ``prompt`` is the text the policy continues, or chat messages (``{"role", "content"}``) that
    :meth:`Task.rendered` turns into that text.
    """

    prompt: str | tuple[Message, ...]
    answer: str


@dataclass(frozen=True)
class Task:
    """Training problems on demand, a fixed held-out test set, a completion budget, a checker.

    ``check(completion, answer)`` is the reward in {0.0, 1.0}; it never raises.
    """

    sample: Callable[[random.Random, int], list[Problem]]
    test: list[Problem]
    max_new_tokens: int
    check: Checker

    def rendered(self, render: Callable[[Problem], str]) -> Task:
        """The same task with every prompt (training and test) passed through ``render``."""

        def sample(rng: random.Random, n: int) -> list[Problem]:
            return [replace(p, prompt=render(p)) for p in self.sample(rng, n)]

        return replace(self, sample=sample, test=[replace(p, prompt=render(p)) for p in self.test])


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None


def same_answer(got: str, expected: str) -> bool:
    """Equal as numbers when both read as numbers, else as stripped strings."""
    a, b = _number(got), _number(expected)
    if a is not None and b is not None:
        return a == b
    return got.strip() == expected.strip()


def last_number(completion: str) -> str | None:
    """The last number in ``completion`` (see the module's docstring), or None."""
    found = NUMBER.findall(completion)
    return found[-1] if found else None


def regex_extractor(pattern: str) -> Extractor:
    """The last match of ``pattern`` (its first group when it has groups), stripped, or None."""
    compiled = re.compile(pattern)

    def extract(completion: str) -> str | None:
        matches = list(compiled.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if compiled.groups else last.group(0)).strip()

    return extract


def answer_checker(extract: Extractor) -> Checker:
    """Reward 1.0 when ``extract(completion)`` is the answer (:func:`same_answer`), else 0.0."""

    def check(completion: str, answer: str) -> float:
        got = extract(completion)
        return float(got is not None and same_answer(got, answer))

    return check


def chat_renderer(tokenizer: PreTrainedTokenizerBase, mode: ChatMode) -> Callable[[Problem], str]:
    """How a problem's prompt becomes the policy's input text.

    ``mode="auto"`` with a tokenizer that has a chat template: the messages (a text prompt is one
    user message) through ``apply_chat_template(..., add_generation_prompt=True)``. Otherwise the
    text as it is; chat messages then raise ``ValueError`` (they need a template).
    """
    chat = mode == "auto" and bool(getattr(tokenizer, "chat_template", None))

    def render(problem: Problem) -> str:
        prompt = problem.prompt
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        if not isinstance(prompt, str):
            why = "--chat-template none" if mode == "none" else "the tokenizer has no template"
            raise ValueError(f"prompt: chat messages need a chat template ({why})")
        return prompt

    return render


def _messages(value: object, where: str) -> tuple[Message, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    if value[-1]["role"] == "assistant":
        raise ValueError(f"{where}: 'messages' must end with the turn the policy answers")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file: one object per line with ``"answer"`` and either ``"prompt"``
    (text) or ``"messages"`` (chat turns, ``[{"role", "content"}, ...]``, not ending with the
    assistant). Blank lines are skipped; a bad row raises ``ValueError`` naming its line."""
    problems = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        where = f"{path}:{i}"
        if not isinstance(row, dict) or "answer" not in row:
            raise ValueError(
                f"{where}: expected an object with 'answer' and 'prompt' or 'messages'"
            )
        if isinstance(row.get("prompt"), str):
            prompt: str | tuple[Message, ...] = row["prompt"]
        elif "messages" in row:
            prompt = _messages(row["messages"], where)
        else:
            raise ValueError(f"{where}: expected 'prompt' (str) or 'messages' beside 'answer'")
        problems.append(Problem(prompt, str(row["answer"])))
    return problems


def default_test_size(rows: int) -> int:
    """Held-out rows when ``--test-size`` is not given: a quarter of them, at most 256."""
    return max(1, min(256, rows // 4))


def from_rows(
    rows: Sequence[Problem],
    test_size: int,
    max_new_tokens: int,
    check: Checker,
    seed: int = 1234,
) -> Task:
    """``rows`` split once with ``seed``: ``test_size`` held out (0: :func:`default_test_size`),
    the rest drawn uniformly for training."""
    n = len(rows)
    if n < 2:
        raise ValueError(f"rows: need at least 2 (one to train on, one to test), got {n}")
    test_size = test_size or default_test_size(n)
    if not 0 < test_size < n:
        raise ValueError(f"test_size: expected between 1 and {n - 1} for {n} rows, got {test_size}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = [rows[i] for i in order[:test_size]]
    train = [rows[i] for i in order[test_size:]]

    def sample(rng: random.Random, k: int) -> list[Problem]:
        return [rng.choice(train) for _ in range(k)]

    return Task(sample, test, max_new_tokens, check)
