"""One alignment round, top to bottom: prompts -> collect -> annotate -> pair -> train -> evaluate.

Run it with ``alignflow run --config configs/default.yaml`` (ephemeral Prefect, SQLite MLflow), or as a Prefect
deployment. Every stage is a cached, retryable task; the round's MLflow parent run holds one child run per stage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.filesystems import LocalFileSystem

from pipeline_lib.artifacts import ArtifactRef, read_manifest, sha256_json
from pipeline_lib.config import PromotionConfig, RoundConfig
from pipeline_lib.lineage import RoundLineage
from pipeline_lib.models import ResolvedModel
from flows.sharded import ShardedStages
from tasks.common import RoundContext, results_dir
from tasks.stages import (annotate_task, collect_task, dataset_pairs_task, evaluate_task, hybrid_candidates_task,
                          hybrid_pair_task, hybrid_prompts_task, pair_task, prompts_task, resolve_model_task,
                          train_task)

REPORT_METRICS = ["pass_rate_strict", "instruction_pass_rate", "mean_score", "mean_tokens"]


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def decide_promotion(cfg: PromotionConfig, champion: dict, candidate: dict) -> tuple[bool, str]:
    """Promote when the candidate beats the champion by more than the margin on the configured metric."""
    c, k = champion[cfg.metric], candidate[cfg.metric]
    if not cfg.enabled:
        return False, "promotion disabled"
    if c != c or k != k:  # NaN: not evaluated
        return False, "champion kept: candidate not evaluated"
    if k > c + cfg.margin:
        return True, f"promoted: {cfg.metric} {k:.3f} > champion {c:.3f} + margin {cfg.margin}"
    return False, f"champion kept: {cfg.metric} {k:.3f} <= champion {c:.3f} + margin {cfg.margin}"


def _champion(lineage: RoundLineage, config: RoundConfig, policy: ResolvedModel, parent: str):
    """The registered champion; the first round seeds it from the policy the round started from."""
    from pipeline_lib.models import resolve

    name = config.run.registered_model
    mv = lineage.alias_version(name, "champion")
    if mv is None:
        seed = ArtifactRef(kind="model", name=policy.ref, path=policy.path, sha256=policy.sha256)
        version = lineage.register_checkpoint(parent, seed, name, "champion", tags={"alignflow.seed": "true"})
        return policy, version
    if (mv.tags or {}).get("alignflow.sha256") == policy.sha256:
        return policy, str(mv.version)
    return resolve(f"models:/{name}/{mv.version}"), str(mv.version)


def round_key_config(config: RoundConfig) -> dict:
    """What identifies a round's content for its MLflow parent run: the config without where it runs (``run``) and
    how its shards run (``scale``); the shard count changes the samples (one seed per shard), so N > 1 is kept."""
    data = config.model_dump(exclude={"run", "scale"})
    if config.scale.shards > 1:
        data["shards"] = config.scale.shards
    return data


def _with_storage(work_dir: str, *tasks):
    # Task results (artifact references) and their cache records live beside the artifacts of this work dir; the
    # block must be saved server-side to be usable as result storage.
    base = str(results_dir(work_dir).resolve())
    storage = LocalFileSystem(basepath=base)
    storage.save(f"alignflow-results-{sha256_json(base)[:12]}", overwrite=True)
    return [t.with_options(result_storage=storage) for t in tasks]


@flow(name="alignment-round", log_prints=True)
def alignment_round(config: RoundConfig, campaign: str = "", round_index: int = 0) -> dict:
    """Run one preference-alignment round and return its summary (metrics before/after, artifact hashes)."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    work_dir = str(Path(config.run.work_dir).resolve())
    (prompts_t, collect_t, annotate_t, pair_t, train_t, evaluate_t, dataset_pairs_t, hybrid_prompts_t,
     hybrid_candidates_t, hybrid_pair_t) = _with_storage(
        work_dir, prompts_task, collect_task, annotate_task, pair_task, train_task, evaluate_task, dataset_pairs_task,
        hybrid_prompts_task, hybrid_candidates_task, hybrid_pair_task)

    lineage = RoundLineage(config.run.mlflow_tracking_uri, config.run.experiment)  # also sets the registry URI
    policy_ref = config.policy
    if config.follow_champion and lineage.alias_version(config.run.registered_model, "champion") is not None:
        policy_ref = f"models:/{config.run.registered_model}@champion"  # scheduled rounds improve the champion
    policy: ResolvedModel = resolve_model_task(policy_ref)
    round_key = sha256_json({"policy": policy.sha256, "config": round_key_config(config)})[:20]
    parent = lineage.start_round(round_key, config.name, config.model_dump(),
                                 tags={"prefect.flow_run_id": _flow_run_id(), "alignflow.policy": policy.ref,
                                       "alignflow.policy_sha256": policy.sha256, "alignflow.campaign": campaign,
                                       "alignflow.round_index": str(round_index)})
    ctx = RoundContext(work_dir=work_dir, tracking_uri=config.run.mlflow_tracking_uri,
                       experiment=config.run.experiment, parent_run_id=parent, flow_run_id=_flow_run_id(),
                       quiet=config.run.quiet, gpu_limit=config.run.gpu_concurrency_limit)
    # collect, model-judge annotate and held-out generation in config.scale.shards shards (1: the tasks as they are)
    sharded = ShardedStages(config.scale, ctx, collect_t, annotate_t, evaluate_t)

    heldout = prompts_t(config.prompts, "heldout", config.prompts.n_heldout, ctx)
    if config.data.mode == "on_policy":
        train_prompts = prompts_t(config.prompts, "train", config.prompts.n_train, ctx)
        generations = sharded.collect(policy, train_prompts, config.collect)
        judgments = sharded.annotate(generations, config.judge)
        pairs = pair_t(judgments, config.pairs, ctx)
        data = {"prompts_train": train_prompts, "generations": generations, "judgments": judgments}
    elif config.data.mode == "off_policy":  # a fixed preference dataset, no collection (off-policy DPO / WPO)
        pairs = dataset_pairs_t(config.data.preference_data, policy, ctx)
        data = {}
    else:  # hybrid (WPO HB): the dataset's responses and K on-policy samples, judged together
        dataset = dataset_pairs_t(config.data.preference_data, policy, ctx)
        train_prompts = hybrid_prompts_t(dataset, ctx)
        generations = sharded.collect(policy, train_prompts, config.collect)
        candidates = hybrid_candidates_t(dataset, generations, ctx)
        judgments = sharded.annotate(candidates, config.judge)
        pairs = hybrid_pair_t(judgments, config.data.hybrid, ctx)
        data = {"dataset_pairs": dataset, "prompts_train": train_prompts, "generations": generations,
                "candidates": candidates, "judgments": judgments}
    # BPO: the reference is the behavior policy that sampled these pairs (this round's policy); otherwise the
    # campaign's initial policy stays the fixed reference.
    reference = policy
    if config.train.reference == "initial" and config.initial_policy:
        reference = resolve_model_task(config.initial_policy)
    checkpoint = train_t(policy, pairs, config.train, config.method(), reference, ctx)
    candidate = ResolvedModel(ref=f"checkpoint:{checkpoint.short}", path=checkpoint.path, sha256=checkpoint.sha256)

    # The champion: the registry's current one, or (first round) the policy this round started from.
    champion, champion_version = _champion(lineage, config, policy, parent)
    m_before = m_after = {k: float("nan") for k in REPORT_METRICS}
    if config.evaluate.enabled:  # on as many GPUs as the policy needs to sample (collect.tensor_parallel_size)
        tp = config.collect.tensor_parallel_size
        before = sharded.evaluate(champion, heldout, config.judge, config.evaluate, "champion", tp)
        after = sharded.evaluate(candidate, heldout, config.judge, config.evaluate, "candidate", tp)
        m_before, m_after = read_manifest(before.path)["metrics"], read_manifest(after.path)["metrics"]

    version = lineage.register_checkpoint(parent, checkpoint, config.run.registered_model, "candidate",
                                          tags={"alignflow.round_key": round_key, "alignflow.parent_policy":
                                                policy.sha256})
    promoted, reason = decide_promotion(config.promotion, m_before, m_after)
    if promoted:
        lineage.set_alias(config.run.registered_model, "champion", version)
    summary = {
        "round_key": round_key,
        "mlflow_run_id": parent,
        "registered_model": config.run.registered_model,
        "candidate_version": version,
        "champion_version": version if promoted else champion_version,
        "promoted": promoted,
        "promotion_reason": reason,
        "before": {k: m_before[k] for k in REPORT_METRICS},
        "after": {k: m_after[k] for k in REPORT_METRICS},
        "artifacts": {n: r.sha256 for n, r in {**data, "prompts_heldout": heldout, "pairs": pairs,
                                               "checkpoint": checkpoint}.items()},
        "checkpoint_path": checkpoint.path,
        "pairs": read_manifest(pairs.path)["metrics"],
        "wall_s": time.perf_counter() - t_start,
    }
    # Orchestration overhead: wall time not spent inside this run's (non-cached) stage functions.
    stage_s = lineage.stage_seconds(parent, _flow_run_id())
    summary["stage_s"] = stage_s
    summary["overhead_share"] = 1.0 - stage_s / summary["wall_s"] if stage_s else float("nan")
    # cached stages log no run: the report finds producers by the alignflow.artifact.* tags
    lineage.finish_round(parent, {**{f"before.{k}": v for k, v in summary["before"].items()},
                                  **{f"after.{k}": v for k, v in summary["after"].items()},
                                  "round_wall_s": summary["wall_s"], "stage_s": stage_s,
                                  "overhead_share": summary["overhead_share"], "promoted": float(promoted)},
                         tags={**{f"alignflow.artifact.{n}": sha for n, sha in summary["artifacts"].items()},
                               "alignflow.promoted": str(promoted).lower(), "alignflow.promotion_reason": reason})
    from pipeline_lib.report.publish import log_round_charts

    try:  # pictures must never fail a round whose model is trained and registered
        log_round_charts(lineage, parent, pairs=pairs, checkpoint=checkpoint, campaign=campaign,
                         round_name=config.name)
    except Exception as e:  # noqa: BLE001
        logger.warning("round charts not drawn: %s", e)
    create_table_artifact(
        key="round-summary",
        table=[{"metric": k, "champion": summary["before"][k], "candidate": summary["after"][k]}
               for k in REPORT_METRICS],
        description=f"Held-out metrics, champion vs candidate, round {config.name}: {reason}",
    )
    ui = os.environ.get("ALIGNFLOW_MLFLOW_UI", "http://127.0.0.1:5000")
    create_link_artifact(key="mlflow-run", link=f"{ui}/#/experiments/{lineage.experiment_id}/runs/{parent}",
                         description="MLflow parent run of this round")
    logger.info("round %s done: candidate v%s, %s", config.name, version, reason)
    return summary
