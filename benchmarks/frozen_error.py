"""How far the frozen direction is from the exact candidate update (Adam/AdamW).

A linear softmax head is trained for a few steps with AdamW on a batch-mean policy-gradient loss
(so Adam's moments are those of real batch gradients), then every token-level candidate of a fresh
batch is modelled with ``direction="exact"`` on the full vocabulary (the definition), with
``direction="frozen"`` (the default) and with the paper's truncation ``direction="exact",
top_k=50``. Prints, per setting, the distribution over tokens of approximation/exact for m_F, the
relative error of m_H, and the fraction of tokens on which the two disagree about the paper's rule
(|m_H| < 1e-2, m_F < 1e-4).

    python benchmarks/frozen_error.py
"""

from __future__ import annotations

import argparse

import torch

from curvopt import CurvatureTracker, SampleRejector


def trained_head(V: int, H: int, n_tokens: int, steps: int, lr: float, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) * scale / H**0.5)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)

    def batch():
        h = torch.randn(n_tokens, 1, H, generator=gen)
        with torch.no_grad():
            probs = torch.softmax(head(h), -1)
        actions = torch.multinomial(probs.reshape(-1, V), 1, generator=gen).reshape(n_tokens, 1)
        advantages = torch.randn(n_tokens, generator=gen)
        return h, actions, advantages, torch.ones(n_tokens, 1, dtype=torch.bool)

    for _ in range(steps):
        h, a, adv, _ = batch()
        logp = torch.log_softmax(head(h), -1).gather(-1, a[..., None]).squeeze(-1)
        opt.zero_grad()
        (-(logp * adv[:, None]).mean()).backward()
        opt.step()
    return head, opt, batch()


def compare(V, H, n_tokens, steps, lr, scale, seed=0, approx: dict | None = None) -> dict:
    """Token candidates of ``approx`` (default: ``direction="frozen"``) against exact ones."""
    head, opt, (h, a, adv, mask) = trained_head(V, H, n_tokens, steps, lr, scale, seed)
    ex = CurvatureTracker(head, opt, direction="exact").quadratic_model(h, a, adv, mask)
    tracker = CurvatureTracker(head, opt, **(approx or {"direction": "frozen"}))
    fr = tracker.quadratic_model(h, a, adv, mask)
    ratio = (fr.policy_shift / ex.policy_shift).flatten()
    rel_h = ((fr.objective_shift - ex.objective_shift).abs() / ex.objective_shift.abs()).flatten()
    rule = SampleRejector("symmetric", delta_h=1e-2, delta_f=1e-4)
    disagree = (rule.accept(ex) != rule.accept(fr)).float().mean()
    with torch.no_grad():
        probs = torch.softmax(head(h), -1)
    return {
        "V": V,
        "H": H,
        "N": n_tokens,
        "steps": steps,
        "lr": lr,
        "max_prob": float(probs.max(-1).values.median()),
        "top50_mass": float(probs.topk(min(50, V), -1).values.sum(-1).median()),
        "mF_ratio_median": float(ratio.median()),
        "mF_ratio_p10": float(ratio.quantile(0.1)),
        "mF_ratio_p90": float(ratio.quantile(0.9)),
        "mH_relerr_median": float(rel_h.median()),
        "rule_disagreement": float(disagree),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings")
    args = parser.parse_args()
    settings = [
        dict(V=64, H=32, n_tokens=256, steps=20, lr=1e-3, scale=1.0),
        dict(V=64, H=32, n_tokens=1024, steps=20, lr=1e-3, scale=1.0),
        dict(V=512, H=64, n_tokens=1024, steps=20, lr=1e-3, scale=4.0),
        dict(V=512, H=64, n_tokens=1024, steps=0, lr=1e-3, scale=4.0),
    ]
    if not args.quick:
        settings += [
            dict(V=2048, H=128, n_tokens=1024, steps=20, lr=3e-4, scale=3.0),
            dict(V=2048, H=128, n_tokens=1024, steps=20, lr=3e-4, scale=6.0),
        ]
    header = (
        "model",
        "V",
        "H",
        "N",
        "steps",
        "max_prob",
        "top50_mass",
        "mF_ratio_median",
        "mF_ratio_p10",
        "mF_ratio_p90",
        "mH_relerr_median",
        "rule_disagreement",
    )
    print(" | ".join(header))
    for s in settings:
        for name, approx in (("frozen", None), ("exact top-50", dict(direction="exact", top_k=50))):
            if approx is not None and s["V"] <= 50:
                continue
            r = {"model": name, **compare(**s, approx=approx)}
            print(
                " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in header)
            )


if __name__ == "__main__":
    main()
