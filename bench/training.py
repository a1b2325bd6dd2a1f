"""Training: the train stage vs stock TRL DPOTrainer, same model, pairs, batch size, sequence limits and seed.

Stock TRL runs with its own defaults (bf16 on, gradient checkpointing on, a live reference model forward every
step). The stage runs as the product does: the reference log-probs computed once in a no-grad pass, no activation
checkpointing, bf16 autocast, the fused LM head of ``pipeline_lib/fused_head.py``. Each side runs in its own process
(clean peak RSS).
Reported: tokens/s (non-pad tokens of both sequences of every pair, times epochs, over the training wall time
including the reference pass), peak RSS, the loss after N steps (must agree: |delta| <= 0.01), and model FLOP
utilisation: (6·N·tokens for the policy + 2·N·tokens for the reference) / s over the measured bf16 matmul peak.
``--precision fp32`` turns bf16 off on both sides. In bf16 the product computes in stock TRL's arithmetic (same fused
LM head arithmetic, reference in the training batches' shapes), so the two loss curves should be identical.
Run: python -m bench.training [--model REF] [--pairs 48] [--steps 12] [--batch 4] [--precision bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, matmul_peak_tflops, md_table, peak_rss_gib, save


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
    if side == "stock":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_dict({"prompt": df.prompt_text.tolist(), "chosen": df.chosen.tolist(),
                                "rejected": df.rejected.tolist()})
        with tempfile.TemporaryDirectory() as out:
            args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                             max_length=max_length, seed=0, data_seed=0, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=bf16,
                             dataloader_num_workers=0)  # everything else: TRL's defaults (bf16, checkpointing)
            model = AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32)
            timer = step_timer()
            t0 = time.perf_counter()  # from building the trainer (tokenisation, reference copy) to trained
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
            t1 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            setup_s, train_s = t1 - t0, wall - (t1 - t0)
            log = trainer.state.log_history
        ref_tokens = n_tokens_epoch * epochs  # live reference: one forward per training sequence
    else:
        from pipeline_lib.artifacts import write_table
        from pipeline_lib.config import TrainConfig
        from pipeline_lib.losses import MethodConfig
        from pipeline_lib.training import train

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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--tag", default="", help="results go to bench/results/training[_TAG].json")
    ap.add_argument("--one", choices=["stock", "product"])
    ap.add_argument("--pairs-path")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.one:  # child process: one side only
        res = run_one(a.one, a.model, a.pairs_path, a.steps, a.batch, a.max_length, a.lr, a.precision == "bf16")
        Path(a.out).write_text(json.dumps(res))
        return res
    from pipeline_lib.models import resolve

    peak = matmul_peak_tflops("bfloat16")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = f"{tmp}/pairs.parquet"
        synthetic_pairs(resolve(a.model).path, a.pairs).to_parquet(pairs_path)
        for side in ("stock", "product"):
            out = f"{tmp}/{side}.json"
            subprocess.run([sys.executable, "-m", "bench.training", "--one", side, "--model", a.model,
                            "--pairs-path", pairs_path, "--out", out, "--steps", str(a.steps), "--batch",
                            str(a.batch), "--max-length", str(a.max_length), "--lr", str(a.lr),
                            "--precision", a.precision], check=True)
            r = json.loads(Path(out).read_text())
            r["mfu"] = r["achieved_tflops"] / peak
            rows.append(r)
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    dloss = abs(rows[1]["loss_at_last_step"] - rows[0]["loss_at_last_step"])
    result = {"bench": "training", "machine": machine(), "settings": vars(a), "bf16_matmul_peak_tflops": peak,
              "rows": rows, "speedup": speedup, "loss_abs_delta": dloss, "targets": {"speedup": 1.5, "dloss": 0.01}}
    save("training" + (f"_{a.tag}" if a.tag else ""), result)
    print(md_table(rows, ["side", "tokens_per_s", "wall_s", "setup_s", "train_s", "steady_step_s", "peak_rss_gib",
                          "loss_at_last_step", "mfu"]))
    print(f"\nspeed-up {speedup:.2f}x (target >= 1.5x); |loss delta| {dloss:.4f} (target <= 0.01); "
          f"bf16 matmul peak {peak:.2f} TFLOP/s")
    return result


if __name__ == "__main__":
    main()
