"""Prefect tasks of the sharded stages (``scale.shards > 1``): split the input, one task per shard, merge.

Each shard is its own task run: cached by its shard artifact's hash, its config (with the shard's own seed) and the
code version, and retried on transient failures like any stage task, so a failed shard re-runs alone and the
finished ones are cache hits when the round is run again. The shard tasks call the unchanged stage functions on
their slice (``pipeline_lib.scale``). Shard runs are logged to MLflow as ``<stage>-shard-<i>-of-<n>`` with their
seconds as ``shard_s``; the merge logs the stage under its usual name (``collect``, ``annotate``,
``evaluate-<role>``) with ``stage_s`` = the wall time of the whole sharded phase (split to merge), which is what
the round's orchestration overhead is measured against.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from prefect import task

from pipeline_lib.artifacts import ArtifactRef, read_manifest
from pipeline_lib.judges.base import JudgeOptions
from pipeline_lib.models import ResolvedModel
from pipeline_lib.scale import merge_generations, merge_judgments, merge_responses, split_table
from pipeline_lib.stages import annotate, collect, evaluate
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.evaluate import EvaluateConfig
from tasks.common import RoundContext, _elapsed_in_task, as_ref, gpu_slot, task_options


class ShardContext(RoundContext):
    """The round's context plus when the sharded phase started (``time.time()`` on the flow's host). A
    RoundContext, so never part of a cache key."""

    phase_started: float = 0.0


def _record(ctx: ShardContext, stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, ArtifactRef],
            config: Mapping[str, Any], seconds: dict[str, float]) -> str:
    from pipeline_lib.lineage import RoundLineage

    manifest = read_manifest(next(iter(outputs.values())).path)
    lin = RoundLineage(ctx.tracking_uri, ctx.experiment)
    return lin.stage_run(ctx.parent_run_id, stage, {k: as_ref(v) for k, v in inputs.items()}, outputs, config,
                         {**manifest.get("metrics", {}), **seconds}, tags={"prefect.flow_run_id": ctx.flow_run_id})


def _shard_name(shard: str) -> str:
    i, n = shard.split("/")
    return f"shard-{i}-of-{n}"


@task(**task_options("split"))
def split_task(source: ArtifactRef, n: int, group: str | None, ctx: ShardContext) -> list[ArtifactRef]:
    """At most ``n`` shard artifacts of ``source``, whole ``group``s each."""
    return split_table(source, n, ctx.work_dir, group)


@task(**{**task_options("collect-shard"), "task_run_name": "collect-{shard}"})
def collect_shard_task(policy: ResolvedModel, prompts: ArtifactRef, cfg: CollectConfig, ctx: ShardContext,
                       shard: str) -> ArtifactRef:
    """Sample K responses per prompt of one shard (``cfg.seed`` is the shard's own seed)."""
    with gpu_slot(ctx.gpu_limit):
        ref = collect.run(policy, prompts, cfg, ctx.work_dir, quiet=ctx.quiet)
    _record(ctx, f"collect-{_shard_name(shard)}", {"policy": policy, "prompts": prompts}, {"generations": ref},
            cfg.model_dump(), {"shard_s": _elapsed_in_task()})
    return ref


@task(**{**task_options("annotate-shard"), "task_run_name": "annotate-{shard}"})
def annotate_shard_task(generations: ArtifactRef, judge: JudgeOptions, ctx: ShardContext, shard: str) -> ArtifactRef:
    """Score the samples of one shard's prompts with the judge."""
    with gpu_slot(ctx.gpu_limit):
        ref = annotate.run(generations, judge, ctx.work_dir, quiet=ctx.quiet)
    _record(ctx, f"annotate-{_shard_name(shard)}", {"generations": generations}, {"judgments": ref},
            judge.model_dump(), {"shard_s": _elapsed_in_task()})
    return ref


@task(**{**task_options("heldout-generate-shard"), "task_run_name": "heldout-generate-{shard}"})
def heldout_generate_shard_task(model: ResolvedModel, prompts: ArtifactRef, cfg: EvaluateConfig, seed: int,
                                ctx: ShardContext, shard: str, tensor_parallel_size: int = 1) -> ArtifactRef:
    """One response per held-out prompt of one shard (the generation half of the evaluation)."""
    with gpu_slot(ctx.gpu_limit):
        ref = evaluate.generate(model, prompts, cfg, ctx.work_dir, seed=seed, quiet=ctx.quiet,
                                tensor_parallel_size=tensor_parallel_size)
    _record(ctx, f"heldout-generate-{_shard_name(shard)}", {"model": model, "prompts": prompts}, {"responses": ref},
            {**cfg.model_dump(), "seed": seed}, {"shard_s": _elapsed_in_task()})
    return ref


def _phase_s(ctx: ShardContext) -> dict[str, float]:
    return {"stage_s": time.time() - ctx.phase_started} if ctx.phase_started else {}


@task(**task_options("merge-generations"))
def merge_generations_task(policy: ResolvedModel, prompts: ArtifactRef, shards: list[ArtifactRef],
                           cfg: CollectConfig, ctx: ShardContext) -> ArtifactRef:
    """The collect stage's output over all shards, in prompt order."""
    config = {**cfg.model_dump(), "shards": len(shards)}
    ref = merge_generations(shards, policy.sha256, prompts, config, ctx.work_dir)
    _record(ctx, "collect", {"policy": policy, "prompts": prompts}, {"generations": ref}, config, _phase_s(ctx))
    return ref


@task(**task_options("merge-judgments"))
def merge_judgments_task(generations: ArtifactRef, shards: list[ArtifactRef], judge: JudgeOptions,
                         ctx: ShardContext) -> ArtifactRef:
    """The annotate stage's output over all shards, in the generations' order (``judge``: for the cache key)."""
    ref = merge_judgments(shards, generations, ctx.work_dir)
    _record(ctx, "annotate", {"generations": generations}, {"judgments": ref},
            {**judge.model_dump(), "shards": len(shards)}, _phase_s(ctx))
    return ref


@task(**task_options("merge-responses"))
def merge_responses_task(model: ResolvedModel, prompts: ArtifactRef, shards: list[ArtifactRef], cfg: EvaluateConfig,
                         ctx: ShardContext) -> ArtifactRef:
    """Held-out responses over all shards, in the prompts' order."""
    config = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "shards": len(shards)}
    return merge_responses(shards, model.sha256, prompts, config, ctx.work_dir)


@task(**task_options("evaluate-responses"))
def evaluate_responses_task(model: ResolvedModel, prompts: ArtifactRef, responses: ArtifactRef,
                            judge: JudgeOptions, cfg: EvaluateConfig, ctx: ShardContext,
                            role: str = "policy") -> ArtifactRef:
    """The judging half of the evaluation on merged responses; metrics in the artifact's manifest."""
    ref = evaluate.run(model, prompts, judge, cfg, ctx.work_dir, quiet=ctx.quiet, responses=responses)
    _record(ctx, f"evaluate-{role}", {"model": model, "prompts": prompts, "responses": responses},
            {"evaluation": ref}, {**cfg.model_dump(), "role": role}, _phase_s(ctx))
    return ref


# What a runner's subflow submits, by stage name (flows.sharded).
SHARD_TASKS = {"collect": collect_shard_task, "annotate": annotate_shard_task,
               "heldout-generate": heldout_generate_shard_task}
