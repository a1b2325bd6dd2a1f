"""When a round's candidate replaces the champion (registry alias ``champion``): the ``promotion:`` section and
the rule that reads it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from pipeline_lib.sections import Section

PromotionMetric = Literal["pass_rate_strict", "instruction_pass_rate", "mean_score", "ifeval.prompt_level_strict",
                          "ifeval.instruction_level_strict", "ifeval.prompt_level_loose",
                          "ifeval.instruction_level_loose"]


class PromotionConfig(Section):
    """When the round's candidate replaces the champion (registry alias ``champion``)."""

    enabled: bool = True
    metric: PromotionMetric = Field("pass_rate_strict", description="held-out metric, or ifeval.* (needs "
                                                                     "evaluate.ifeval.enabled)")
    rule: Literal["margin", "significant"] = Field(
        "margin", description="margin: candidate > champion + margin; significant: the lower bound of the paired "
                              "confidence interval of candidate - champion is above the margin")
    margin: float = Field(0.0, ge=0.0, description="see rule")


def decide_promotion(cfg: PromotionConfig, champion: dict, candidate: dict,
                     paired: dict | None = None) -> tuple[bool, str]:
    """Promote when the candidate beats the champion on the configured metric: by more than the margin
    (``rule: margin``), or with the lower bound of the paired confidence interval of candidate - champion above the
    margin (``rule: significant``; ``paired[metric]`` from :mod:`pipeline_lib.evaluation.paired`)."""
    c, k = champion[cfg.metric], candidate[cfg.metric]
    if not cfg.enabled:
        return False, "promotion disabled"
    if math.isnan(c) or math.isnan(k):  # not evaluated
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
