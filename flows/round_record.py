"""What a round records around its stages: the MLflow parent run and its key, the champion, the candidate's
registration and promotion, the summary, and what the round publishes (metrics, tags, charts, Prefect artifacts).

``flows/round.py`` calls these in order; none of them runs a stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.artifacts import create_link_artifact, create_table_artifact

from pipeline_lib.artifacts import ArtifactRef, read_manifest, sha256_json
from pipeline_lib.config import RoundConfig
from pipeline_lib.cost import prefixed, round_cost
from pipeline_lib.lineage import RoundLineage
from pipeline_lib.models import ResolvedModel
from pipeline_lib.promotion import decide_promotion
from tasks.common import flow_run_id
from tasks.hooks import cached_stages

REPORT_METRICS = ["pass_rate_strict", "instruction_pass_rate", "mean_score", "mean_tokens"]
IFEVAL_METRICS = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose",
                  "truncated_share"]


def report_metrics(config: RoundConfig) -> list[str]:
    """The held-out metrics a round reports (IFEval's with ``evaluate.ifeval.enabled``)."""
    return REPORT_METRICS + ([f"ifeval.{k}" for k in IFEVAL_METRICS] if config.evaluate.ifeval.enabled else [])


def open_lineage(config: RoundConfig, work_dir: str, logger: logging.Logger | logging.LoggerAdapter) -> RoundLineage:
    """The round's MLflow store (also sets the registry URI); warns when its experiment is new."""
    lineage = RoundLineage(config.run.mlflow_tracking_uri, config.run.experiment)
    if lineage.new_experiment:  # a new store (or experiment) and a warm cache: hits would log no stage run
        logger.warning("MLflow experiment %r is new in %s: every stage runs again to log its run there (artifacts "
                       "already in %s are reused, not recomputed)", config.run.experiment,
                       config.run.mlflow_tracking_uri, work_dir)
    return lineage


def policy_reference(config: RoundConfig, lineage: RoundLineage) -> str:
    """The model that samples this round: ``policy``, or the registry's champion when the round follows it
    (``follow_champion``: scheduled rounds improve the champion) and one exists."""
    if config.follow_champion and lineage.alias_version(config.run.registered_model, "champion") is not None:
        return f"models:/{config.run.registered_model}@champion"
    return config.policy


def round_key_config(config: RoundConfig) -> dict:
    """What identifies a round's content for its MLflow parent run: the config without where it runs (``run``) and
    how its shards run (``scale``); the shard count changes the samples (one seed per shard), so N > 1 is kept."""
    data = config.model_dump(exclude={"run", "scale"})
    if config.scale.shards > 1:
        data["shards"] = config.scale.shards
    return data


def start_round_run(lineage: RoundLineage, config: RoundConfig, policy: ResolvedModel, campaign: str,
                    round_index: int) -> tuple[str, str]:
    """(round key, parent run id): the round's MLflow parent run, found again by its key (policy and content)."""
    round_key = sha256_json({"policy": policy.sha256, "config": round_key_config(config)})[:20]
    parent = lineage.start_round(round_key, config.name, config.model_dump(),
                                 tags={"prefect.flow_run_id": flow_run_id(), "alignflow.policy": policy.ref,
                                       "alignflow.policy_sha256": policy.sha256, "alignflow.campaign": campaign,
                                       "alignflow.round_index": str(round_index)})
    return round_key, parent


def checkpoint_model(checkpoint: ArtifactRef) -> ResolvedModel:
    """A checkpoint artifact as a model the next stages can load."""
    return ResolvedModel(ref=f"checkpoint:{checkpoint.short}", path=checkpoint.path, sha256=checkpoint.sha256)


def champion_of(lineage: RoundLineage, config: RoundConfig, policy: ResolvedModel,
                parent: str) -> tuple[ResolvedModel, str]:
    """(the registered champion, its version); the first round seeds it from the policy the round started from."""
    from pipeline_lib.models import resolve

    name = config.run.registered_model
    seed = ArtifactRef(kind="model", name=policy.ref, path=policy.path, sha256=policy.sha256)
    mv = lineage.seed_champion(parent, seed, name, config.run.work_dir)  # seeded under a lock: one first champion
    if (mv.tags or {}).get("alignflow.sha256") == policy.sha256:
        return policy, str(mv.version)
    return resolve(f"models:/{name}/{mv.version}"), str(mv.version)


def register_and_promote(lineage: RoundLineage, config: RoundConfig, parent: str, checkpoint: ArtifactRef,
                         round_key: str, policy: ResolvedModel, champion_version: str, before: dict, after: dict,
                         paired: dict) -> tuple[str, bool, str]:
    """Register the checkpoint as the ``candidate``; promote it to ``champion`` when ``promotion`` says so.
    Returns (candidate version, promoted, reason)."""
    version = lineage.register_checkpoint(parent, checkpoint, config.run.registered_model, "candidate",
                                          tags={"alignflow.round_key": round_key, "alignflow.parent_policy":
                                                policy.sha256})
    promoted, reason = decide_promotion(config.promotion, before, after, paired)
    if promoted:  # a compare-and-set: only if the champion is still the one the candidate was evaluated against
        promoted, lost = lineage.promote(config.run.registered_model, champion_version, version, config.run.work_dir)
        reason = reason if promoted else lost
    return version, promoted, reason


def paired_metrics(paired: dict[str, dict]) -> dict[str, float]:
    """MLflow metric names of the paired comparisons: ``paired.<metric>.delta`` / ``.ci_low`` / ``.ci_high`` /
    ``.p_value`` (prompt-level metrics only)."""
    out = {}
    for metric, p in paired.items():
        for k in ("delta", "ci_low", "ci_high", "p_value"):
            if p.get(k) is not None:
                out[f"paired.{metric}.{k}"] = float(p[k])
    return out


def finish_round_run(lineage: RoundLineage, parent: str, summary: dict[str, Any]) -> None:
    """Complete the summary with the round's stage time, orchestration overhead and cost, and log it to the parent
    run: metrics (before / after, paired, cost) and tags (artifact digests, promotion)."""
    # Orchestration overhead: wall time not spent inside this run's (non-cached) stage functions.
    stage_s = lineage.stage_seconds(parent, flow_run_id())
    summary["stage_s"] = stage_s
    summary["overhead_share"] = 1.0 - stage_s / summary["wall_s"] if stage_s else float("nan")
    # What the round cost, stage by stage, from the stage runs' cost.* metrics (pipeline_lib/cost)
    summary["cost"] = round_cost(lineage.client, lineage.experiment_id, parent, flow_run_id(),
                                 cached_stages(flow_run_id()))
    promoted, reason = summary["promoted"], summary["promotion_reason"]
    # cached stages log no run: the report finds producers by the alignflow.artifact.* tags
    lineage.finish_round(parent, {**{f"before.{k}": v for k, v in summary["before"].items()},
                                  **{f"after.{k}": v for k, v in summary["after"].items()},
                                  "round_wall_s": summary["wall_s"], "stage_s": stage_s,
                                  "overhead_share": summary["overhead_share"], "promoted": float(promoted),
                                  **paired_metrics(summary["paired"]), **prefixed(summary["cost"]["total"])},
                         tags={**{f"alignflow.artifact.{n}": sha for n, sha in summary["artifacts"].items()},
                               "alignflow.promoted": str(promoted).lower(), "alignflow.promotion_reason": reason})


def publish_round(lineage: RoundLineage, config: RoundConfig, parent: str, summary: dict[str, Any],
                  pairs: ArtifactRef, checkpoint: ArtifactRef, campaign: str,
                  logger: logging.Logger | logging.LoggerAdapter) -> None:
    """The round's charts (MLflow artifacts of the parent run) and its Prefect artifacts: the metrics table,
    champion vs candidate, and a link to the MLflow run."""
    from pipeline_lib.report.publish import log_round_charts

    try:  # pictures must never fail a round whose model is trained and registered
        log_round_charts(lineage, parent, pairs=pairs, checkpoint=checkpoint, campaign=campaign,
                         round_name=config.name)
    except Exception as e:  # noqa: BLE001
        logger.warning("round charts not drawn: %s", e)
    paired = summary["paired"]
    create_table_artifact(
        key="round-summary",
        table=[{"metric": k, "champion": summary["before"][k], "candidate": summary["after"][k],
                **({"delta": paired[k]["delta"], "ci_low": paired[k]["ci_low"], "ci_high": paired[k]["ci_high"],
                    "mcnemar_p": paired[k]["p_value"]} if k in paired else {})}
               for k in summary["before"]],
        description=f"Held-out metrics, champion vs candidate, round {config.name}: {summary['promotion_reason']}",
    )
    ui = os.environ.get("ALIGNFLOW_MLFLOW_UI", "http://127.0.0.1:5000")
    create_link_artifact(key="mlflow-run", link=f"{ui}/#/experiments/{lineage.experiment_id}/runs/{parent}",
                         description="MLflow parent run of this round")


def round_summary(config: RoundConfig, round_key: str, parent: str, version: str, champion_version: str,
                  promoted: bool, reason: str, before: dict, after: dict, paired: dict,
                  artifacts: dict[str, ArtifactRef], checkpoint: ArtifactRef, pairs: ArtifactRef,
                  wall_s: float) -> dict[str, Any]:
    """What ``alignment_round`` returns (``finish_round_run`` adds the stage time, overhead and cost)."""
    metrics = report_metrics(config)
    return {
        "round_key": round_key,
        "mlflow_run_id": parent,
        "registered_model": config.run.registered_model,
        "candidate_version": version,
        "champion_version": version if promoted else champion_version,
        "promoted": promoted,
        "promotion_reason": reason,
        "before": {k: before[k] for k in metrics},
        "after": {k: after[k] for k in metrics},
        "paired": paired,
        "artifacts": {n: r.sha256 for n, r in artifacts.items()},
        "checkpoint_path": checkpoint.path,
        "pairs": read_manifest(pairs.path)["metrics"],
        "wall_s": wall_s,
    }
