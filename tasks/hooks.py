"""Prefect state hooks every stage task carries: a meter while the stage runs, one terminal line when it ends.

- ``stage_run_name``: task runs are named by stage (``prompts-train``, ``evaluate-candidate``, ``collect``), so the
  Prefect UI, the stage lines and the cost table say which of two same-named tasks ran.
- ``stage_started`` (on Running): starts a :class:`~pipeline_lib.cost.meter.StageMeter` for the task run; the stage's
  ``RoundContext.record`` reads it (:func:`meter_for_current_task`) and logs the cost with the stage's metrics.
- ``stage_finished`` (on Completed, Cached or Failed): prints ``[collect] done in 38.2 s (cpu 71 s, peak 4.6 GiB)``,
  ``[collect] cached`` or ``[collect] failed after 3.0 s``, and remembers cache hits for the round's cost table
  (:func:`cached_stages`).
"""

from __future__ import annotations

import threading

from pipeline_lib import console
from pipeline_lib.cost.meter import StageMeter

GPU_STAGES = {"collect", "train", "evaluate", "benchmark-generate"}
_meters: dict[str, StageMeter] = {}
_cached: dict[str, list[str]] = {}  # flow run id -> names of cache-hit stages, in order
_lock = threading.Lock()


def stage_run_name() -> str:
    """``<task>-<split|role>`` when the task has such a parameter, else the task's name."""
    from prefect.runtime import task_run

    params = task_run.parameters or {}
    for key in ("split", "role"):
        if isinstance(params.get(key), str):
            return f"{task_run.task_name}-{params[key]}"
    return task_run.task_name


def _gpus_asked(params: dict) -> int:
    """GPUs a stage asks for: evaluate's tensor_parallel_size, collect's cfg.tensor_parallel_size, train's
    cfg.num_processes; 1 otherwise."""
    cfg = params.get("cfg")
    for n in (params.get("tensor_parallel_size"), getattr(cfg, "tensor_parallel_size", None),
              getattr(cfg, "num_processes", None)):
        if isinstance(n, int) and n > 0:
            return n
    return 1


def stage_started(task, task_run, state) -> None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    gpus = _gpus_asked(ctx.parameters or {}) if ctx else 1
    meter = StageMeter(uses_gpu=task.name in GPU_STAGES, gpus=gpus).start()
    with _lock:
        old = _meters.pop(str(task_run.id), None)
        _meters[str(task_run.id)] = meter
    if old is not None:  # a retry: the failed attempt's sampler stops
        old.read()


def meter_for_current_task() -> StageMeter | None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return _meters.get(str(ctx.task_run.id)) if ctx and ctx.task_run else None


def stage_finished(task, task_run, state) -> None:
    with _lock:
        meter = _meters.pop(str(task_run.id), None)
    m = meter.read() if meter else None
    name = task_run.name or task.name
    if state.name == "Cached":
        with _lock:
            _cached.setdefault(str(task_run.flow_run_id), []).append(name)
        line = f"[{name}] cached"
    elif state.is_completed():
        line = f"[{name}] done in {m['wall_s']:.1f} s" if m else f"[{name}] done"
        if m:
            line += f" (cpu {m['cpu_s']:.0f} s, peak {m['peak_rss_gib']:.1f} GiB)"
    else:
        why = (state.message or state.name).strip().splitlines()[0][:300]  # the whole error is in the log
        line = f"[{name}] failed" + (f" after {m['wall_s']:.1f} s" if m else "") + f": {why}"
    if not _quiet():  # run.quiet / --quiet: no line (the cost is still measured and logged)
        console.say(line)


def _quiet() -> bool:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return bool(getattr((ctx.parameters or {}).get("ctx"), "quiet", False)) if ctx else False


def cached_stages(flow_run_id: str) -> list[str]:
    with _lock:
        return list(_cached.get(str(flow_run_id), []))


def hook_options() -> dict:
    """The ``@task`` options that attach these hooks and the run name."""
    return {"task_run_name": stage_run_name, "on_running": [stage_started],
            "on_completion": [stage_finished], "on_failure": [stage_finished]}
