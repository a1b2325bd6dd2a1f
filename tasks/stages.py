"""Thin Prefect tasks, one per stage: ``<stage>_task`` calls ``pipeline_lib.stages.<stage>.run``, records lineage and
returns the artifact reference."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.artifacts import ArtifactRef
from pipeline_lib.judges.base import JudgeOptions
from pipeline_lib.methods import MethodConfig
from pipeline_lib.models import ResolvedModel, resolve
from pipeline_lib.report.progress import Progress
from pipeline_lib.stages import (annotate, collect, dataset_pairs, evaluate, hybrid_candidates, hybrid_pair,
                                 hybrid_prompts, pair, prompts, train)
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.evaluate import EvaluateConfig
from pipeline_lib.stages.hybrid_pair import HybridOptions
from pipeline_lib.stages.pair import PairsConfig
from pipeline_lib.stages.prompts import PromptSetOptions
from pipeline_lib.stages.train import TrainConfig
from tasks.common import RoundContext, gpu_slot, task_options


# Never cached or persisted: resolution rehashes the model each time (a registered version is checked against its
# recorded digest), and Prefect's default storage for an uncached task result would be a pickle.
@task(name="resolve-model", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=False)
def resolve_model_task(ref: str) -> ResolvedModel:
    """Resolve a model reference to a local directory with a content hash."""
    return resolve(ref)


@task(**task_options("prompts"))
def prompts_task(cfg: PromptSetOptions, split: str, n: int, ctx: RoundContext) -> ArtifactRef:
    """Materialise the prompt set of one split."""
    ref = prompts.run(cfg, split, n, ctx.work_dir)
    ctx.record(f"prompts-{split}", {}, {"prompts": ref}, {**cfg.model_dump(), "split": split, "n": n})
    return ref


@task(**task_options("collect"))
def collect_task(policy: ResolvedModel, prompts: ArtifactRef, cfg: CollectConfig, ctx: RoundContext) -> ArtifactRef:
    """Sample K responses per prompt from the policy with vLLM."""
    with gpu_slot(ctx.gpu_limit):
        ref = collect.run(policy, prompts, cfg, ctx.work_dir, quiet=ctx.quiet)
    ctx.record("collect", {"policy": policy, "prompts": prompts}, {"generations": ref}, cfg.model_dump())
    return ref


@task(**task_options("annotate"))
def annotate_task(generations: ArtifactRef, judge: JudgeOptions, ctx: RoundContext) -> ArtifactRef:
    """Score every sample with the judge."""
    ref = annotate.run(generations, judge, ctx.work_dir, quiet=ctx.quiet)
    ctx.record("annotate", {"generations": generations}, {"judgments": ref}, judge.model_dump())
    return ref


@task(**task_options("pair"))
def pair_task(judgments: ArtifactRef, cfg: PairsConfig, ctx: RoundContext) -> ArtifactRef:
    """Build preference pairs from judged samples."""
    ref = pair.run(judgments, cfg, ctx.work_dir)
    ctx.record("pair", {"judgments": judgments}, {"pairs": ref}, cfg.model_dump())
    return ref


@task(**task_options("dataset-pairs"))
def dataset_pairs_task(cfg: Any, policy: ResolvedModel, ctx: RoundContext) -> ArtifactRef:
    """Validate an off-policy preference dataset and render its prompts with the policy's chat template."""
    ref = dataset_pairs.run(cfg, policy, ctx.work_dir)
    ctx.record("dataset-pairs", {"policy": policy}, {"pairs": ref}, cfg.model_dump())
    return ref


@task(**task_options("hybrid-prompts"))
def hybrid_prompts_task(dataset_pairs: ArtifactRef, ctx: RoundContext) -> ArtifactRef:
    """The dataset's prompts as a prompt table, for collect."""
    ref = hybrid_prompts.run(dataset_pairs, ctx.work_dir)
    ctx.record("prompts-train", {"dataset_pairs": dataset_pairs}, {"prompts": ref}, {})
    return ref


@task(**task_options("hybrid-candidates"))
def hybrid_candidates_task(dataset_pairs: ArtifactRef, generations: ArtifactRef, ctx: RoundContext) -> ArtifactRef:
    """Dataset responses + on-policy samples, one table to judge."""
    ref = hybrid_candidates.run(dataset_pairs, generations, ctx.work_dir)
    ctx.record("hybrid-candidates", {"dataset_pairs": dataset_pairs, "generations": generations},
               {"generations": ref}, {})
    return ref


@task(**task_options("hybrid-pair"))
def hybrid_pair_task(judgments: ArtifactRef, cfg: HybridOptions, ctx: RoundContext) -> ArtifactRef:
    """Chosen = best of all candidates, rejected by the configured rule; sources kept."""
    ref = hybrid_pair.run(judgments, cfg, ctx.work_dir)
    ctx.record("pair", {"judgments": judgments}, {"pairs": ref}, cfg.model_dump())
    return ref


@task(**task_options("train"))
def train_task(policy: ResolvedModel, pairs: ArtifactRef, cfg: TrainConfig, method: MethodConfig,
               reference: ResolvedModel, ctx: RoundContext) -> ArtifactRef:
    """Preference-optimise the policy on the pairs against the reference; returns the checkpoint."""
    # The total (steps x ensemble members) comes with the trainer's first log row; a cached checkpoint logs none.
    with gpu_slot(ctx.gpu_limit), Progress(0, "train", "steps", quiet=ctx.quiet) as progress:
        ref = train.run(policy, pairs, cfg, method, ctx.work_dir, reference=reference,
                        on_log=progress.trainer_callback(members=cfg.ensemble), quiet=ctx.quiet)
    ctx.record("train", {"policy": policy, "pairs": pairs, "reference": reference}, {"checkpoint": ref},
               {**cfg.model_dump(), "method": method.model_dump()})
    return ref


@task(**task_options("evaluate"))
def evaluate_task(model: ResolvedModel, prompts: ArtifactRef, judge: JudgeOptions, cfg: EvaluateConfig,
                  ctx: RoundContext, role: str = "policy", tensor_parallel_size: int = 1) -> ArtifactRef:
    """Greedy responses on held-out prompts, judged; metrics in the artifact's manifest."""
    with gpu_slot(ctx.gpu_limit):
        ref = evaluate.run(model, prompts, judge, cfg, ctx.work_dir, quiet=ctx.quiet,
                           tensor_parallel_size=tensor_parallel_size)
    ctx.record(f"evaluate-{role}", {"model": model, "prompts": prompts}, {"evaluation": ref},
               {**cfg.model_dump(), "role": role})
    return ref
