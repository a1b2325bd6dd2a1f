"""How far RMSprop and AdamW move the weights in one short round at the same learning rate.

Why this exists: SPPO and SAIL run with RMSprop (the authors' optimizer; torch's defaults, as TRL's Trainer builds it:
alpha 0.99, no momentum, no bias correction), the DPO family with AdamW, and the recipe's rounds are short (80 pairs,
batch 8: 20 steps, warm-up 10%, linear decay). RMSprop's squared-gradient average starts at zero and is not
bias-corrected, so its first update is lr * g / sqrt(0.01 g^2) = 10 lr per coordinate and it stays above lr for tens
of steps; Adam's bias correction makes its first step exactly lr. This replays both optimizers on the same gradient
streams (constant, and independent standard normal per step) under the recipe's schedule and reports the mean
per-coordinate displacement in units of the peak lr.
Run: python -m bench.optimizer_steps [--steps 20] [--warmup-ratio 0.1]
"""

from __future__ import annotations

import argparse
import math

from bench.common import machine, md_table, save


def schedule(steps: int, warmup_ratio: float) -> list[float]:
    """transformers' linear schedule with warm-up, as a fraction of the peak lr at each step."""
    warm = math.ceil(warmup_ratio * steps)
    return [(s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm)) for s in range(steps)]


def displacement(optimizer: str, grads, lrs: list[float]) -> dict:
    import torch

    p = torch.zeros(grads[0].numel(), requires_grad=True)
    make = {"adamw": lambda: torch.optim.AdamW([p], lr=1.0, weight_decay=0.0),
            "rmsprop": lambda: torch.optim.RMSprop([p], lr=1.0)}
    opt, first = make[optimizer](), None
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        if first is None:
            first = (p.detach() - before).abs().mean().item() / lr
    return {"first_step_over_lr": first, "displacement_over_peak_lr": p.detach().abs().mean().item()}


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    a = ap.parse_args(argv)
    lrs = schedule(a.steps, a.warmup_ratio)
    torch.manual_seed(0)
    streams = {"constant": [torch.ones(10_000)] * a.steps,
               "random": [torch.randn(10_000) for _ in range(a.steps)]}
    rows = []
    for name, grads in streams.items():
        d = {o: displacement(o, grads, lrs) for o in ("adamw", "rmsprop")}
        rows.append({"gradients": name, **{f"{o} first step / lr": d[o]["first_step_over_lr"] for o in d},
                     **{f"{o} displacement / lr": d[o]["displacement_over_peak_lr"] for o in d},
                     "rmsprop / adamw": d["rmsprop"]["displacement_over_peak_lr"] /
                     d["adamw"]["displacement_over_peak_lr"]})
    save("optimizer_steps", {"bench": "optimizer_steps", "machine": machine(), "settings": vars(a), "rows": rows})
    print(md_table(rows, list(rows[0])))
    return {"rows": rows}


if __name__ == "__main__":
    main()
