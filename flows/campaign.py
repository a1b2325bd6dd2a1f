"""N alignment rounds in a row: round k samples from round k-1's checkpoint (on-policy iterative alignment).

Each round gets its own disjoint prompt shard (``prompts.shard`` = k of ``rounds``), as SPPO's per-iteration prompt
sets require (the held-out set stays the same), and its MLflow parent run is tagged with the campaign name and round index, so reports can follow
the campaign's trend.
"""

from __future__ import annotations

from pydantic import Field

from prefect import flow, get_run_logger

from pipeline_lib.config import RoundConfig, Section
from flows.round import alignment_round


class CampaignConfig(Section):
    name: str = "campaign"
    rounds: int = Field(2, ge=1, description="number of rounds")
    chain: str = Field("checkpoint", pattern="^(checkpoint|champion)$",
                       description="next round's policy: the last checkpoint, or the registry's champion")
    disjoint_prompts: bool = Field(True, description="each round trains on its own prompt shard (SPPO)")
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
def alignment_campaign(config: CampaignConfig) -> list[dict]:
    """Run ``config.rounds`` rounds, each from the previous round's model."""
    logger = get_run_logger()
    summaries = []
    policy = config.round.policy
    for k in range(config.rounds):
        rc = round_config(config, k, policy)
        s = alignment_round.with_options(flow_run_name=rc.name)(rc, campaign=config.name, round_index=k + 1)
        summaries.append(s)
        policy = (s["checkpoint_path"] if config.chain == "checkpoint"
                  else f"models:/{rc.run.registered_model}@champion")
        logger.info("round %d/%d: %s", k + 1, config.rounds, s["promotion_reason"])
    return summaries
