"""A sharded collect on a real Ray cluster: a head node bound to 127.0.0.1, started and stopped here, runs the two
shards of the tiny model's collect through prefect-ray's RayTaskRunner (real vLLM in each shard, a real Prefect test
server, MLflow on SQLite). Checked: the merged artifact equals the sharded-sequential one row for row (same sha256);
a shard whose vLLM worker is killed mid-run is retried alone (its task ran twice, the other once) and still gives
the same rows; a re-run is all cache hits. One cluster for the module; 4 prompts x 2 samples of 8 tokens, so the
vLLM engine starts dominate (5 of them)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from bench.local_ray import LOCAL_ENV, local_ray_head

os.environ.update(LOCAL_ENV)  # a 127.0.0.1-only cluster: set before ray is imported, in the driver too

from pipeline_lib.artifacts import read_manifest, read_table  # noqa: E402
from pipeline_lib.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    """One Ray head on 127.0.0.1 with 2 CPUs for the module."""
    with local_ray_head(num_cpus=2) as (address, pid, _):
        yield address, pid


@pytest.fixture(scope="module")
def harness():
    from prefect.events.worker import EventsWorker
    from prefect.testing.utilities import prefect_test_harness

    # Task runs reach the server as events, through one events worker per process whose client took the API URL of
    # the first server it served: after an earlier test's in-process flows it could send this module's task runs there
    # (the shards' own, sent from Ray's worker processes, would still arrive). Stop it; the next event starts a new one.
    EventsWorker.drain_all(timeout=10)
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow():
    from prefect import flow

    @flow(name="sharded-collect-test")
    def sharded_collect(cfg, policy, prompts_n: int):
        from tasks.common import flow_run_id
        from tasks.results import with_result_store
        from flows.sharded import ShardedStages
        from pipeline_lib.lineage import RoundLineage
        from tasks.common import RoundContext
        from tasks.stages import annotate_task, collect_task, evaluate_task, prompts_task

        work_dir = cfg.run.work_dir
        lineage = RoundLineage(cfg.run.mlflow_tracking_uri, cfg.run.experiment)
        parent = lineage.start_round("k" + work_dir[-12:], "test", {}, tags={})
        ctx = RoundContext(work_dir=work_dir, tracking_uri=cfg.run.mlflow_tracking_uri,
                           experiment=cfg.run.experiment, parent_run_id=parent, flow_run_id=flow_run_id(),
                           quiet=True)
        prompts_t, collect_t, annotate_t, evaluate_t = with_result_store(work_dir, prompts_task, collect_task,
                                                                     annotate_task, evaluate_task)
        prompts = prompts_t(cfg.prompts, "train", prompts_n, ctx)
        return ShardedStages(cfg.scale, ctx, collect_t, annotate_t, evaluate_t).collect(policy, prompts, cfg.collect)

    return sharded_collect


def _config(tmp, scale: list[str]):
    return load_config(None, ["policy=tiny:0", "prompts.n_train=4", "collect.k=2", "collect.max_tokens=8",
                              f"run.work_dir={tmp}", f"run.mlflow_tracking_uri=sqlite:///{tmp}/mlflow.db",
                              "run.quiet=true", *scale])


class _KillFirstShardEngine(threading.Thread):
    """Kills (SIGKILL) the first vLLM worker started under this module's Ray head (a shard's engine, mid-run). Only
    descendants of the head process are candidates: other jobs on the machine may run vLLM workers too."""

    def __init__(self, head_pid: int):
        super().__init__(daemon=True)
        self.head_pid = head_pid
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self):
        import psutil

        head = psutil.Process(self.head_pid)
        while not self.stop.is_set() and self.killed is None:
            for p in head.children(recursive=True):
                try:
                    if "pipeline_lib.generation.vllm_worker" not in " ".join(p.cmdline()):
                        continue
                    parent = p.parent().name()
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                self.killed = {"pid": p.pid, "parent": parent, "at": time.time()}
                break
            time.sleep(0.2)


def _stage_runs(cfg) -> int:
    """MLflow stage runs (children of a round run) in the config's store: every stage task that executes logs one."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.run.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(cfg.run.experiment)
    return sum(1 for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("mlflow.parentRunId"))


def _task_runs(flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def go():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
            return sorted(runs, key=lambda r: r.expected_start_time or r.created)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def runs(ray_head, harness, tmp_path_factory):
    from pipeline_lib.models import resolve

    address, head_pid = ray_head
    policy = resolve("tiny:0")
    flow = _flow()
    seq_cfg = _config(tmp_path_factory.mktemp("seq"), ["scale.shards=2"])
    t0 = time.perf_counter()
    seq = flow(seq_cfg, policy, 4)
    seq_s = time.perf_counter() - t0

    ray_cfg = _config(tmp_path_factory.mktemp("ray"), ["scale.shards=2", "scale.task_runner=ray",
                                                       f"scale.address={address}", "scale.resources={num_cpus: 1}"])
    killer = _KillFirstShardEngine(head_pid)
    killer.start()
    t0 = time.perf_counter()
    first = flow(ray_cfg, policy, 4)
    ray_s = time.perf_counter() - t0
    killer.stop.set()
    deadline = time.monotonic() + 60  # task run records arrive as events, asynchronously
    while (len(shard_runs := _task_runs("collect-shards")) < 2 or any(r.state_name == "Running" for r in shard_runs)) \
            and time.monotonic() < deadline:
        time.sleep(1)
    stage_runs_before = _stage_runs(ray_cfg)
    t0 = time.perf_counter()
    again = flow(ray_cfg, policy, 4, return_state=True)
    again_s = time.perf_counter() - t0
    print(f"\n[ray shards] sequential {seq_s:.1f} s, ray with a killed shard {ray_s:.1f} s, ray re-run {again_s:.1f} s")
    return {"seq": seq, "seq_cfg": seq_cfg, "ray": first, "killed": killer.killed, "shard_runs": shard_runs,
            "again": again, "stage_runs": (stage_runs_before, _stage_runs(ray_cfg))}


def test_ray_merged_artifact_equals_the_sequential_one_row_for_row(runs):
    seq, ray = runs["seq"], runs["ray"]
    assert ray.path != seq.path  # two work dirs: computed twice, not shared
    a, b = read_table(seq), read_table(ray)
    assert len(a) == 8 and a["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    import pandas as pd

    pd.testing.assert_frame_equal(a, b)
    assert seq.sha256 == ray.sha256
    ms, mr = read_manifest(seq.path), read_manifest(ray.path)
    assert [s["sha256"] for s in ms["shards"]] == [s["sha256"] for s in mr["shards"]]
    assert len({s["seed"] for s in ms["shards"]}) == 2  # one seed per shard
    assert ms["config"]["shards"] == 2 and ms["metrics"]["n_samples"] == 8


def test_a_killed_shard_is_retried_alone(runs):
    killed, shard_runs = runs["killed"], runs["shard_runs"]
    assert killed is not None, "no vLLM worker of a Ray shard was seen"
    assert killed["parent"].startswith("ray::"), killed  # the engine of a shard running in a Ray worker
    assert sorted(r.name for r in shard_runs) == ["collect-0/2", "collect-1/2"]
    counts = sorted(r.run_count for r in shard_runs)
    assert counts == [1, 2], [(r.name, r.run_count, r.state_name) for r in shard_runs]
    assert all(r.state_name == "Completed" for r in shard_runs)


def test_a_rerun_is_all_cache_hits(runs):
    from prefect.client.orchestration import get_client

    from prefect.events.worker import EventsWorker

    state = runs["again"]
    assert state.result().sha256 == runs["ray"].sha256
    before, after = runs["stage_runs"]
    assert before > 0 and after == before  # nothing ran again: no stage (prompts, split, shards, merge) logged a run

    async def task_states(flow_run_id):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

        async with get_client() as c:
            children = await c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            ids = [flow_run_id, *[r.id for r in children]]
            trs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            # the subflow's own placeholder task run in its parent completes: it is not a stage
            return {r.name: r.state_name for r in trs if not r.name.startswith("collect-shards")}

    # prompts, split, the two shards (named by shard), merge (Prefect adds a random suffix to unnamed runs). Task
    # runs reach the server as events, recorded asynchronously: flush this process's events, then wait for them. In
    # the whole suite (CI, 2026-12-04) the parent's own task runs at times never reached the harness's server while
    # the shards' did (sent from Ray's workers); the MLflow count above is the check that does not depend on it.
    EventsWorker.drain_all(timeout=30)
    deadline = time.monotonic() + 60
    while len(states := asyncio.run(task_states(state.state_details.flow_run_id))) < 5 and time.monotonic() < deadline:
        time.sleep(1)
    assert {"collect-0/2", "collect-1/2"} <= set(states), states
    assert set(states.values()) == {"Cached"}, states


def test_the_sequential_shards_are_logged_as_shard_runs_and_one_collect(runs):
    from mlflow.tracking import MlflowClient

    cfg = runs["seq_cfg"]
    c = MlflowClient(cfg.run.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(cfg.run.experiment)
    names = sorted(r.info.run_name for r in c.search_runs([exp.experiment_id]) if r.info.run_name != "test")
    assert names == ["collect", "collect-shard-0-of-2", "collect-shard-1-of-2", "prompts-train"]
    collect = next(r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == "collect")
    assert collect.data.tags["output.generations"] == runs["seq"].sha256
    assert collect.data.metrics["stage_s"] > 0 and collect.data.metrics["shards"] == 2
