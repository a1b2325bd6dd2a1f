"""The CI smoke pipeline: the tiny model through every stage, then every loss once on the same judged samples.

The first round is complete (collect, annotate, pair, train, evaluate, promotion). The variants reuse its cached
prompts, generations and judgments (Prefect cache hits), build the pairs their loss needs, train, and skip the
held-out evaluation (a random tiny model has nothing to show there); each registers its checkpoint.
"""

from __future__ import annotations

from prefect import flow

from flows.round import alignment_round
from pipeline_lib.config import RoundConfig

# (name, overrides of the train / pairs sections) for every loss and the WPO weighting, once each
VARIANTS: list[tuple[str, dict, dict]] = [
    ("ipo", {"loss": "ipo"}, {}),
    ("hinge", {"loss": "hinge"}, {}),
    ("sppo_hard", {"loss": "sppo_hard"}, {}),
    ("sppo", {"loss": "sppo", "reference": "behavior", "optimizer": "rmsprop"}, {"strategy": "sppo_winprob"}),
    ("sppo_single", {"loss": "sppo_single", "reference": "behavior", "optimizer": "rmsprop"},
     {"strategy": "sppo_winprob"}),
    # SAIL's score term needs pairs of independent samples: (0, 1), (2, 3) of the K = 4, not the best and the worst
    ("sail", {"loss": "sail", "optimizer": "rmsprop"}, {"strategy": "iid_pairs"}),
    # SAIL-PP: policy samples labelled by the policy itself; no judge, so the round skips the annotate stage
    ("sail_pp", {"loss": "sail", "optimizer": "rmsprop", "sail": {"self_label_prob": 1.0}}, {"strategy": "unlabelled"}),
    ("dpo_wpo", {"loss": "dpo", "weighting": "wpo"}, {}),
]


def variant_config(base: RoundConfig, name: str, train: dict, pairs: dict) -> RoundConfig:
    data = base.model_dump(exclude_unset=False)
    data["name"] = f"{base.name}-{name}"
    data["train"].update(train)
    data["pairs"].update(pairs)
    data["evaluate"]["enabled"] = False
    if "wpo" not in train:
        data["train"].pop("wpo", None)
    if "sail" not in train:
        data["train"].pop("sail", None)
    return RoundConfig.model_validate(data)


@flow(name="alignflow-smoke", log_prints=True)
def smoke_pipeline(config: RoundConfig) -> dict:
    """One full round, then every other loss once on the same samples."""
    first = alignment_round(config)
    variants = {name: alignment_round(variant_config(config, name, t, p)) for name, t, p in VARIANTS}
    return {"round": first, "variants": variants}
