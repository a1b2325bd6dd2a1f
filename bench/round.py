"""Orchestration overhead, scaling and memory of whole rounds.

- overhead: wall time of a round minus the time inside its stage functions (``stage_s`` logged per stage), as a share
  of the round: what Prefect, MLflow and artifact I/O cost;
- scaling: round wall time at 32, 64 and 128 training prompts (same K, same held-out set): growth per doubling;
- memory: peak RSS of the round's process and of its largest child (the vLLM worker).
By default the MLflow store exists before the round starts, as it does for every scheduled round after the first
(``--cold-store``: each round creates it, as a project's very first round does).
Each round runs in a fresh process (``alignflow run``) with its own work dir, so nothing is cached between sizes.
Run: python -m bench.round [--sizes 32 64 128] [--config configs/default.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, md_table, save

RSS_PROBE = ("import json,resource,runpy,sys;sys.argv=['alignflow']+sys.argv[1:];"
             "rc=0\ntry:\n runpy.run_module('pipeline_lib.cli',run_name='__main__')\nexcept SystemExit as e:\n rc=e.code\n"
             "print('RSS_JSON'+json.dumps({'self_gib':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20,"
             "'children_gib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/2**20}));sys.exit(rc)")


def run_round(config: str, n_train: int, overrides: list[str], warm_store: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="alignflow-bench-") as tmp:
        store_s = 0.0
        if warm_store:  # a scheduled round finds its MLflow store in place; creating one is a one-time cost
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; from pipeline_lib.lineage import RoundLineage; "
                            "RoundLineage(sys.argv[1], 'alignflow')", f"sqlite:///{tmp}/mlflow.db"], check=True)
            store_s = time.perf_counter() - t0
        args = [sys.executable, "-c", RSS_PROBE, "run", "--config", config, "--json", "--quiet",
                f"prompts.n_train={n_train}", f"run.work_dir={tmp}/work",
                f"run.mlflow_tracking_uri=sqlite:///{tmp}/mlflow.db", *overrides]
        t0 = time.perf_counter()
        p = subprocess.run(args, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        per_stage = stage_breakdown(f"sqlite:///{tmp}/mlflow.db") if p.returncode == 0 else {}
    if p.returncode != 0:
        raise RuntimeError(f"round with {n_train} prompts failed:\n{p.stderr[-3000:]}")
    out = p.stdout
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1].split("RSS_JSON")[0])
    rss = json.loads(out.split("RSS_JSON", 1)[1].strip().splitlines()[0])
    return {"n_train": n_train, "process_wall_s": wall, "round_wall_s": summary["wall_s"],
            "stage_s": summary["stage_s"], "overhead_share": summary["overhead_share"],
            "peak_rss_gib": rss["self_gib"], "peak_rss_child_gib": rss["children_gib"],
            "n_pairs": summary["pairs"]["n_pairs"], "per_stage_s": per_stage, "warm_store": warm_store,
            "store_create_s_incl_python_start": store_s}


def stage_breakdown(tracking_uri: str) -> dict[str, float]:
    """Seconds inside each stage function (the ``stage_s`` of its MLflow child run), summed by run name, so the
    growth of each stage can be read apart from the fixed-size held-out evaluation."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    out: dict[str, float] = {}
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], filter_string="metrics.stage_s >= 0"):
            if "mlflow.parentRunId" not in r.data.tags:
                continue  # the round's own run logs the total
            name = r.data.tags.get("mlflow.runName", "?")
            out[name] = out.get(name, 0.0) + r.data.metrics["stage_s"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--cold-store", action="store_true",
                    help="let each round create its MLflow store (a first round's one-time cost, ~2.5 s here)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    rows = [run_round(a.config, n, a.overrides, warm_store=not a.cold_store) for n in a.sizes]
    growth = [rows[i + 1]["round_wall_s"] / rows[i]["round_wall_s"] for i in range(len(rows) - 1)]
    result = {"bench": "round", "machine": machine(), "settings": vars(a), "rows": rows,
              "growth_per_doubling": growth, "targets": {"overhead_share": 0.03, "growth": 2.1, "peak_rss_gib": 8}}
    save("round", result)
    print(md_table(rows, ["n_train", "round_wall_s", "stage_s", "overhead_share", "peak_rss_gib",
                          "peak_rss_child_gib", "n_pairs"]))
    print("\ngrowth per doubling: " + ", ".join(f"{g:.2f}x" for g in growth) + " (target <= 2.1x)")
    stages = sorted({k for r in rows for k in r["per_stage_s"]})
    print("\nseconds inside each stage:\n" + md_table(
        [{"stage": st, **{str(r["n_train"]): r["per_stage_s"].get(st, 0.0) for r in rows}} for st in stages],
        ["stage"] + [str(r["n_train"]) for r in rows]))
    return result


if __name__ == "__main__":
    main()
