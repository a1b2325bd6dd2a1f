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

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, sha256_json
from pipeline_lib.config import RoundConfig
from pipeline_lib.cost import prefixed, round_cost
from pipeline_lib.lineage import RoundLineage
from pipeline_lib.methods import PAIRINGS
from pipeline_lib.models import ResolvedModel
from pipeline_lib.promotion import PromotionConfig
from flows.sharded import ShardedStages
from tasks.common import RoundContext
from tasks.evaluate import benchmark_data_task, ifeval_task
from tasks.hooks import cached_stages
from tasks.results import with_result_store as _with_storage  # checked JSON records, one run per cache key
from tasks.stages import (annotate_task, collect_task, dataset_pairs_task, evaluate_task, hybrid_candidates_task,
                          hybrid_pair_task, hybrid_prompts_task, pair_task, prompts_task, resolve_model_task,
                          train_task)

REPORT_METRICS = ["pass_rate_strict", "instruction_pass_rate", "mean_score", "mean_tokens"]
IFEVAL_METRICS = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose",
                  "truncated_share"]


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def decide_promotion(cfg: PromotionConfig, champion: dict, candidate: dict,
                     paired: dict | None = None) -> tuple[bool, str]:
    """Promote when the candidate beats the champion on the configured metric: by more than the margin
    (``rule: margin``), or with the lower bound of the paired confidence interval of candidate - champion above the
    margin (``rule: significant``; ``paired[metric]`` from :mod:`pipeline_lib.evaluation.paired`)."""
    c, k = champion[cfg.metric], candidate[cfg.metric]
    if not cfg.enabled:
        return False, "promotion disabled"
    if c != c or k != k:  # NaN: not evaluated
        return False, "champion kept: candidate not evaluated"
    if cfg.rule == "significant":
        p = (paired or {}).get(cfg.metric)
        if p is None:
            return False, f"champion kept: no paired comparison of {cfg.metric}"
        ci = (f"{cfg.metric} {p['delta']:+.3f}, {p['confidence']:.0%} CI [{p['ci_low']:+.3f}, "
              f"{p['ci_high']:+.3f}]")
        if p["ci_low"] > cfg.margin:
            return True, f"promoted: {ci}, lower bound > margin {cfg.margin}"
        return False, f"champion kept: {ci}, lower bound <= margin {cfg.margin}"
    if k > c + cfg.margin:
        return True, f"promoted: {cfg.metric} {k:.3f} > champion {c:.3f} + margin {cfg.margin}"
    return False, f"champion kept: {cfg.metric} {k:.3f} <= champion {c:.3f} + margin {cfg.margin}"


def paired_metrics(paired: dict[str, dict]) -> dict[str, float]:
    """MLflow metric names of the paired comparisons: ``paired.<metric>.delta`` / ``.ci_low`` / ``.ci_high`` /
    ``.p_value`` (prompt-level metrics only)."""
    out = {}
    for metric, p in paired.items():
        for k in ("delta", "ci_low", "ci_high", "p_value"):
            if p.get(k) is not None:
                out[f"paired.{metric}.{k}"] = float(p[k])
    return out


def _champion(lineage: RoundLineage, config: RoundConfig, policy: ResolvedModel, parent: str):
    """The registered champion; the first round seeds it from the policy the round started from."""
    from pipeline_lib.models import resolve

    name = config.run.registered_model
    seed = ArtifactRef(kind="model", name=policy.ref, path=policy.path, sha256=policy.sha256)
    mv = lineage.seed_champion(parent, seed, name, config.run.work_dir)  # seeded under a lock: one first champion
    if (mv.tags or {}).get("alignflow.sha256") == policy.sha256:
        return policy, str(mv.version)
    return resolve(f"models:/{name}/{mv.version}"), str(mv.version)


def evaluate_both(config: RoundConfig, champion: ResolvedModel, candidate: ResolvedModel, heldout: ArtifactRef,
                  sharded: ShardedStages, data_t, ifeval_t,
                  roles: tuple[str, str] = ("champion", "candidate")) -> tuple[dict, dict, dict]:
    """Champion and candidate on the same held-out prompts (and IFEval's when enabled): (champion metrics,
    candidate metrics, paired comparisons by metric name), on as many GPUs as the policy needs to sample
    (collect.tensor_parallel_size)."""
    from pipeline_lib.stages.evaluate import paired_heldout
    from pipeline_lib.evaluation.ifeval import paired_ifeval

    ev, tp = config.evaluate, config.collect.tensor_parallel_size
    stats = {"n_resamples": ev.n_resamples, "confidence": ev.confidence}
    ctx = sharded.ctx
    before = sharded.evaluate(champion, heldout, config.judge, ev, roles[0], tp)
    after = sharded.evaluate(candidate, heldout, config.judge, ev, roles[1], tp)
    m_before, m_after = read_manifest(before.path)["metrics"], read_manifest(after.path)["metrics"]
    paired = paired_heldout(read_table(before), read_table(after), **stats)
    if ev.ifeval.enabled:
        data = data_t(None, None, "", ctx, ev.ifeval)["ifeval"]
        ib = ifeval_t(champion, data, ev.ifeval, ctx, role=roles[0], tensor_parallel_size=tp)
        ia = ifeval_t(candidate, data, ev.ifeval, ctx, role=roles[1], tensor_parallel_size=tp)
        for m, ref in ((m_before, ib), (m_after, ia)):
            m.update({f"ifeval.{k}": v for k, v in read_manifest(ref.path)["metrics"].items()})
        paired.update({f"ifeval.{k}": v for k, v in paired_ifeval(read_table(ib), read_table(ia), **stats).items()})
    return m_before, m_after, paired


def round_key_config(config: RoundConfig) -> dict:
    """What identifies a round's content for its MLflow parent run: the config without where it runs (``run``) and
    how its shards run (``scale``); the shard count changes the samples (one seed per shard), so N > 1 is kept."""
    data = config.model_dump(exclude={"run", "scale"})
    if config.scale.shards > 1:
        data["shards"] = config.scale.shards
    return data


@flow(name="alignment-round", log_prints=True)
def alignment_round(config: RoundConfig, campaign: str = "", round_index: int = 0) -> dict:
    """Run one preference-alignment round and return its summary (metrics before/after, artifact hashes)."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    work_dir = str(Path(config.run.work_dir).resolve())
    lineage = RoundLineage(config.run.mlflow_tracking_uri, config.run.experiment)  # also sets the registry URI
    if lineage.new_experiment:  # a new store (or experiment) and a warm cache: hits would log no stage run
        logger.warning("MLflow experiment %r is new in %s: every stage runs again to log its run there (artifacts "
                       "already in %s are reused, not recomputed)", config.run.experiment,
                       config.run.mlflow_tracking_uri, work_dir)
    (prompts_t, collect_t, annotate_t, pair_t, train_t, evaluate_t, dataset_pairs_t, hybrid_prompts_t,
     hybrid_candidates_t, hybrid_pair_t, data_t, ifeval_t) = _with_storage(
        work_dir, prompts_task, collect_task, annotate_task, pair_task, train_task, evaluate_task, dataset_pairs_task,
        hybrid_prompts_task, hybrid_candidates_task, hybrid_pair_task, benchmark_data_task, ifeval_task,
        relog=lineage.new_experiment)

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
        data = {"prompts_train": train_prompts, "generations": generations}
        judgments = generations  # a pairing that reads no verdicts (SAIL-PP's self-labels) skips the judge
        if PAIRINGS[config.pairs.strategy].needs_judge:
            judgments = data["judgments"] = sharded.annotate(generations, config.judge)
        pairs = pair_t(judgments, config.pairs, ctx)
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
    metrics = REPORT_METRICS + ([f"ifeval.{k}" for k in IFEVAL_METRICS] if config.evaluate.ifeval.enabled else [])
    m_before = m_after = {k: float("nan") for k in metrics}
    paired: dict[str, dict] = {}
    if config.evaluate.enabled:
        m_before, m_after, paired = evaluate_both(config, champion, candidate, heldout, sharded, data_t, ifeval_t)

    version = lineage.register_checkpoint(parent, checkpoint, config.run.registered_model, "candidate",
                                          tags={"alignflow.round_key": round_key, "alignflow.parent_policy":
                                                policy.sha256})
    promoted, reason = decide_promotion(config.promotion, m_before, m_after, paired)
    if promoted:  # a compare-and-set: only if the champion is still the one the candidate was evaluated against
        promoted, lost = lineage.promote(config.run.registered_model, champion_version, version, work_dir)
        reason = reason if promoted else lost
    summary = {
        "round_key": round_key,
        "mlflow_run_id": parent,
        "registered_model": config.run.registered_model,
        "candidate_version": version,
        "champion_version": version if promoted else champion_version,
        "promoted": promoted,
        "promotion_reason": reason,
        "before": {k: m_before[k] for k in metrics},
        "after": {k: m_after[k] for k in metrics},
        "paired": paired,
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
    # What the round cost, stage by stage, from the stage runs' cost.* metrics (pipeline_lib/cost)
    summary["cost"] = round_cost(lineage.c, lineage.experiment_id, parent, _flow_run_id(),
                                 cached_stages(_flow_run_id()))
    # cached stages log no run: the report finds producers by the alignflow.artifact.* tags
    lineage.finish_round(parent, {**{f"before.{k}": v for k, v in summary["before"].items()},
                                  **{f"after.{k}": v for k, v in summary["after"].items()},
                                  "round_wall_s": summary["wall_s"], "stage_s": stage_s,
                                  "overhead_share": summary["overhead_share"], "promoted": float(promoted),
                                  **paired_metrics(paired), **prefixed(summary["cost"]["total"])},
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
        table=[{"metric": k, "champion": summary["before"][k], "candidate": summary["after"][k],
                **({"delta": paired[k]["delta"], "ci_low": paired[k]["ci_low"], "ci_high": paired[k]["ci_high"],
                    "mcnemar_p": paired[k]["p_value"]} if k in paired else {})}
               for k in metrics],
        description=f"Held-out metrics, champion vs candidate, round {config.name}: {reason}",
    )
    ui = os.environ.get("ALIGNFLOW_MLFLOW_UI", "http://127.0.0.1:5000")
    create_link_artifact(key="mlflow-run", link=f"{ui}/#/experiments/{lineage.experiment_id}/runs/{parent}",
                         description="MLflow parent run of this round")
    logger.info("round %s done: candidate v%s, %s", config.name, version, reason)
    return summary
