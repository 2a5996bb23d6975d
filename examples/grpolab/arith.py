"""A verifiable reasoning task generated in code: multi-digit addition with a worked solution.

A problem ``a + b`` with ``digits``-digit operands is written as the prompt ``"23+58="`` (operands
zero-padded to ``digits`` characters, so every prompt has the same length). The reference solution
writes the column sums from the rightmost column, carry included, as two digits each, then the
final answer after ``#``::

    23+58=   →   11,08#81        (3+8 = 11, carry 1; 2+5+1 = 08; answer 81)

The checker reads only the final answer: the text after the last ``#``. A completion earns reward 1
when that text equals the expected answer and 0 otherwise, including when it is malformed (no
``#``, stray characters, empty).

The tokenizer is character level, built offline with the ``tokenizers`` library and wrapped in
:class:`transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .task import Problem, Task

__all__ = [
    "ANSWER_MARK",
    "addition",
    "build_tokenizer",
    "check",
    "extract_answer",
    "make_problem",
    "sample_train",
    "solution",
    "test_set",
]

ANSWER_MARK = "#"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHARS = "0123456789+=,#"


def make_problem(a: int, b: int, digits: int) -> Problem:
    """The problem ``a + b`` with operands zero-padded to ``digits`` characters."""
    return Problem(f"{a:0{digits}d}+{b:0{digits}d}=", str(a + b))


def solution(a: int, b: int, digits: int) -> str:
    """The worked solution of ``a + b``: column sums right to left (carry in), then the answer."""
    carry, sums = 0, []
    for i in range(digits):
        column = a // 10**i % 10 + b // 10**i % 10 + carry
        sums.append(f"{column:02d}")
        carry = column // 10
    return ",".join(sums) + ANSWER_MARK + str(a + b)


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion (text after the last ``#``, stripped), or None."""
    _, mark, answer = completion.rpartition(ANSWER_MARK)
    answer = answer.strip()
    return answer if mark and answer else None


def check(completion: str, answer: str) -> float:
    """Reward: 1.0 when the completion's final answer equals ``answer``, else 0.0 (never raises)."""
    return float(extract_answer(completion) == answer.strip())


def test_set(digits: int, size: int, seed: int = 1234) -> list[tuple[int, int]]:
    """A fixed held-out set of distinct operand pairs (the same for every run with this seed)."""
    space = 10 ** (2 * digits)
    if size > space // 2:
        raise ValueError(f"size: at most half of the {space} problems may be held out, got {size}")
    rng = random.Random(seed)
    pairs = rng.sample(range(space), size)
    return [divmod(p, 10**digits) for p in pairs]


def sample_train(
    rng: random.Random, digits: int, n: int, held_out: set[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``n`` operand pairs drawn uniformly from the problems not in ``held_out``."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        pair = (rng.randrange(10**digits), rng.randrange(10**digits))
        if pair not in held_out:
            out.append(pair)
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the task's alphabet with ``<pad>``, ``</s>`` and ``<unk>``.

    Prompts are left-padded (generation appends on the right).
    """
    vocab = {PAD: 0, EOS: 1, UNK: 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def addition(digits: int, test_size: int) -> Task:
    """``digits``-digit addition; training problems never include the test set's."""
    test_pairs = test_set(digits, test_size)
    held_out = set(test_pairs)

    def sample(rng: random.Random, n: int) -> list[Problem]:
        return [make_problem(a, b, digits) for a, b in sample_train(rng, digits, n, held_out)]

    # the longest solution (column sums, an answer with a final carry) plus EOS and slack
    test = [make_problem(a, b, digits) for a, b in test_pairs]
    return Task(sample, test, 4 * digits + 4, check)
