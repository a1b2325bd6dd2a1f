"""When a round's candidate replaces the champion (registry alias ``champion``): the ``promotion:`` section."""

from __future__ import annotations

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
