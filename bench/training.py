"""Training: the train stage vs stock TRL DPOTrainer at its defaults and tuned, same model, pairs, batch size,
sequence limits, seed and data order.

Three sides, each in its own process (clean peak RSS):
- ``stock``: TRL's defaults (bf16 on, gradient checkpointing on, a live reference model forward every step);
- ``stock_tuned``: TRL as an expert would set it for a small model: ``precompute_ref_log_probs=True`` (one no-grad
  reference pass up front, in TRL's sequential batches of the training batch size) and
  ``gradient_checkpointing=False``;
- ``product``: the stage as the product runs it: the reference log-probs computed once in the first epoch's
  batches, no activation checkpointing, bf16 autocast, the fused LM head of ``pipeline_lib/fused_head.py``.
Reported per side: tokens/s (non-pad tokens of both sequences of every pair, times epochs, over the training wall
time including tokenisation and the reference pass), steady step time (median, first two steps excluded), peak RSS,
the whole loss curve, and model FLOP utilisation: (6·N·tokens for the policy + 2·N·tokens for each reference
forward) / s over the bf16 matmul peak measured in the same invocation. The ratio that counts is the stage's
tokens/s over the best stock side's; the loss curves must agree (|delta| <= 0.01 at every logged step).
``--repeats R`` runs the sides interleaved (stock, tuned, product, stock, ...) so that load on a shared machine hits
them alike; each side's figures are then the medians over its runs, and every run's load average is kept.
``--precision fp32`` turns bf16 off on every side. In bf16 the product computes in stock TRL's arithmetic (same fused
LM head arithmetic, reference in the training batches' shapes), so its loss curve is the stock defaults' bit for bit;
the tuned side scores its reference in other batch shapes, which rounds differently in bf16 (a few 1e-3 of loss).
Run: python -m bench.training [--model REF] [--pairs 48] [--steps 12] [--batch 4] [--precision bf16|fp32]
                              [--sides stock stock_tuned product] [--repeats 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, matmul_peak_tflops, md_table, peak_rss_gib, save

# the stock sides' DPOConfig beyond what every side shares (TRL's defaults: gradient checkpointing on, live reference)
STOCK_SIDES = {"stock": {}, "stock_tuned": {"precompute_ref_log_probs": True, "gradient_checkpointing": False}}
SIDES = [*STOCK_SIDES, "product"]


def synthetic_pairs(model_path: str, n: int, seed: int = 0):
    """Deterministic pairs of realistic shape: built-in prompts, responses of 30-110 words from the prompt's
    vocabulary (content does not matter for throughput; both trainers see exactly the same rows)."""
    import random

    import pandas as pd
    from transformers import AutoTokenizer

    from pipeline_lib.generation.sampling import render_chat
    from pipeline_lib.prompts.builtin import generate_prompts

    rng = random.Random(seed)
    prompts = generate_prompts(n, seed, "train")["prompt"].tolist()
    tok = AutoTokenizer.from_pretrained(model_path)
    texts, _ = render_chat(tok, [[{"role": "user", "content": p}] for p in prompts])
    words = " ".join(prompts).split()
    resp = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(30, 110)))  # noqa: E731
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "prompt": prompts, "prompt_text": texts,
                         "chosen": [resp() for _ in range(n)], "rejected": [resp() for _ in range(n)]})


def count_tokens(tok, df) -> int:
    n = 0
    for p, c, r in zip(df.prompt_text, df.chosen, df.rejected):
        n += len(tok(p + c + tok.eos_token, add_special_tokens=False)["input_ids"])
        n += len(tok(p + r + tok.eos_token, add_special_tokens=False)["input_ids"])
    return n


def step_timer():
    """A TrainerCallback recording wall time at every optimizer step end (steady-state step time, warm-up excluded)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def steady_step_s(self, skip: int = 2) -> float | None:
            d = sorted(b - a for a, b in zip(self.times[skip:], self.times[skip + 1:]))
            return d[len(d) // 2] if d else None

    return StepTimer()


def run_one(side: str, model_ref: str, pairs_path: str, steps: int, batch: int, max_length: int, lr: float,
            bf16: bool = True) -> dict:
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline_lib.models import resolve

    torch.manual_seed(0)
    m = resolve(model_ref)
    df = pd.read_parquet(pairs_path)
    tok = AutoTokenizer.from_pretrained(m.path)
    n_tokens_epoch = count_tokens(tok, df)
    epochs = steps * batch / len(df)
    if side in STOCK_SIDES:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_dict({"prompt": df.prompt_text.tolist(), "chosen": df.chosen.tolist(),
                                "rejected": df.rejected.tolist()})
        with tempfile.TemporaryDirectory() as out:
            args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                             max_length=max_length, seed=0, data_seed=0, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=bf16,
                             dataloader_num_workers=0, **STOCK_SIDES[side])  # the rest: TRL's defaults
            model = AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32)
            timer = step_timer()
            t0 = time.perf_counter()  # from building the trainer (tokenisation, reference copy) to trained
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
            t1 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            setup_s, train_s = t1 - t0, wall - (t1 - t0)
            log = trainer.state.log_history
        # live reference: one forward per training sequence; precomputed: one pass over the pairs
        ref_tokens = n_tokens_epoch if STOCK_SIDES[side].get("precompute_ref_log_probs") else n_tokens_epoch * epochs
    else:
        from pipeline_lib.artifacts import write_table
        from pipeline_lib.stages.train import TrainConfig
        from pipeline_lib.methods import MethodConfig
        from pipeline_lib.stages.train import run as train

        with tempfile.TemporaryDirectory() as work:
            pairs = write_table(df, Path(work) / "pairs", name="pairs", producer="bench")
            cfg = TrainConfig(batch_size=batch, max_steps=steps, learning_rate=lr, max_length=max_length, seed=0,
                              warmup_ratio=0.0, bf16=bf16)
            timer = step_timer()
            ref = train(m, pairs, cfg, MethodConfig(), work, quiet=True, callbacks=[timer])
            manifest = json.loads((Path(ref.path) / "manifest.json").read_text())
            # the same span as stock: trainer built (tokenisation, reference pass) to trained; not load or save
            setup_s, train_s = manifest["metrics"]["setup_s"], manifest["metrics"]["train_s"]
            wall = setup_s + train_s
            log = manifest["log_history"]
        ref_tokens = n_tokens_epoch  # one no-grad reference pass over the pairs
    losses = [r["loss"] for r in log if "loss" in r]
    train_tokens = n_tokens_epoch * epochs
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(m.path).parameters())
    flops = 6 * n_params * train_tokens + 2 * n_params * ref_tokens
    return {"side": side, "wall_s": wall, "setup_s": setup_s, "train_s": train_s,
            "steady_step_s": timer.steady_step_s(), "tokens": train_tokens, "tokens_per_s": train_tokens / wall,
            "loss_at_last_step": losses[-1], "losses": losses, "peak_rss_gib": peak_rss_gib(),
            "achieved_tflops": flops / wall / 1e12, "n_params": n_params}


def _median(runs: list[dict], key: str):
    """The median of a figure over runs; None when no run has it (a steady step needs more than two steps)."""
    vals = sorted(r[key] for r in runs if r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


def summarise(runs: list[dict], peak: float) -> list[dict]:
    """One row per side: the median of its runs' tokens/s, wall, setup and steady step (the run closest to the
    median tokens/s gives the loss curve and RSS: every run of a side trains the same, so they agree anyway)."""
    rows = []
    for side in dict.fromkeys(r["side"] for r in runs):
        mine = sorted((r for r in runs if r["side"] == side), key=lambda r: r["tokens_per_s"])
        mid = mine[len(mine) // 2]
        med = functools.partial(_median, mine)
        row = {**mid, "runs": len(mine), "tokens_per_s": med("tokens_per_s"), "wall_s": med("wall_s"),
               "setup_s": med("setup_s"), "train_s": med("train_s"), "steady_step_s": med("steady_step_s"),
               "achieved_tflops": med("achieved_tflops"), "peak_rss_gib": max(r["peak_rss_gib"] for r in mine),
               "tokens_per_s_all": [r["tokens_per_s"] for r in mine], "load_avg_all": [r["load_avg"] for r in mine]}
        row["mfu"] = row["achieved_tflops"] / peak
        rows.append(row)
    return rows


def compare(rows: list[dict]) -> dict:
    """The stage against each stock side and against the best of them: tokens/s ratio and the largest |loss delta|
    over the logged steps."""
    by = {r["side"]: r for r in rows}
    prod = by.get("product")
    stock = [r for r in rows if r["side"] in STOCK_SIDES]
    if prod is None or not stock:
        return {}
    out = {}
    for r in stock:
        n = min(len(r["losses"]), len(prod["losses"]))
        out[r["side"]] = {"speedup": prod["tokens_per_s"] / r["tokens_per_s"],
                          "step_speedup": (r["steady_step_s"] or 0) / (prod["steady_step_s"] or 1),
                          "max_loss_abs_delta": max(abs(a - b) for a, b in zip(r["losses"][:n], prod["losses"][:n])),
                          "loss_abs_delta_last": abs(r["losses"][-1] - prod["losses"][-1])}
    best = max(stock, key=lambda r: r["tokens_per_s"])
    out["best_stock"] = {"side": best["side"], **out[best["side"]]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per side (medians reported)")
    ap.add_argument("--tag", default="", help="results go to bench/results/training[_TAG].json")
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--pairs-path")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.one:  # child process: one side only
        res = run_one(a.one, a.model, a.pairs_path, a.steps, a.batch, a.max_length, a.lr, a.precision == "bf16")
        Path(a.out).write_text(json.dumps(res))
        return res
    import os

    from pipeline_lib.models import resolve

    peaks = [matmul_peak_tflops("bfloat16")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = f"{tmp}/pairs.parquet"
        synthetic_pairs(resolve(a.model).path, a.pairs).to_parquet(pairs_path)
        for rep in range(a.repeats):
            for side in a.sides:
                out = f"{tmp}/{side}-{rep}.json"
                subprocess.run([sys.executable, "-m", "bench.training", "--one", side, "--model", a.model,
                                "--pairs-path", pairs_path, "--out", out, "--steps", str(a.steps), "--batch",
                                str(a.batch), "--max-length", str(a.max_length), "--lr", str(a.lr),
                                "--precision", a.precision], check=True)
                r = json.loads(Path(out).read_text())
                r.update(repeat=rep, load_avg=os.getloadavg())
                runs.append(r)
                print(f"  {side} run {rep + 1}/{a.repeats}: {r['tokens_per_s']:.1f} tokens/s, steady step "
                      f"{r['steady_step_s'] or float('nan'):.2f} s, load average {r['load_avg'][0]:.1f}", flush=True)
        peaks.append(matmul_peak_tflops("bfloat16"))  # before and after: the machine's state can drift
    peak = max(peaks)
    rows = summarise(runs, peak)
    cmp = compare(rows)
    result = {"bench": "training", "machine": machine(), "settings": vars(a), "bf16_matmul_peak_tflops": peak,
              "bf16_matmul_peak_tflops_before_after": peaks, "rows": rows, "runs": runs, "comparison": cmp,
              "targets": {"speedup_over_best_stock": 1.5, "max_loss_abs_delta": 0.01}}
    if cmp:  # the figures older readers of this file look for
        result.update(speedup=cmp["best_stock"]["speedup"], loss_abs_delta=cmp["best_stock"]["loss_abs_delta_last"])
    save("training" + (f"_{a.tag}" if a.tag else ""), result)
    print(md_table(rows, ["side", "tokens_per_s", "wall_s", "setup_s", "steady_step_s", "peak_rss_gib", "mfu",
                          "loss_at_last_step", "runs"]))
    steps = max(len(r["losses"]) for r in rows)
    print("\nloss curves (every logged step):\n" + md_table(
        [{"step": i + 1, **{r["side"]: r["losses"][i] for r in rows if i < len(r["losses"])}} for i in range(steps)],
        ["step", *[r["side"] for r in rows]]))
    for side, c in cmp.items():
        if side != "best_stock":
            print(f"product vs {side}: {c['speedup']:.2f}x tokens/s, {c['step_speedup']:.2f}x steady step, "
                  f"max |loss delta| {c['max_loss_abs_delta']:.4f}")
    if cmp:
        b = cmp["best_stock"]
        print(f"\nagainst the best stock side ({b['side']}): {b['speedup']:.2f}x tokens/s (target >= 1.5x), "
              f"max |loss delta| {b['max_loss_abs_delta']:.4f} (target <= 0.01)")
    print(f"bf16 matmul peak {peak:.2f} TFLOP/s (before/after: {', '.join(f'{p:.2f}' for p in peaks)}); "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return result


if __name__ == "__main__":
    main()
