"""What running a round's shards on Ray costs, next to running them one after another in the flow's process.

- engine overhead: N no-op shard tasks (same task options as the stage shards: cached, retried, result persisted)
  through the sharded stage's subflow on a local Ray head (prefect-ray's RayTaskRunner) vs direct calls, for several
  N, three ways: ``sequential`` (direct calls), ``ray-new-driver`` (the runner connects and disconnects per stage,
  prefect-ray's default: Ray starts new worker processes for every stage, and each imports Prefect and the stages),
  ``ray`` (what the round does: the process connects once; measured after its first stage, whose wall time is
  reported apart as ``ray_first_stage_s``). A line wall = fixed + per_shard * N is fitted to each.
- a sharded collect of the tiny model (real vLLM per shard), sequential vs Ray, 2 shards, in fresh work dirs.
- split and merge of a generations table of SPPO's size (100,000 samples of ~450 tokens) into 32 shards.
The Ray head (127.0.0.1, ``--num-cpus`` = the machine's cores) is started and stopped here, and its start timed.
Run: python -m bench.shards [--shards 2 4 8] [--no-collect] [--name shards_cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

from prefect import flow, task

from bench.common import machine, md_table, save
from bench.local_ray import LOCAL_ENV, local_ray_head
from pipeline_lib.artifacts import ArtifactRef
from tasks import shards as st
from tasks.common import task_options

os.environ.update(LOCAL_ENV)


@task(**{**task_options("noop-shard"), "task_run_name": "noop-{shard}"})
def noop_shard_task(ctx: st.ShardContext, shard: str, nonce: str) -> ArtifactRef:
    """A shard that does nothing: what is left of its wall time is the engine's."""
    return ArtifactRef(kind="table", name="noop", path=ctx.work_dir, sha256=nonce)


st.SHARD_TASKS["bench-noop"] = noop_shard_task  # the subflow looks shard tasks up by stage name


@flow(name="bench-shards")
def _noop_stage(n: int, runner: str, address: str, work_dir: str) -> float:
    """One sharded stage of n no-op shards. runner: sequential (direct calls); ray-new-driver (the subflow's
    RayTaskRunner connects and disconnects, as prefect-ray does by default); ray (what the round does: the
    process's driver connects once and the subflow reuses it)."""
    from tasks.results import with_result_store
    from flows.sharded import ENGINES, shards_flow
    from pipeline_lib.scale import ScaleConfig

    ctx = st.ShardContext(work_dir=work_dir, tracking_uri="", experiment="", parent_run_id="")
    nonce = uuid.uuid4().hex  # never a cache hit
    calls = [dict(ctx=ctx, shard=f"{i}/{n}", nonce=f"{nonce}-{i}") for i in range(n)]
    t0 = time.perf_counter()
    if runner == "sequential":
        (noop_t,) = with_result_store(work_dir, noop_shard_task)
        out = [noop_t(**kw) for kw in calls]
    else:
        scale = ScaleConfig(shards=n, task_runner="ray", address=address)
        if runner == "ray":
            ENGINES["ray"].connect(scale)
        out = shards_flow.with_options(name="bench-noop-shards", task_runner=ENGINES["ray"].runner(scale))(
            "bench-noop", calls, scale)
    assert [r.sha256 for r in out] == [kw["nonce"] for kw in calls]
    return time.perf_counter() - t0


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares wall = a + b * n."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-9)
    return my - b * mx, b


def _collect(runner: str, address: str, n_prompts: int, k: int, max_tokens: int) -> dict:
    from tasks.common import flow_run_id
    from tasks.results import with_result_store
    from flows.sharded import ShardedStages
    from pipeline_lib.artifacts import read_manifest
    from pipeline_lib.config import load_config
    from pipeline_lib.lineage import RoundLineage
    from pipeline_lib.models import resolve
    from tasks.common import RoundContext
    from tasks.stages import annotate_task, collect_task, evaluate_task, prompts_task

    scale = ["scale.shards=2"] + (["scale.task_runner=ray", f"scale.address={address}"] if runner == "ray" else [])
    with tempfile.TemporaryDirectory(prefix="alignflow-bench-shards-") as tmp:
        cfg = load_config(None, ["policy=tiny:0", f"prompts.n_train={n_prompts}", f"collect.k={k}",
                                 f"collect.max_tokens={max_tokens}", f"run.work_dir={tmp}",
                                 f"run.mlflow_tracking_uri=sqlite:///{tmp}/mlflow.db", "run.quiet=true", *scale])

        @flow(name=f"bench-collect-{runner}")
        def go() -> tuple[float, dict]:
            lineage = RoundLineage(cfg.run.mlflow_tracking_uri, cfg.run.experiment)
            parent = lineage.start_round("bench", "bench", {}, tags={})
            ctx = RoundContext(work_dir=tmp, tracking_uri=cfg.run.mlflow_tracking_uri, experiment=cfg.run.experiment,
                               parent_run_id=parent, flow_run_id=flow_run_id(), quiet=True)
            prompts_t, collect_t, annotate_t, evaluate_t = with_result_store(tmp, prompts_task, collect_task,
                                                                         annotate_task, evaluate_task)
            prompts = prompts_t(cfg.prompts, "train", n_prompts, ctx)
            t0 = time.perf_counter()
            ref = ShardedStages(cfg.scale, ctx, collect_t, annotate_t, evaluate_t).collect(
                resolve("tiny:0"), prompts, cfg.collect)
            return time.perf_counter() - t0, read_manifest(ref.path)

        wall, man = go()
    m = man["metrics"]
    return {"runner": runner, "wall_s": wall, "engine_load_s_sum": m["engine_load_s"],
            "generate_s_sum": m["generate_s"],
            "n_samples": m["n_samples"], "sha256": man["sha256"]}


def _split_merge(rows: int, shards: int, k: int = 5, tokens: int = 450) -> dict:
    """Split and merge of a generations-sized table on this machine: ``rows`` samples (``rows / k`` prompts) with
    ~4 characters and one token id per token, as SPPO's collect output would be (100,000 rows: 20,000 prompts x 5)."""
    import numpy as np
    import pandas as pd

    from pipeline_lib.artifacts import write_table
    from pipeline_lib.scale import _concat, _restore_order, split_table

    rng = np.random.default_rng(0)
    n_prompts = rows // k
    df = pd.DataFrame({"prompt_id": np.repeat([f"p{i:06d}" for i in range(n_prompts)], k),
                       "prompt_index": np.repeat(np.arange(n_prompts), k), "sample_index": np.tile(np.arange(k),
                                                                                                   n_prompts),
                       # random text: Parquet must not compress it away (real responses do not repeat)
                       "response": [rng.bytes(2 * tokens).hex() for _ in range(rows)],
                       "response_token_ids": list(rng.integers(0, 32000, size=(rows, tokens), dtype=np.int64))})
    with tempfile.TemporaryDirectory(prefix="alignflow-bench-merge-") as tmp:
        src = write_table(df, os.path.join(tmp, "src"), name="generations", producer="bench")
        size = os.path.getsize(os.path.join(src.path, "data.parquet"))
        t0 = time.perf_counter()
        parts = split_table(src, shards, tmp, group="prompt_id")
        split_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged, _ = _concat(parts)
        merged = _restore_order(merged)
        write_table(merged, os.path.join(tmp, "merged"), name="generations", producer="bench")
        merge_s = time.perf_counter() - t0
    return {"rows": rows, "shards": shards, "parquet_mib": size / 2**20, "split_s": split_s, "merge_s": merge_s}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-collect", action="store_true")
    ap.add_argument("--name", default="shards_cpu")
    ap.add_argument("--merge-rows", type=int, default=100_000, help="0: skip the split/merge measurement")
    a = ap.parse_args(argv)
    from prefect.testing.utilities import prefect_test_harness

    load = os.getloadavg()
    rows, collect_rows, first_stage_s = [], [], None
    with local_ray_head(num_cpus=os.cpu_count() or 2) as (address, _, head_start_s), \
            prefect_test_harness(server_startup_timeout=120), \
            tempfile.TemporaryDirectory(prefix="alignflow-bench-noop-") as work:
        import ray

        for runner in ("sequential", "ray-new-driver", "ray"):
            for n in a.shards:
                walls = []
                for _ in range(a.repeats):
                    if runner == "ray-new-driver" and ray.is_initialized():
                        ray.shutdown()
                    if runner == "ray" and first_stage_s is None:  # the process's first sharded stage
                        first_stage_s = _noop_stage(n, runner, address, work)
                    walls.append(_noop_stage(n, runner, address, work))
                rows.append({"runner": runner, "shards": n, "wall_s": min(walls), "walls_s": walls,
                             "per_shard_s": min(walls) / n})
                print(rows[-1], flush=True)
        if not a.no_collect:
            for runner in ("sequential", "ray"):
                collect_rows.append(_collect(runner, address, n_prompts=8, k=2, max_tokens=16))
                print(collect_rows[-1], flush=True)
    merge = _split_merge(a.merge_rows, 32) if a.merge_rows else None
    print(f"split/merge: {merge}", flush=True)
    fits = {r: dict(zip(("fixed_s", "per_shard_s"), _fit([(x["shards"], x["wall_s"]) for x in rows
                                                             if x["runner"] == r])))
            for r in ("sequential", "ray-new-driver", "ray")}
    result = {"machine": machine(), "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
              "ray_head_start_s": head_start_s, "ray_first_stage_s": first_stage_s, "noop": rows, "fit": fits,
              "collect": collect_rows, "split_merge": merge}
    if len(collect_rows) == 2:
        result["collect_same_artifact"] = collect_rows[0]["sha256"] == collect_rows[1]["sha256"]
    path = save(a.name, result)
    print(md_table(rows, ["runner", "shards", "wall_s", "per_shard_s"]))
    print(f"fits: {fits}\nray head start {head_start_s:.1f} s; results: {path}")
    return result


if __name__ == "__main__":
    main()
