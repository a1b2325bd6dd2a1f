"""Memory of sharded training: the train stage with ``train.num_processes: 2`` as whole copies (DDP) and sharded
(``train.fsdp: true``, FSDP2), same model, pairs, batch and steps, each configuration in a fresh process.

Reported per mode: the largest training process's peak RSS (RUSAGE_CHILDREN of the process that launched torchrun:
the maximum over its waited-for descendants, i.e. the largest rank), wall time, the share of the parameters rank 0
held (``local_parameter_share``), and the final loss, which must agree between the two modes (same arithmetic, only
where the weights live differs). On CPU the ranks are gloo processes on one machine; what this shows is how the
per-rank footprint changes with sharding, not GPU memory.
Run: python -m bench.sharded_training [--model REF] [--pairs 16] [--steps 2] [--batch 2] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from bench.common import machine, md_table, save

MODES = {"ddp": {}, "fsdp": {"fsdp": True}}

CHILD = r"""
import json, resource, sys
from pipeline_lib.artifacts import read_manifest, write_table
from pipeline_lib.methods import MethodConfig
from pipeline_lib.models import resolve
from pipeline_lib.stages.train import TrainConfig, run
import pandas as pd
a = json.loads(sys.argv[1])
model = resolve(a["model"])
pairs = write_table(pd.read_parquet(a["pairs"]), a["work"] + "/pairs", name="pairs", producer="bench")
cfg = TrainConfig(batch_size=a["batch"], num_processes=2, max_steps=a["steps"], max_length=a["max_length"],
                  warmup_ratio=0.0, bf16=True, **a["mode"])
ref = run(model, pairs, cfg, MethodConfig(), a["work"], quiet=True)
m = read_manifest(ref.path)["metrics"]
print("RESULT" + json.dumps({"peak_rank_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                             "local_parameter_share": m["local_parameter_share"], "train_loss": m["train_loss"],
                             "losses": [r["loss"] for r in read_manifest(ref.path)["log_history"] if "loss" in r]}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args(argv)
    from bench.training import synthetic_pairs
    from pipeline_lib.models import resolve

    rows = []
    with tempfile.TemporaryDirectory(prefix="alignflow-bench-fsdp-") as tmp:
        synthetic_pairs(resolve(a.model).path, a.pairs).to_parquet(f"{tmp}/pairs.parquet")
        for name, mode in MODES.items():
            spec = {"model": a.model, "pairs": f"{tmp}/pairs.parquet", "work": f"{tmp}/{name}", "batch": a.batch,
                    "steps": a.steps, "max_length": a.max_length, "mode": mode}
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{name}: {p.stderr[-3000:]}")
            res = json.loads(p.stdout.split("RESULT", 1)[1].splitlines()[0])
            rows.append({"mode": name, "wall_s": time.perf_counter() - t0, **res})
    result = {"bench": "sharded_training", "machine": machine(), "settings": vars(a), "rows": rows,
              "loss_abs_delta": max(abs(x - y) for x, y in zip(rows[0]["losses"], rows[1]["losses"]))}
    save("sharded_training", result)
    print(md_table(rows, ["mode", "peak_rank_rss_gib", "local_parameter_share", "wall_s", "train_loss"]))
    print(f"max |loss delta| between modes: {result['loss_abs_delta']:.2e}")
    return result


if __name__ == "__main__":
    main()
