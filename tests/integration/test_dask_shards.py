"""A sharded annotate (a tiny reward-model judge) on a real Dask cluster through prefect-dask's DaskTaskRunner: a
scheduler and two worker processes on 127.0.0.1, one declaring a "GPU" resource and one not. The shards ask for
``scale.resources: {GPU: 1}``, so both must run on the first worker; the merged judgments equal the same shards
judged in this process, row for row."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.artifacts import read_table, write_table
from pipeline_lib.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler with one 'GPU' worker (in-process cluster object) and one plain worker (a subprocess)."""
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None,
                      resources={"GPU": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plain = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", lc.scheduler_address,
                              "--nthreads", "2", "--no-dashboard", "--host", "127.0.0.1", "--name", "plain"],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(lc)
    client.wait_for_workers(2, timeout=120)
    yield lc, client
    client.close()
    plain.terminate()
    plain.wait(timeout=30)
    lc.close()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _generations(path: Path):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    rows = [{"prompt_id": f"p{i}", "prompt": f"Say something {i}", "prompt_index": i, "sample_index": s,
             "response": " ".join(rng.choice(words, size=1 + (i + s) % 4))} for i in range(6) for s in range(2)]
    return write_table(pd.DataFrame(rows), path, name="generations", producer="test")


def test_dask_shards_run_where_the_resource_is_and_equal_local_shards(cluster, harness, tmp_path):
    from distributed import get_task_stream
    from prefect import flow

    from tasks.common import flow_run_id
    from tasks.results import with_result_store
    from flows.sharded import ShardedStages
    from pipeline_lib.stages.annotate import run as annotate
    from pipeline_lib.lineage import RoundLineage
    from pipeline_lib.scale import merge_judgments, split_table
    from tasks.common import RoundContext
    from tasks.stages import annotate_task, collect_task, evaluate_task
    from tests.unit.test_reward_model_judge import build_rm

    lc, client = cluster
    rm = build_rm(tmp_path / "rm")
    judge = {"kind": "reward_model", "model": str(rm)}
    gens = _generations(tmp_path / "gens")
    # the reference: the same 2 shards judged one after another in this process
    local = [annotate(p, judge, tmp_path / "local", quiet=True) for p in split_table(gens, 2, tmp_path / "local",
                                                                                       "prompt_id")]
    expected = read_table(merge_judgments(local, gens, tmp_path / "local"))

    cfg = load_config(None, [f"run.work_dir={tmp_path / 'dask'}", f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/m.db",
                             "run.quiet=true", "scale.shards=2", "scale.task_runner=dask",
                             f"scale.address={lc.scheduler_address}", "scale.resources={GPU: 1}",
                             "judge.kind=reward_model", f"judge.model={rm}"])

    @flow(name="dask-annotate-test")
    def sharded_annotate():
        work = cfg.run.work_dir
        parent = RoundLineage(cfg.run.mlflow_tracking_uri, cfg.run.experiment).start_round("dask", "t", {}, tags={})
        ctx = RoundContext(work_dir=work, tracking_uri=cfg.run.mlflow_tracking_uri, experiment=cfg.run.experiment,
                           parent_run_id=parent, flow_run_id=flow_run_id(), quiet=True)
        c, a, e = with_result_store(work, collect_task, annotate_task, evaluate_task)
        return ShardedStages(cfg.scale, ctx, c, a, e).annotate(gens, cfg.judge)

    t0 = time.perf_counter()
    with get_task_stream(client=client) as ts:
        merged = sharded_annotate()
    print(f"\n[dask shards] {time.perf_counter() - t0:.1f} s")
    pd.testing.assert_frame_equal(read_table(merged), expected)
    gpu_worker = next(addr for addr, w in client.scheduler_info()["workers"].items() if w.get("resources"))
    ran = [t["worker"] for t in ts.data if "annotate_shard_task" in str(t["key"])]  # Dask keys: function name
    assert len(ran) == 2 and set(ran) == {gpu_worker}, (ran, gpu_worker)
