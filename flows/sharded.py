"""The round's sharded stages (``scale:``), and the engines that run their shards.

``ShardedStages`` is what the round calls for collect, annotate and the held-out evaluation. With ``scale.shards: 1``
each call is the stage's own task, called as before (same task, same parameters, same cache key, same artifact);
so is a stage whose input is too small for two shards of ``scale.min_rows_per_shard`` rows.
With N > 1: a split task writes N shard artifacts, N shard tasks run the stage on them (``tasks.shards``), a merge
task writes the stage's usual output. Annotate is sharded only for a judge that runs a model (``Judge.model_based``:
reward model, PairRM, LLM judge); the rules judge takes milliseconds per response.

Who runs the shard tasks (``scale.task_runner``):
- ``sequential``: this process, one after another (direct task calls; a failed shard stops the stage after its
  retries, the shards before it are cached);
- ``ray``: a subflow ``<stage>-shards`` with prefect-ray's ``RayTaskRunner``; ``scale.address`` names an existing
  cluster (else a temporary local one), ``scale.resources`` go to ``ray.remote`` as each shard's request
  (``num_gpus``, ``num_cpus``, ``memory``; other keys are custom resources). The flow's process connects once and
  stays connected (the runner then reuses the connection and leaves it open): Ray starts worker processes per
  connected driver, and a shard's worker imports Prefect and the stages before it runs, so a fresh connection per
  stage paid that every time (bench.shards: 15-25 s per stage on this machine under load, against 0.5 s per shard
  on a connection whose workers are up). Later stages and later rounds of the same process reuse the workers; the
  connection ends with the process;
- ``dask``: the same with prefect-dask's ``DaskTaskRunner``; ``scale.resources`` become the tasks' Dask resource
  annotations (workers started with ``--resources "GPU=1"``).
The subflow submits every shard, waits for all of them, then raises the first failure: shards that finished are
complete (and cached) even when another one failed. Shard tasks on a cluster run on its workers, so they do not take
the flow host's ``run.gpu_concurrency_limit`` slot (the cluster's scheduler hands out its GPUs).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from prefect import flow

from pipeline_lib.artifacts import ArtifactRef
from pipeline_lib.errors import ConfigError
from pipeline_lib.judges.base import JUDGES, JudgeOptions
from pipeline_lib.models import ResolvedModel
from pipeline_lib.scale import ScaleConfig, shard_seed
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.evaluate import EvaluateConfig
from tasks import shards as st
from tasks.common import RoundContext
from tasks.results import with_result_store


# -- engines ----------------------------------------------------------------------------------------------------------
RAY_OPTIONS = ("num_cpus", "num_gpus", "memory")  # ray.remote's own keywords; anything else is a custom resource


def _missing(runner: str, package: str) -> ConfigError:
    return ConfigError(f"scale.task_runner={runner} needs {package}, which is not installed "
                       f"(pip install 'alignflow[{runner}]')")


def _ray_runner(scale: ScaleConfig):
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise _missing("ray", "prefect-ray") from None
    return RayTaskRunner(address=scale.address, init_kwargs={"log_to_driver": True})


_ray_connected: list[str | None] = []  # the address this process's driver is connected to (empty: none)


def _ray_connect(scale: ScaleConfig) -> None:
    """Connect this process to ``scale.address`` once (RayTaskRunner reuses a connected driver and keeps it)."""
    import ray

    if ray.is_initialized() and _ray_connected == [scale.address]:
        return
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=scale.address, namespace="prefect", log_to_driver=True)
    _ray_connected[:] = [scale.address]


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """``scale.resources`` as ``ray.remote`` keywords: {num_gpus: 1, GPU_A100: 1} -> num_gpus=1,
    resources={'GPU_A100': 1}."""
    opts: dict[str, Any] = {k: v for k, v in resources.items() if k in RAY_OPTIONS}
    custom = {k: v for k, v in resources.items() if k not in RAY_OPTIONS}
    if custom:
        opts["resources"] = custom
    return opts


def _ray_resources(scale: ScaleConfig) -> ContextManager:
    from prefect_ray.context import remote_options

    return remote_options(**ray_options(scale.resources)) if scale.resources else contextlib.nullcontext()


def _dask_runner(scale: ScaleConfig):
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise _missing("dask", "prefect-dask") from None
    return DaskTaskRunner(address=scale.address) if scale.address else DaskTaskRunner()


def _dask_resources(scale: ScaleConfig) -> ContextManager:
    import dask

    return dask.annotate(resources=dict(scale.resources)) if scale.resources else contextlib.nullcontext()


@dataclass(frozen=True)
class Engine:
    runner: Callable[[ScaleConfig], Any]  # a Prefect TaskRunner for the shards' subflow
    resources: Callable[[ScaleConfig], ContextManager]  # entered while the shards are submitted
    connect: Callable[[ScaleConfig], None] = lambda scale: None  # before the first subflow of the process


ENGINES: dict[str, Engine] = {"ray": Engine(_ray_runner, _ray_resources, _ray_connect),
                              "dask": Engine(_dask_runner, _dask_resources)}


@flow(name="shards", validate_parameters=False, log_prints=False)
def shards_flow(stage: str, calls: list[dict[str, Any]], scale: ScaleConfig) -> list[ArtifactRef]:
    """Submit one shard task per call to this flow's task runner, wait for all, return their artifacts in order."""
    (shard_t,) = with_result_store(calls[0]["ctx"].work_dir, st.SHARD_TASKS[stage])
    with ENGINES[scale.task_runner].resources(scale):
        futures = [shard_t.submit(**kw) for kw in calls]
    for f in futures:  # every shard finishes (and is cached) before a failure is raised
        f.wait()
    return [f.result() for f in futures]


# -- the round's view -------------------------------------------------------------------------------------------------
class ShardedStages:
    """collect / annotate / evaluate for a round: the round's own stage task (``collect_t``, ``annotate_t``,
    ``evaluate_t``, with their result storage) when a stage gets one shard, else split, shards on
    ``scale.task_runner``, merge."""

    def __init__(self, scale: ScaleConfig, ctx: RoundContext, collect_t, annotate_t, evaluate_t):
        self.scale, self.ctx = scale, ctx
        self.collect_t, self.annotate_t, self.evaluate_t = collect_t, annotate_t, evaluate_t
        if scale.task_runner != "sequential":
            ENGINES[scale.task_runner].runner(scale)  # a missing package fails here, before any stage

    @functools.cached_property
    def _t(self) -> dict[str, Any]:
        """The split and merge tasks with this work dir's result storage (made when a stage is first sharded)."""
        names = ("split", "merge_generations", "merge_judgments", "merge_responses", "evaluate_responses")
        tasks = [getattr(st, f"{n}_task") for n in names]
        return dict(zip(names, with_result_store(self.ctx.work_dir, *tasks)))

    def _phase(self) -> st.ShardContext:
        # on a cluster the shards do not hold the flow host's GPU slot (the cluster schedules its own GPUs)
        gpu = self.ctx.gpu_limit if self.scale.task_runner == "sequential" else ""
        return st.ShardContext(**{**self.ctx.model_dump(), "gpu_limit": gpu}, phase_started=time.time())

    def _run(self, stage: str, calls: list[dict[str, Any]]) -> list[ArtifactRef]:
        if self.scale.task_runner == "sequential":
            (shard_t,) = with_result_store(self.ctx.work_dir, st.SHARD_TASKS[stage])
            return [shard_t(**kw) for kw in calls]
        engine = ENGINES[self.scale.task_runner]
        engine.connect(self.scale)
        runner = engine.runner(self.scale)
        return shards_flow.with_options(name=f"{stage}-shards", task_runner=runner)(stage, calls, self.scale)

    def collect(self, policy: ResolvedModel, prompts: ArtifactRef, cfg: CollectConfig) -> ArtifactRef:
        n = self.scale.shards_for(prompts.rows)
        if n == 1:
            return self.collect_t(policy, prompts, cfg, self.ctx)
        ctx = self._phase()
        parts = self._t["split"](prompts, n, None, ctx)
        seeds = [shard_seed(cfg.seed, i, len(parts)) for i in range(len(parts))]
        calls = [dict(policy=policy, prompts=p, cfg=cfg.model_copy(update={"seed": seed}), ctx=ctx,
                      shard=f"{i}/{len(parts)}") for i, (p, seed) in enumerate(zip(parts, seeds))]
        return self._t["merge_generations"](policy, prompts, self._run("collect", calls), cfg, ctx)

    def annotate(self, generations: ArtifactRef, judge: JudgeOptions) -> ArtifactRef:
        n = self.scale.shards_for(generations.rows)
        if n == 1 or not JUDGES[judge.kind].model_based:
            return self.annotate_t(generations, judge, self.ctx)
        ctx = self._phase()
        parts = self._t["split"](generations, n, "prompt_id", ctx)
        calls = [dict(generations=p, judge=judge, ctx=ctx, shard=f"{i}/{len(parts)}") for i, p in enumerate(parts)]
        return self._t["merge_judgments"](generations, self._run("annotate", calls), judge, ctx)

    def evaluate(self, model: ResolvedModel, prompts: ArtifactRef, judge: JudgeOptions, cfg: EvaluateConfig,
                 role: str, tensor_parallel_size: int = 1) -> ArtifactRef:
        if self.scale.shards_for(prompts.rows) == 1:
            return self.evaluate_t(model, prompts, judge, cfg, self.ctx, role=role,
                                   tensor_parallel_size=tensor_parallel_size)
        ctx = self._phase()
        parts = self._t["split"](prompts, self.scale.shards_for(prompts.rows), None, ctx)
        calls = [dict(model=model, prompts=p, cfg=cfg, seed=shard_seed(0, i, len(parts)), ctx=ctx,
                      shard=f"{i}/{len(parts)}", tensor_parallel_size=tensor_parallel_size)
                 for i, p in enumerate(parts)]
        responses = self._t["merge_responses"](model, prompts, self._run("heldout-generate", calls), cfg, ctx)
        return self._t["evaluate_responses"](model, prompts, responses, judge, cfg, ctx, role=role)
