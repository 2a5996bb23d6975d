"""The GRPO example's task: answer checker, reference solutions, tokenizer, data splits."""

from __future__ import annotations

import json
import random

import pytest
from grpolab import arith
from grpolab.task import Problem, from_rows, load_jsonl
from hypothesis import given
from hypothesis import strategies as st

digits = st.integers(1, 4)


@st.composite
def operands(draw: st.DrawFn) -> tuple[int, int, int]:
    d = draw(digits)
    return draw(st.integers(0, 10**d - 1)), draw(st.integers(0, 10**d - 1)), d


@given(operands())
def test_reference_solution_earns_reward(case):
    a, b, d = case
    problem = arith.make_problem(a, b, d)
    assert arith.check(arith.solution(a, b, d), problem.answer) == 1.0


@given(operands(), st.integers(1, 10**5))
def test_wrong_final_answer_earns_nothing(case, offset):
    a, b, d = case
    work = arith.solution(a, b, d).rpartition(arith.ANSWER_MARK)[0]
    wrong = f"{work}{arith.ANSWER_MARK}{a + b + offset}"
    assert arith.check(wrong, str(a + b)) == 0.0


@given(operands())
def test_only_the_final_answer_is_checked(case):
    a, b, _ = case
    # a wrong worked solution, or none, with the right answer still counts
    assert arith.check(f"99,99{arith.ANSWER_MARK}{a + b}", str(a + b)) == 1.0
    assert arith.check(f"{arith.ANSWER_MARK} {a + b} ", str(a + b)) == 1.0


@given(st.text(max_size=30), st.text(max_size=6))
def test_malformed_output_never_raises(text, answer):
    reward = arith.check(text, answer)
    assert reward in (0.0, 1.0)
    if arith.ANSWER_MARK not in text:
        assert reward == 0.0


@pytest.mark.parametrize("text", ["", "#", "12,08", "12,08#", "12,08# ", "#8 1", "81"])
def test_malformed_examples_earn_nothing(text):
    assert arith.check(text, "81") == 0.0


def test_prompts_have_fixed_width():
    assert arith.make_problem(3, 7, 2) == Problem("03+07=", "10")
    assert arith.solution(23, 58, 2) == "11,08#81"
    assert arith.solution(99, 99, 2) == "18,19#198"


@given(st.text(alphabet=arith.CHARS, max_size=40))
def test_tokenizer_round_trip(text):
    tokenizer = arith.build_tokenizer()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_tokenizer_pads_left_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = arith.build_tokenizer()
    batch = tokenizer(["1+2=", "11+22="], padding=True)
    assert batch.attention_mask[0][:2] == [0, 0]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("23+58=").input_ids == tokenizer("23+58=").input_ids
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.decode(tokenizer("11,08#81").input_ids) == "11,08#81"


def test_train_and_test_problems_are_disjoint():
    task = arith.addition(digits=1, test_size=40)
    test = {p.prompt for p in task.test}
    assert len(test) == 40
    train = task.sample(random.Random(0), 2000)
    assert not test & {p.prompt for p in train}
    assert arith.addition(digits=1, test_size=40).test == task.test


def test_jsonl_task_holds_out_rows(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(10)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = from_rows(load_jsonl(path), test_size=3, max_new_tokens=8, check=arith.check)
    assert len(task.test) == 3 and task.test[0].answer.isdigit()
    test = {p.prompt for p in task.test}
    assert not test & {p.prompt for p in task.sample(random.Random(0), 100)}
    with pytest.raises(ValueError, match="test_size"):
        from_rows(load_jsonl(path), test_size=10, max_new_tokens=8, check=arith.check)


def test_jsonl_rows_need_prompt_and_answer(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1+1="}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_jsonl(path)
