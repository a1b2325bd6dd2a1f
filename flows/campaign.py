"""N alignment rounds in a row: round k samples from round k-1's checkpoint (on-policy iterative alignment).

Each round gets its own disjoint prompt shard (``prompts.shard`` = k of ``rounds``), as SPPO's per-iteration prompt
sets require (the held-out set stays the same), and its MLflow parent run is tagged with the campaign name and round
index, so reports can follow the campaign's trend.

With ``final_evaluation`` (default), the campaign ends by evaluating its starting policy and its last checkpoint on
the same held-out prompts (and IFEval's, when the round config enables it) and comparing them prompt by prompt: the
campaign's effect with a confidence interval, in an MLflow run of its own (tag ``alignflow.campaign_final``).
Intermediate rounds may then run with ``evaluate.enabled: false`` (no promotion gate, chain ``checkpoint``), which
saves two evaluations per round.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from prefect import flow, get_run_logger

from flows.round import alignment_round, evaluate_both
from flows.round_record import paired_metrics, report_metrics
from pipeline_lib.artifacts import sha256_json
from pipeline_lib.config import RoundConfig
from pipeline_lib.lineage import CAMPAIGN_FINAL_TAG
from pipeline_lib.models import ResolvedModel
from pipeline_lib.sections import Section


class CampaignConfig(Section):
    name: str = "campaign"
    rounds: int = Field(2, ge=1, description="number of rounds")
    chain: str = Field("checkpoint", pattern="^(checkpoint|champion)$",
                       description="next round's policy: the last checkpoint, or the registry's champion")
    disjoint_prompts: bool = Field(True, description="each round trains on its own prompt shard (SPPO)")
    final_evaluation: bool = Field(True, description="compare the starting policy with the last checkpoint on the "
                                                     "same prompts (paired confidence intervals)")
    round: RoundConfig = RoundConfig()


def round_config(config: CampaignConfig, k: int, policy: str) -> RoundConfig:
    """Round k's config (0-based): its name, policy, fixed initial policy and prompt shard."""
    rc = config.round.model_copy(deep=True)
    rc.name = f"{config.name}-r{k + 1}"
    rc.policy = policy
    rc.initial_policy = config.round.initial_policy or config.round.policy  # train.reference=initial keeps it
    if config.disjoint_prompts:
        rc.prompts.num_shards, rc.prompts.shard = config.rounds, k
    return rc


@flow(name="alignment-campaign", log_prints=True)
def alignment_campaign(config: CampaignConfig) -> dict:
    """Run ``config.rounds`` rounds, each from the previous round's model; returns ``{"rounds": [round summaries],
    "final": start-vs-last comparison or None}``."""
    logger = get_run_logger()
    summaries = []
    policy = config.round.policy
    t0 = time.perf_counter()
    for k in range(config.rounds):
        rc = round_config(config, k, policy)
        s = alignment_round.with_options(flow_run_name=rc.name)(rc, campaign=config.name, round_index=k + 1)
        summaries.append(s)
        policy = (s["checkpoint_path"] if config.chain == "checkpoint"
                  else f"models:/{rc.run.registered_model}@champion")
        logger.info("round %d/%d: %s", k + 1, config.rounds, s["promotion_reason"])
    rounds_wall_s = time.perf_counter() - t0
    final = _final_comparison(config, summaries, rounds_wall_s) if config.final_evaluation else None
    return {"rounds": summaries, "final": final}


def _final_comparison(config: CampaignConfig, summaries: list[dict], rounds_wall_s: float) -> dict:
    """The campaign's starting policy against its last checkpoint, on the same prompts, in an MLflow run of its
    own."""
    from flows.sharded import ShardedStages
    from pipeline_lib.lineage import RoundLineage
    from tasks.bound import StageTasks
    from tasks.common import RoundContext, flow_run_id
    from tasks.stages import resolve_model_task

    logger = get_run_logger()
    rc = config.round
    work_dir = str(Path(rc.run.work_dir).resolve())
    t = StageTasks.in_work_dir(work_dir)
    lineage = RoundLineage(rc.run.mlflow_tracking_uri, rc.run.experiment)
    start: ResolvedModel = resolve_model_task(rc.policy)
    last = summaries[-1]
    final = ResolvedModel(ref=f"checkpoint:{last['artifacts']['checkpoint'][:12]}", path=last["checkpoint_path"],
                          sha256=last["artifacts"]["checkpoint"])
    key = sha256_json({"campaign_final": config.name, "start": start.sha256, "final": final.sha256,
                       "evaluate": rc.evaluate.model_dump(), "prompts": rc.prompts.model_dump()})[:20]
    parent = lineage.start_round(key, f"{config.name} final", {"evaluate": rc.evaluate.model_dump(),
                                                               "rounds": config.rounds},
                                 tags={CAMPAIGN_FINAL_TAG: config.name, "prefect.flow_run_id": flow_run_id(),
                                       "alignflow.start_sha256": start.sha256, "alignflow.final_sha256": final.sha256})
    ctx = RoundContext.of_run(rc.run, work_dir, parent)
    heldout = t.prompts(rc.prompts, "heldout", rc.prompts.n_heldout, ctx)
    sharded = ShardedStages(rc.scale, ctx, None, None, t.evaluate)  # only its evaluate is used
    before, after, paired = evaluate_both(rc, start, final, heldout, sharded, t, roles=("start", "final"))
    metrics = report_metrics(rc)
    out = {"mlflow_run_id": parent, "start": start.ref, "final": final.ref, "rounds_wall_s": rounds_wall_s,
           "before": {k: before[k] for k in metrics}, "after": {k: after[k] for k in metrics}, "paired": paired}
    lineage.finish_round(parent, {**{f"start.{k}": v for k, v in out["before"].items()},
                                  **{f"final.{k}": v for k, v in out["after"].items()},
                                  "rounds_wall_s": rounds_wall_s, **paired_metrics(paired)})
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key="campaign-final",
        table=[{"metric": k, "start": out["before"][k], "final": out["after"][k],
                **({"delta": paired[k]["delta"], "ci_low": paired[k]["ci_low"], "ci_high": paired[k]["ci_high"],
                    "mcnemar_p": paired[k]["p_value"]} if k in paired else {})} for k in metrics],
        description=f"Campaign {config.name}: starting policy vs last checkpoint on the same prompts "
                    f"(paired 95% CI of final - start; rounds {rounds_wall_s / 60:.1f} min)")
    for m in ("ifeval.prompt_level_strict", "pass_rate_strict"):
        if m in paired:
            p = paired[m]
            logger.info("campaign %s, start -> final: %s %+.3f [%+.3f, %+.3f]", config.name, m, p["delta"],
                        p["ci_low"], p["ci_high"])
            break
    return out
