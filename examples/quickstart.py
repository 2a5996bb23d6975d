"""The one-line CAPO wrap in a GRPO-style loop on a tiny transformers model (runs in seconds).

The policy is a 2-layer Qwen2 model built from a config; the "task" rewards completions by how many
of their tokens are even ids. Each step samples G completions per prompt, normalises rewards within
the group, asks CAPO which tokens are safe to train on, and takes a masked policy-gradient step.

    python examples/quickstart.py
"""

from __future__ import annotations

import os

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import curvopt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = "eager"
    opt = curvopt.CAPO(
        torch.optim.AdamW(model.parameters(), lr=3e-4),
        head=model.lm_head,
        rule="symmetric",
        delta_h=1e-2,
        delta_f=1e-4,  # the paper's thresholds
        track_realised=True,
    )
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

        out = model(seqs, output_hidden_states=True)
        start = prompt.shape[1] - 1  # position t predicts token t + 1
        hidden = out.hidden_states[-1][:, start:-1]  # [B, T, H], the states entering lm_head
        logits = out.logits[:, start:-1]  # [B, T, V]
        keep = opt.select(hidden, completion, advantages, mask, logits=logits)

        logp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        per_seq = (logp * keep).sum(1) / keep.sum(1).clamp(min=1)
        loss = -(per_seq * advantages).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        s = opt.stats
        print(
            f"step {step}: reward {rewards.mean():.3f}  rejected {s['rejected_frac']:.1%}  "
            f"m_F mean {s['policy_shift_mean']:.2e}  "
            f"realised KL {s.get('policy_shift_realised', 0.0):.2e}  "
            f"skipped {s['skipped_steps']:.0f}"
        )


if __name__ == "__main__":
    main()
