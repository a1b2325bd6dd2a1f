"""What every stage task shares: retry policy, cache key, result storage and the lineage record.

Tasks pass artifact references (``ArtifactRef``, ``ResolvedModel``), never tables or models. A task's cache key
is built from its inputs' content hashes, its stage config and the library's code version, so a re-run with the
same inputs is a cache hit (state ``Cached``) that neither recomputes nor logs a second MLflow run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from pipeline_lib.artifacts import ArtifactError, ArtifactRef, read_manifest, sha256_json
from pipeline_lib.errors import ConfigError, ModelError, storage_error
from pipeline_lib.models import ResolvedModel
from pipeline_lib.sections import RunConfig
from pipeline_lib.stage import code_version
from tasks.hooks import hook_options, meter_for_current_task


def flow_run_id() -> str:
    """The id of the Prefect flow run this code runs in ("" outside one)."""
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


class RoundContext(BaseModel):
    """Where a round writes and logs. Not part of any cache key."""

    work_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    flow_run_id: str = ""
    quiet: bool = False
    gpu_limit: str = ""

    @classmethod
    def of_run(cls, run: RunConfig, work_dir: str, parent_run_id: str) -> "RoundContext":
        """The context of a flow run configured by ``run`` (its ``run:`` section), logging under ``parent_run_id``."""
        return cls(work_dir=work_dir, tracking_uri=run.mlflow_tracking_uri, experiment=run.experiment,
                   parent_run_id=parent_run_id, flow_run_id=flow_run_id(), quiet=run.quiet,
                   gpu_limit=run.gpu_concurrency_limit)

    def record(self, stage: str, inputs: Mapping[str, ArtifactRef | ResolvedModel],
               outputs: Mapping[str, ArtifactRef], config: Mapping[str, Any]) -> str:
        """Log a finished stage as a child MLflow run: its input/output artifacts, config and metrics."""
        from pipeline_lib.lineage import RoundLineage

        out = next(iter(outputs.values()))
        manifest = read_manifest(out.path)
        metrics = {**manifest.get("metrics", {}), "stage_s": _elapsed_in_task()}
        metrics.update(stage_cost_metrics(stage, manifest, inputs, config))
        step_metrics = [r for r in manifest.get("log_history", []) if "step" in r]
        lin = RoundLineage(self.tracking_uri, self.experiment)
        return lin.stage_run(self.parent_run_id, stage, {k: as_ref(v) for k, v in inputs.items()}, outputs, config,
                             metrics, tags={"prefect.flow_run_id": self.flow_run_id},
                             step_metrics=step_metrics)


def stage_cost_metrics(stage: str, manifest: Mapping[str, Any], inputs: Mapping[str, Any],
                       config: Mapping[str, Any]) -> dict[str, float]:
    """The stage's ``cost.*`` metrics: the task's meter plus what its manifest records (pipeline_lib/cost)."""
    from pipeline_lib.cost import prefixed, stage_cost
    from pipeline_lib.cost.accounting import count_parameters
    from pipeline_lib.cost.meter import matmul_peak_tflops

    meter = meter_for_current_task()
    if meter is None:  # called outside a task run (tests of the stage alone)
        return {}
    n_params = peak = None
    if stage == "train" and inputs.get("policy") is not None:
        n_params = count_parameters(inputs["policy"].path)
        peak = matmul_peak_tflops("bfloat16" if config.get("bf16") else "float32")
    judge = config if stage == "annotate" else config.get("judge")  # where a price per token would be declared
    judge = judge if isinstance(judge, Mapping) else None
    return prefixed(stage_cost(stage, meter.read(), manifest.get("metrics", {}), judge=judge, n_params=n_params,
                               epochs=config.get("epochs"), peak_tflops=peak))


def _elapsed_in_task() -> float:
    """Seconds since this task run entered Running: the stage's own time, before lineage logging."""
    import datetime as dt

    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    start = ctx.task_run.start_time if ctx and ctx.task_run else None
    return (dt.datetime.now(dt.timezone.utc) - start).total_seconds() if start else float("nan")


def as_ref(x: ArtifactRef | ResolvedModel) -> ArtifactRef:
    if isinstance(x, ArtifactRef):
        return x
    return ArtifactRef(kind="model", name=x.ref, path=x.path, sha256=x.sha256)


def _fingerprint(v: Any) -> Any:
    if isinstance(v, (ArtifactRef, ResolvedModel)):
        return v.sha256
    if isinstance(v, RoundContext):
        return None
    if isinstance(v, BaseModel):
        # data sources: the config says where the data is, content_fingerprint() what it is (a file edited in place
        # must not be a cache hit)
        fp = getattr(v, "content_fingerprint", None)
        return {**v.model_dump(), "content": fp()} if fp else v.model_dump()
    return v


def cache_key(context, parameters: dict[str, Any]) -> str:
    """Inputs' hashes + stage config + code version (the task name tells stages apart)."""
    task_name = context.task.name if context is not None else ""
    return sha256_json({"task": task_name, "code": code_version(),
                        "params": {k: _fingerprint(v) for k, v in parameters.items()}})


PERMANENT = (ConfigError, ModelError, ArtifactError, FileNotFoundError, ValueError, TypeError, KeyError)


def retry_transient(task, task_run, state) -> bool:
    """Retry only what may pass (an engine that died, a judge endpoint that timed out), never bad input."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception as e:  # noqa: BLE001
        return not storage_error(e)  # a full disk or a read-only work dir stays so: no retry
    return False


def task_options(name: str, retries: int = 2) -> dict[str, Any]:
    # No task tags: Prefect acquires a tag-based concurrency lease for every tagged task run, and on the embedded
    # SQLite server that write loses the lock to the server's own event writes at task start (HTTP 503, retried
    # after ~2 s): measured 6.6 s of a default round's 11 s overhead. GPU stages take the explicit `gpu` global
    # concurrency limit instead (gpu_slot, run.gpu_concurrency_limit).
    return {
        "name": name,
        "retries": retries,
        "retry_delay_seconds": [2, 10, 30][:retries] or 0,
        "retry_condition_fn": retry_transient,
        # a policy, not cache_key_fn: tasks.results.with_result_store configures it (isolation, lock manager), and
        # with_options cannot drop a cache_key_fn once set
        "cache_policy": CachePolicy.from_cache_key_fn(cache_key),
        "persist_result": True,
        "log_prints": False,  # library prints (e.g. datasets hashing dumps) would flood the run log
        **hook_options(),  # run names by stage, a cost meter, one terminal line per stage (tasks/hooks.py)
    }


def results_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "prefect-results"


@contextlib.contextmanager
def gpu_slot(limit: str):
    """Hold one slot of a global concurrency limit (``run.gpu_concurrency_limit``, e.g. ``gpu`` with one slot per
    GPU: ``prefect gcl create gpu --limit N``) while a GPU stage runs; CPU-only stages never take it."""
    if not limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, strict=True):
        yield
