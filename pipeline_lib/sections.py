"""What every config section shares: the ``Section`` base (unknown keys and non-finite numbers are errors), and
``RunConfig``, the ``run:`` section every flow's config has (where it runs and logs).

Each stage owns its section (``pipeline_lib/stages/<stage>.py``); ``config.py`` assembles them into ``RoundConfig``;
``evaluation/bench_config.py`` into ``EvaluateModelConfig``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    # allow_inf_nan=False: `gt=0` lets infinity through, and train.learning_rate=.inf trained a NaN model that was
    # then registered (issue 22). Floats in nested option models and in free-form sections (judge) are checked by
    # _finite below.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        bad = _non_finite(v)
        if bad is not None:  # format_validation_error appends the path to the field's location
            raise PydanticCustomError("non_finite", "{path} must be a finite number", {"path": bad})
        return v


def _non_finite(v: Any, path: str = "") -> str | None:
    """The dotted path (relative to ``v``) of the first non-finite float inside ``v``, else None. Nested sections
    check themselves."""
    if isinstance(v, float):
        return path if not math.isfinite(v) else None
    if isinstance(v, Section):
        return None
    if isinstance(v, BaseModel):
        v = {k: getattr(v, k) for k in type(v).model_fields}
    if isinstance(v, dict):
        items = v.items()
    elif isinstance(v, (list, tuple)):
        items = ((str(i), x) for i, x in enumerate(v))
    else:
        return None
    for k, x in items:
        bad = _non_finite(x, f"{path}.{k}" if path else str(k))
        if bad is not None:
            return bad
    return None


class RunConfig(Section):
    work_dir: str = "runs"
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "alignflow"
    registered_model: str = "alignflow-policy"
    quiet: bool = False
    gpu_concurrency_limit: str = Field("", description="Prefect global concurrency limit held by GPU stages "
                                                       "(collect, train, evaluate), e.g. 'gpu'; empty: none")
    eval_data_dir: str = Field("", description="evaluation data directory (alpaca_eval/, mt_bench/, ifeval/); "
                                               "empty: ALIGNFLOW_EVAL_DATA, the HF cache, the development copy")
