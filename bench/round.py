"""Orchestration overhead, scaling and memory of whole rounds.

- overhead: wall time of a round minus the time inside its stage functions (``stage_s`` logged per stage), as a share
  of the round: what Prefect, MLflow and artifact I/O cost;
- scaling: round wall time at 32, 64 and 128 training prompts (same K, same held-out set): growth per doubling;
- memory: peak RSS of the round's process and of its largest child (the vLLM worker);
- roofline split: each stage's seconds beside its compute-roofline time (generated tokens x 2N FLOPs and the train
  stage's counted FLOPs, over the bf16 matmul peak measured in this run), and where the rest goes (engine start,
  sampling above the roofline, the trainer's set-up and reference pass, training above the roofline, the rest).
By default the MLflow store exists before the round starts, as it does for every scheduled round after the first
(``--cold-store``: each round creates it, as a project's very first round does).
Each round runs in a fresh process (``alignflow run``) with its own work dir, so nothing is cached between sizes.
Run: python -m bench.round [--sizes 32 64 128] [--config configs/default.yaml] [key=value ...]
     python -m bench.round --reuse-compare --sizes 64   # rounds with the kept vLLM worker off and on
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_round(config: str, n_train: int, overrides: list[str], warm_store: bool = True,
              env: dict | None = None) -> dict:
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
        p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        details = stage_details(f"sqlite:///{tmp}/mlflow.db") if p.returncode == 0 else {}
        per_stage = {name: d["stage_s"] for name, d in details.items()}
    if p.returncode != 0:
        raise RuntimeError(f"round with {n_train} prompts failed:\n{p.stderr[-3000:]}")
    out = p.stdout
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1].split("RSS_JSON")[0])
    rss = json.loads(out.split("RSS_JSON", 1)[1].strip().splitlines()[0])
    return {"n_train": n_train, "process_wall_s": wall, "round_wall_s": summary["wall_s"],
            "stage_s": summary["stage_s"], "overhead_share": summary["overhead_share"],
            "peak_rss_gib": rss["self_gib"], "peak_rss_child_gib": rss["children_gib"],
            "n_pairs": summary["pairs"]["n_pairs"], "per_stage_s": per_stage, "stage_details": details,
            "warm_store": warm_store,
            "store_create_s_incl_python_start": store_s}


# per-stage metrics of the round's MLflow child runs that the roofline split reads (summed by stage name)
DETAIL_KEYS = {"stage_s": "stage_s", "generated_tokens": "cost.generated_tokens", "generate_s": "cost.generate_s",
               "engine_load_s": "engine_load_s", "train_flops": "cost.train_flops",
               # the trainer's own seconds (cost.train_s adds the set-up, which the split shows apart)
               "train_s": "train_s",
               "setup_s": "setup_s"}


def stage_details(tracking_uri: str) -> dict[str, dict[str, float]]:
    """Per stage (summed by MLflow run name over the round's child runs; the round's own run logs the total): its
    ``stage_s`` and the metrics the roofline split reads, so the growth of each stage can also be read apart from the
    fixed-size held-out evaluation."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    out: dict[str, dict[str, float]] = {}
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], filter_string="metrics.stage_s >= 0"):
            if "mlflow.parentRunId" not in r.data.tags:
                continue
            row = out.setdefault(r.data.tags.get("mlflow.runName", "?"), {k: 0.0 for k in DETAIL_KEYS})
            for k, metric in DETAIL_KEYS.items():
                row[k] += float(r.data.metrics.get(metric, 0.0))
    return out


def roofline_split(details: dict[str, dict[str, float]], n_matmul: int, peak_tflops: float) -> list[dict]:
    """Per stage: its seconds, its compute-roofline seconds, and the seconds by where they went.

    roofline_s = (generated_tokens x 2N + train_flops) / peak: sampling's decode FLOPs (prompt prefill not counted,
    so a lower bound) plus the train stage's counted FLOPs (6N per trained token and 2N per token of the reference
    pass, pipeline_lib/cost/accounting.py). The seconds split into engine start (vLLM load, where logged), sampling
    (generate_s), the trainer's set-up (tokenising, the reference pass: setup_s), training (train_s) and the rest
    (model and tokenizer loads, scoring, artifact I/O; for the held-out evaluation also its engine start, which it
    does not log apart). A last row sums the stages."""
    peak = peak_tflops * 1e12
    rows = []
    for stage, d in sorted(details.items(), key=lambda kv: -kv[1]["stage_s"]):
        roof = (d["generated_tokens"] * 2 * n_matmul + d["train_flops"]) / peak
        setup = d["setup_s"] if d["train_flops"] else 0.0  # setup_s is the train stage's metric only
        parts = {"engine_load_s": d["engine_load_s"], "generate_s": d["generate_s"], "setup_s": setup,
                 "train_s": d["train_s"]}
        rows.append({"stage": stage, "stage_s": d["stage_s"], "roofline_s": roof, **parts,
                     "rest_s": d["stage_s"] - sum(parts.values()),
                     "x_roofline": d["stage_s"] / roof if roof else float("nan")})
    total = {"stage": "all stages", **{k: sum(r[k] for r in rows) for k in
                                         ("stage_s", "roofline_s", "engine_load_s", "generate_s", "setup_s",
                                          "train_s", "rest_s")}}
    total["x_roofline"] = total["stage_s"] / total["roofline_s"] if total["roofline_s"] else float("nan")
    return rows + [total]


def reuse_compare(config: str, n_train: int, overrides: list[str]) -> dict:
    """The kept vLLM worker's effect on a whole round: rounds with ALIGNFLOW_REUSE_WORKER off and on, in the order
    off, on, on, off (a drift of the machine during the runs falls on both sides alike), each in its own process and
    work dir; per side the mean round wall, and the seconds inside the generating stages."""
    runs = [(mode, run_round(config, n_train, overrides, env={"ALIGNFLOW_REUSE_WORKER": mode}))
            for mode in ("off", "on", "on", "off")]
    rows = [{"reuse_worker": m, "round_wall_s": r["round_wall_s"], **{f"{k} s": v for k, v in
                                                                      sorted(r["per_stage_s"].items())}}
            for m, r in runs]
    mean = {m: sum(r["round_wall_s"] for mm, r in runs if mm == m) / 2 for m in ("off", "on")}
    return {"rows": rows, "runs": [{"reuse_worker": m, **r} for m, r in runs], "mean_round_wall_s": mean,
            "saved_s": mean["off"] - mean["on"], "saved_share": 1 - mean["on"] / mean["off"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reuse-compare", action="store_true",
                    help="rounds at the first size with the kept vLLM worker off and on (off, on, on, off)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--cold-store", action="store_true",
                    help="let each round create its MLflow store (a first round's one-time cost, ~2.5 s here)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.reuse_compare:
        out = {"bench": "round_reuse", "machine": machine(), "settings": vars(a),
               **reuse_compare(a.config, a.sizes[0], a.overrides)}
        save("round_reuse", out)
        print(md_table(out["rows"], list(out["rows"][0])))
        print(f"\nmean round wall: off {out['mean_round_wall_s']['off']:.1f} s, on {out['mean_round_wall_s']['on']:.1f} s"
              f": {out['saved_s']:.1f} s saved ({out['saved_share']:.1%})")
        return out
    from bench.common import matmul_peak_tflops
    from bench.generation import matmul_params
    from pipeline_lib.config import load_config
    from pipeline_lib.models import resolve

    peak = matmul_peak_tflops("bfloat16")  # before the rounds, on a quiet machine, as bench.generation does
    n_matmul = matmul_params(resolve(load_config(a.config, a.overrides).policy).path)
    rows = [run_round(a.config, n, a.overrides, warm_store=not a.cold_store) for n in a.sizes]
    for r in rows:
        r["roofline_split"] = roofline_split(r["stage_details"], n_matmul, peak)
    growth = [rows[i + 1]["round_wall_s"] / rows[i]["round_wall_s"] for i in range(len(rows) - 1)]
    result = {"bench": "round", "machine": machine(), "settings": vars(a), "rows": rows,
              "peak_bf16_tflops": peak, "matmul_params": n_matmul,
              "growth_per_doubling": growth, "targets": {"overhead_share": 0.03, "growth": 2.1, "peak_rss_gib": 8}}
    save("round", result)
    print(md_table(rows, ["n_train", "round_wall_s", "stage_s", "overhead_share", "peak_rss_gib",
                          "peak_rss_child_gib", "n_pairs"]))
    print("\ngrowth per doubling: " + ", ".join(f"{g:.2f}x" for g in growth) + " (target <= 2.1x)")
    stages = sorted({k for r in rows for k in r["per_stage_s"]})
    print("\nseconds inside each stage:\n" + md_table(
        [{"stage": st, **{str(r["n_train"]): r["per_stage_s"].get(st, 0.0) for r in rows}} for st in stages],
        ["stage"] + [str(r["n_train"]) for r in rows]))
    for r in rows:
        total = r["roofline_split"][-1]
        print(f"\n{r['n_train']} prompts: the stages took {total['stage_s']:.0f} s, {total['x_roofline']:.1f}x the "
              f"compute roofline ({total['roofline_s']:.0f} s at {peak:.2f} TFLOP/s bf16, N = {n_matmul / 1e6:.1f}M); "
              f"round wall {r['round_wall_s']:.0f} s\n" + md_table(
                  r["roofline_split"], ["stage", "stage_s", "roofline_s", "x_roofline", "engine_load_s", "generate_s",
                                        "setup_s", "train_s", "rest_s"]))
    return result


if __name__ == "__main__":
    main()
