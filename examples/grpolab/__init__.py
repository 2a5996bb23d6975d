"""The GRPO example's package: one concept per module.

- :mod:`.config`: the options (one dataclass, parsed from the command line) and the run plan;
- :mod:`.task`: problems, answer extraction and checking, JSONL rows, chat-template rendering;
  :mod:`.arith` (the toy's addition, character tokenizer) and :mod:`.chat` (few-shot chat questions
  for pretrained instruct models) generate tasks in code;
- :mod:`.policy`: the warm-started toy Qwen2 and any local checkpoint; :mod:`.smollm2`:
  SmolLM2-135M-Instruct from its GGUF file;
- :mod:`.rollout`: sampling and scoring completions, the policy's logits on them, test accuracy;
- :mod:`.loss`: the GRPO objective as pure functions;
- :mod:`.methods`: GRPO, the paper's token rejection, the trust region, the predicted-KL step —
  the only place they differ;
- :mod:`.train`: the optimizer step and one run; :mod:`.measure`: what each step did;
- :mod:`.report`: the table and the figure; :mod:`.cli`: ``main``.
"""

import os

# everything is built or loaded locally: never reach for the Hub (set before transformers loads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
