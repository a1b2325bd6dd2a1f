"""The ``judge:`` config section, typed: one of the judges' option models, chosen by ``kind`` (a discriminated
union). A round validates it once when the config loads and hands the typed options to every stage that judges
(annotate, evaluate), which build the judge from them (``build_judge``); nothing parses it again.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from pipeline_lib.judges.base import JUDGES, JudgeOptions
from pipeline_lib.judges.llm.judge import LLMJudgeOptions
from pipeline_lib.judges.pairrm import PairRMOptions
from pipeline_lib.judges.reward_model import RewardModelOptions
from pipeline_lib.judges.rules.judge import RulesOptions


def _known_kind(v: Any) -> Any:
    """An unknown ``kind`` fails naming the judges there are (pydantic's union error would only list tags)."""
    if not isinstance(v, (dict, JudgeOptions)):
        raise ValueError("Input should be a valid dictionary")
    if isinstance(v, dict) and v.get("kind") not in JUDGES:
        raise ValueError(f"judge.kind: unknown judge {v.get('kind')!r}; known: {', '.join(sorted(JUDGES))}")
    return v


JudgeConfig = Annotated[Union[RulesOptions, RewardModelOptions, PairRMOptions, LLMJudgeOptions],
                        Field(discriminator="kind"), BeforeValidator(_known_kind)]
