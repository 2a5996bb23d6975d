"""The one-line CAPO wrap in a GRPO-style loop on a tiny transformers model (runs in seconds).

The policy is a 2-layer Qwen2 model built from a config (tied embeddings, SDPA attention, as real
checkpoints ship); the "task" rewards completions by how many of their tokens are even ids. Each
step samples G completions per prompt, normalises rewards within the group and takes a
policy-gradient step — through CAPO's whole-policy trust region, which scales every step so that
the policy's measured KL on the step's tokens stays within the bound.

    python examples/quickstart.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import curvopt


def main(steps: int = 8, prompts: int = 4, group: int = 8, new_tokens: int = 6) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config).eval()  # no dropout: the sampling policy is the trained one
    # an aggressive learning rate: the trust region keeps each step within 3e-4 nats per token
    opt = curvopt.CAPO(torch.optim.AdamW(model.parameters(), lr=3e-2), model=model)
    for step in range(steps):
        prompt = torch.randint(3, 32, (prompts, 4)).repeat_interleave(group, 0)
        with torch.no_grad():
            seqs = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        completion = seqs[:, prompt.shape[1] :]
        rewards = (completion % 2 == 0).float().mean(1)
        grouped = rewards.view(prompts, group)
        advantages = (
            (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        ).flatten()
        mask = torch.ones_like(completion, dtype=torch.bool)

        def forward(
            m: torch.nn.Module, seqs: torch.Tensor = seqs, start: int = prompt.shape[1] - 1
        ) -> torch.Tensor:
            return m(seqs).logits[:, start:-1]  # the completion logits [B, T, V] (t predicts t + 1)

        logits = forward(model)
        keep = opt.select(None, completion, advantages, mask, logits=logits, forward=forward)
        logp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        per_seq = (logp * keep).sum(1) / keep.sum(1).clamp(min=1)
        loss = -(per_seq * advantages).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        s = opt.stats
        print(
            f"step {step}: reward {rewards.mean():.3f}  whole-step KL {s['step_policy_shift']:.2e}"
            f"  scale {s['step_scale']:.3f}  KL taken {s['policy_shift_realised']:.2e}"
            f"  ({s['trust_region_trials']:.0f} trial forwards)"
        )


if __name__ == "__main__":
    main()
