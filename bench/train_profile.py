"""Where the train stage's step time goes: forward (body), LM head, backward (body / head), optimizer, gradient
clipping, data collation, and the rest (the Trainer's Python between them), per steady optimizer step.

The stage is built as ``pipeline_lib.stages.train.fit.fit`` builds it (AlignTrainer, the stage's DPOConfig, the
exact fused head) on ``bench.training``'s synthetic pairs, and timed by wrapping the pieces in place: the collator, the
backbone's forward, ``ExactChunkedLogProbs.forward``/``backward``, ``accelerator.backward``, the gradient clip and
the optimizer step. Body backward = backward − head backward; other = step − everything measured. Wrapping changes
no arithmetic (the wrapped calls run as they would). ``--ops`` adds torch.profiler's top operators over two steps.
Run: python -m bench.train_profile [--steps 6] [--batch 4] [--pairs 24] [--ops]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PARTS = ["collate", "body_forward", "head_forward", "head_backward", "body_backward", "clip_grad", "optimizer",
         "other"]


class Clock:
    """Seconds spent inside each wrapped call, per optimizer step (nested calls are not double-counted: the head
    runs inside the model forward, which is timed as the backbone only)."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.t_step = None

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.now[name] += time.perf_counter() - t
        return timed

    def begin(self):
        self.now = defaultdict(float)
        self.t_step = time.perf_counter()

    def end(self):
        row = dict(self.now)
        row["step"] = time.perf_counter() - self.t_step
        row["backward"] = row.get("backward", 0.0)
        row["body_backward"] = row["backward"] - row.get("head_backward", 0.0)
        row["other"] = row["step"] - sum(row.get(k, 0.0) for k in PARTS if k != "other")
        self.steps.append(row)


def profile(model_ref: str, pairs: int, steps: int, batch: int, max_length: int, ops: bool) -> dict:
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from bench.training import synthetic_pairs
    from pipeline_lib import fused_head
    from pipeline_lib.config import TrainConfig
    from pipeline_lib.methods import MethodConfig
    from pipeline_lib.models import resolve
    from pipeline_lib.trainer import AlignTrainer
    from pipeline_lib.stages.train.fit import dpo_args, pairs_dataset

    m = resolve(model_ref)
    df: pd.DataFrame = synthetic_pairs(m.path, pairs)
    tok = AutoTokenizer.from_pretrained(m.path)
    clock = Clock()
    # the head's autograd function: wrap its static methods for the run (restored below)
    f_cls = fused_head.ExactChunkedLogProbs
    saved = f_cls.forward, f_cls.backward
    f_cls.forward = staticmethod(clock.wrap("head_forward", saved[0]))
    f_cls.backward = staticmethod(clock.wrap("head_backward", saved[1]))
    prof_rows = None
    try:
        with tempfile.TemporaryDirectory() as work:
            cfg = TrainConfig(batch_size=batch, max_steps=steps, learning_rate=5e-6, max_length=max_length, seed=0,
                              warmup_ratio=0.0, bf16=True)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32)
            args = dpo_args(cfg, Path(work), len(df))
            method = MethodConfig()
            t0 = time.perf_counter()
            trainer = AlignTrainer(model=model, args=args, train_dataset=pairs_dataset(df, method),
                                   processing_class=tok, method=method)
            setup_s = time.perf_counter() - t0
            # the body: the backbone the fused forward calls (self.base_model)
            body = trainer.model.base_model
            body.forward = clock.wrap("body_forward", body.forward)
            trainer.data_collator = clock.wrap("collate", trainer.data_collator)
            acc = trainer.accelerator
            acc.backward = clock.wrap("backward", acc.backward)
            acc.clip_grad_norm_ = clock.wrap("clip_grad", acc.clip_grad_norm_)
            create = trainer.create_optimizer

            def create_optimizer(*a, **kw):
                opt = create(*a, **kw)
                opt.step = clock.wrap("optimizer", opt.step)
                return opt
            trainer.create_optimizer = create_optimizer

            class Steps(TrainerCallback):
                # on_step_begin runs after the batch is fetched: start at the previous step's end instead, so the
                # next batch's collation falls inside the step it feeds
                def on_train_begin(self, *a, **kw):
                    clock.begin()

                def on_step_end(self, *a, **kw):
                    clock.end()
                    clock.begin()

            trainer.add_callback(Steps())
            if ops:
                from torch.profiler import ProfilerActivity, profile as tprof, schedule

                class Prof(TrainerCallback):
                    def __init__(self):
                        self.p = tprof(activities=[ProfilerActivity.CPU], record_shapes=True,
                                       schedule=schedule(wait=2, warmup=0, active=2, repeat=1))

                    def on_train_begin(self, *a, **kw):
                        self.p.__enter__()

                    def on_step_end(self, *a, **kw):
                        self.p.step()

                    def on_train_end(self, *a, **kw):
                        self.p.__exit__(None, None, None)

                pcb = Prof()
                trainer.add_callback(pcb)
            trainer.train()
            if ops:
                ka = pcb.p.key_averages()
                total = sum(e.self_cpu_time_total for e in ka) or 1.0
                prof_rows = [{"op": e.key, "self_s_per_step": e.self_cpu_time_total / 2 / 1e6,
                              "share": e.self_cpu_time_total / total, "calls_per_step": e.count / 2}
                             for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]]
                by_shape = pcb.p.key_averages(group_by_input_shape=True)
                shape_rows = [{"op": e.key, "shapes": str(e.input_shapes)[:90],
                               "self_s_per_step": e.self_cpu_time_total / 2 / 1e6, "calls_per_step": e.count / 2}
                              for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:40]]
    finally:
        f_cls.forward, f_cls.backward = (staticmethod(saved[0]), staticmethod(saved[1]))
    steady = clock.steps[2:] or clock.steps  # the first steps allocate and warm the allocator
    keys = PARTS + ["step"]
    med = {k: sorted(r.get(k, 0.0) for r in steady)[len(steady) // 2] for k in keys}
    mean = {k: sum(r.get(k, 0.0) for r in steady) / len(steady) for k in keys}
    return {"setup_s": setup_s, "per_step": clock.steps, "median": med, "mean": mean,
            "share": {k: mean[k] / mean["step"] for k in PARTS}, "top_ops": prof_rows, "top_ops_by_shape": shape_rows if ops else None,
            "load_avg": os.getloadavg()}


def main(argv=None) -> dict:
    from bench.common import machine, md_table, save

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    res = profile(a.model, a.pairs, a.steps, a.batch, a.max_length, a.ops)
    res.update(bench="train_profile", machine=machine(), settings=vars(a))
    save("train_profile" + (f"_{a.tag}" if a.tag else ""), res)
    print(md_table([{"part": k, "mean_s": res["mean"][k], "median_s": res["median"][k], "share": res["share"][k]}
                    for k in PARTS] + [{"part": "step", "mean_s": res["mean"]["step"],
                                        "median_s": res["median"]["step"], "share": 1.0}],
                   ["part", "mean_s", "median_s", "share"]))
    if res["top_ops"]:
        print("\n" + md_table(res["top_ops"], ["op", "self_s_per_step", "share", "calls_per_step"]))
        print("\n" + md_table(res["top_ops_by_shape"], ["op", "shapes", "self_s_per_step", "calls_per_step"]))
    print(f"\nload average during the run: {', '.join(f'{x:.1f}' for x in res['load_avg'])}")
    return res


if __name__ == "__main__":
    main()
