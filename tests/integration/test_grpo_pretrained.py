"""The example on a local pretrained model (``--model DIR --data rows.jsonl``), on a tiny Qwen2
built from its config: chat template, answer extraction, test split, warm-up, the no-signal
warning, SDPA unless a method needs eager, and the memory check of whole-model candidates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from grpolab import cli, config, policy
from grpolab.measure import SignalMonitor
from grpolab.methods import candidate_memory
from grpolab.task import (
    Problem,
    answer_checker,
    chat_renderer,
    default_test_size,
    from_rows,
    last_number,
    load_jsonl,
    regex_extractor,
)
from grpolab.train import warmup_cosine
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

#: a chat template in the usual shape: a header per turn, the assistant's header to answer
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY = [
    "--seeds", "0",
    "--steps", "2",
    "--group", "4",
    "--aggressive-prompts", "2",
    "--conservative-prompts", "4",
    "--device", "cpu",
    "--threads", "1",
    "--max-new-tokens", "4",
]  # fmt: skip


def char_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """Characters of printable ASCII, ``<pad>``/``</s>``/``<unk>``, and ``template``."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {chr(c): c - 29 for c in range(32, 127)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with a chat template, saved as a local checkpoint."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = char_tokenizer(TEMPLATE)
    torch.manual_seed(0)
    model = policy.build_model(tokenizer, hidden_size=16, layers=1, heads=2, max_len=256)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_rows(path: Path, n: int, messages: bool = False, answer_from: int = 1) -> Path:
    rows = []
    for i in range(n):
        question = f"{i}+1="
        prompt = (
            {"messages": [{"role": "user", "content": question}]}
            if messages
            else {"prompt": question}
        )
        rows.append(prompt | {"answer": i + answer_from})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path: Path, model_dir: Path, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    argv = [*TINY, "--model", str(model_dir), "--out", str(out), *args]
    summary = cli.main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


# ---------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("12 apples and 30 pears: 42", "42"),
        ("-7", "-7"),
        ("it is 3.50 metres", "3.50"),
        ("a total of 1,234 people", "1,234"),
        ("11,08#81", "81"),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numbers_compare_as_numbers():
    check = answer_checker(last_number)
    assert check("so it is 1,234", "1234") == 1.0
    assert check("3.0", "3") == 1.0
    assert check("42? no: 41", "42") == 0.0  # the last number counts
    assert check("nothing", "42") == 0.0


def test_regex_extraction_takes_the_last_match_and_its_group():
    check = answer_checker(regex_extractor(r"answer: (\w+)"))
    assert check("answer: no ... answer: yes", "yes") == 1.0
    assert check("answer: yes ... answer: no", "yes") == 0.0
    assert check("yes", "yes") == 0.0  # no match, no reward
    assert regex_extractor(r"[A-D]")("I pick B, then C") == "C"


@given(st.text(max_size=40), st.text(max_size=5))
def test_checkers_never_raise(text, answer):
    assert answer_checker(last_number)(text, answer) in (0.0, 1.0)
    assert answer_checker(regex_extractor(r"(\d+)"))(text, answer) in (0.0, 1.0)


def test_answer_regex_reaches_the_reward(tmp_path, model_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "q", "answer": "x"}\n{"prompt": "r", "answer": "y"}\n')
    cfg = config.parse(["--model", str(model_dir), "--data", str(data), "--answer-regex", "<(.)>"])
    _, _, task, _ = cli.load_policy(cfg, torch.device("cpu"))
    assert task.check("<y> then <x>", "x") == 1.0
    assert task.check("42", "42") == 0.0  # the regex, not the last number


# ---------------------------------------------------------------- rows, chat template, split


def test_rows_with_messages_or_prompt(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"prompt": "1+1=", "answer": 2})
        + "\n"
        + json.dumps(
            {
                "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "answer": "a",
            }
        )
        + "\n"
    )
    plain, chat = load_jsonl(path)
    assert plain == Problem("1+1=", "2")
    assert chat.prompt == ({"role": "system", "content": "s"}, {"role": "user", "content": "u"})
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}], "answer": 1}))
    with pytest.raises(ValueError, match=r"rows\.jsonl:1"):
        load_jsonl(path)


def test_chat_template_renders_prompts_and_messages():
    render = chat_renderer(char_tokenizer(TEMPLATE), "auto")
    assert render(Problem("1+1=", "2")) == "<|user|>1+1=\n<|assistant|>"
    turns = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="})
    assert render(Problem(turns, "4")) == "<|system|>be brief\n<|user|>2+2=\n<|assistant|>"


def test_no_chat_template_leaves_text_and_refuses_messages():
    for render in (
        chat_renderer(char_tokenizer(TEMPLATE), "none"),
        chat_renderer(char_tokenizer(None), "auto"),
    ):
        assert render(Problem("1+1=", "2")) == "1+1="
        with pytest.raises(ValueError, match="chat template"):
            render(Problem(({"role": "user", "content": "1+1="},), "2"))


def test_the_run_trains_on_chat_rendered_prompts(tmp_path, model_dir):
    data = write_rows(tmp_path / "rows.jsonl", 12, messages=True)
    cfg = config.parse(["--model", str(model_dir), "--data", str(data)])
    _, _, task, _ = cli.load_policy(cfg, torch.device("cpu"))
    assert all(
        p.prompt.startswith("<|user|>") and p.prompt.endswith("<|assistant|>") for p in task.test
    )
    summary, rows = run(tmp_path, model_dir, "--data", str(data), "--methods", "grpo-aggressive")
    assert len(rows) == 2 and summary["runs"][0]["steps"] == 2


@pytest.mark.parametrize(("rows", "expected"), [(2, 1), (7, 1), (8, 2), (64, 16), (5000, 256)])
def test_default_test_size_is_at_most_a_quarter(rows, expected):
    assert default_test_size(rows) == expected
    problems = [Problem(str(i), str(i)) for i in range(rows)]
    task = from_rows(problems, 0, 8, answer_checker(last_number))
    assert len(task.test) == expected <= max(1, rows // 4)


def test_a_small_file_runs_with_the_defaults(tmp_path, model_dir):
    data = write_rows(tmp_path / "rows.jsonl", 64)
    summary, _ = run(tmp_path, model_dir, "--data", str(data), "--methods", "grpo-aggressive")
    assert summary["config"]["test_size"] == 0
    assert len(summary["runs"][0]["curve"]) >= 2


def test_pretrained_defaults_and_quick_yield_to_explicit_options():
    full = config.parse(["--model", "smollm2"])
    quick = config.parse(["--model", "smollm2", "--quick"])
    profile = config.PROFILES["pretrained"]
    assert full.seeds == profile["full"]["seeds"] and full.threads == 0
    assert (quick.seeds, quick.steps, quick.test_size) == (
        profile["quick"]["seeds"],
        profile["quick"]["steps"],
        profile["quick"]["test_size"],
    )
    assert config.parse(["--model", "smollm2", "--quick", "--steps", "3"]).steps == 3
    assert config.parse(["--quick"]).steps == config.PROFILES["toy"]["quick"]["steps"]


# ---------------------------------------------------------------- warm-up


@given(st.integers(1, 5000), st.floats(0.0, 1.0))
def test_warm_up_never_starts_at_the_full_lr(steps, ratio):
    factor = warmup_cosine(steps, ratio)
    warmup = max(1, math.ceil(ratio * steps))
    assert factor(0) <= 0.5
    assert all(factor(s) < 1.0 for s in range(min(warmup, 50)))
    assert factor(warmup) == pytest.approx(1.0) or warmup >= steps
    assert all(0.0 <= factor(s) <= 1.0 for s in range(0, steps, max(1, steps // 50)))


def test_first_step_runs_below_the_lr(tmp_path, model_dir):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    summary, rows = run(
        tmp_path, model_dir, "--data", str(data), "--methods", "grpo-aggressive",
        "--warmup-ratio", "0",
    )  # fmt: skip
    lr = summary["runs"][0]["lr"]
    assert rows[0]["lr"] == pytest.approx(lr / 2) and rows[1]["lr"] <= lr


# ---------------------------------------------------------------- no learning signal


def test_no_signal_is_warned_and_recorded(tmp_path, model_dir, capsys):
    # seven-digit answers in four new tokens: every reward of every step is 0
    data = write_rows(tmp_path / "rows.jsonl", 12, answer_from=10**6)
    summary, rows = run(
        tmp_path, model_dir, "--data", str(data), "--methods", "grpo-aggressive",
        "--steps", "3", "--no-signal-steps", "2",
    )  # fmt: skip
    assert all(r["rewards_equal"] == 1.0 for r in rows)
    (report,) = [r["no_signal"] for r in summary["runs"]]
    assert report["step"] == 2 and report["longest"] == 3 and report["reason"] == "every reward 0"
    assert summary["warnings"] == [report["message"]]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["warnings"] == summary["warnings"]
    assert "WARNING" in capsys.readouterr().err


def test_signal_monitor_counts_steps_running():
    monitor = SignalMonitor(limit=2, name="grpo-aggressive", seed=0)

    def step(texts: list[str], rewards: list[float]) -> dict:
        return SimpleNamespace(texts=texts, rewards=torch.tensor(rewards))

    monitor.update(1, step(["1", "2"], [0.0, 0.0]))
    monitor.update(2, step(["1", "2"], [0.0, 1.0]))  # a signal breaks the run of steps
    monitor.update(3, step(["", " "], [0.0, 1.0]))  # empty completions count, whatever the rewards
    assert monitor.report() is None
    monitor.update(4, step(["3", "4"], [1.0, 1.0]))
    report = monitor.report()
    assert (
        report["step"] == 4
        and report["reason"] == "every reward 1"
        and "solves" in report["message"]
    )
    empty = SignalMonitor(limit=1, name="x", seed=0)
    assert empty.update(1, step(["", ""], [0.0, 0.0]))["empty_frac"] == 1.0
    assert empty.report()["reason"] == "every completion empty"
    assert SignalMonitor(limit=0, name="x", seed=0).report() is None


# ---------------------------------------------------------------- attention and memory


def test_sdpa_unless_the_method_needs_eager(tmp_path, model_dir):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    summary, _ = run(
        tmp_path, model_dir, "--data", str(data),
        "--methods", "grpo-aggressive", "capo-aggressive", "trust_region-aggressive",
        "--steps", "1",
    )  # fmt: skip
    attention = {r["variant"]: r["attention"] for r in summary["runs"]}
    assert attention["grpo"] == attention["capo"] == attention["trust_region"] == "sdpa"


def test_candidate_memory_counts_the_largest_tensors():
    model = torch.nn.Linear(3, 5)  # 20 parameters
    assert candidate_memory(model, tokens=6, candidates=6, vocab=7) == 4 * (20 * 18 + 3 * 6 * 6 * 7)


def test_whole_model_candidates_refuse_up_front(tmp_path, model_dir, monkeypatch):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    monkeypatch.setattr(cli, "available_memory", lambda device: 2**20)
    with pytest.raises(SystemExit, match=r"about \d+\.\d GiB .* with 0\.0 GiB available"):
        run(tmp_path, model_dir, "--data", str(data), "--methods", "capo-aggressive",
            "--capo-params", "all")  # fmt: skip
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    # head-only rejection and the step controllers model no per-candidate updates: no check
    run(tmp_path, model_dir, "--data", str(data), "--methods", "capo-aggressive", "--steps", "1")
