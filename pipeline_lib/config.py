"""Typed configuration of a round: YAML file + ``key=value`` overrides, validated up front.

Each stage owns its section (``pipeline_lib/stages/<stage>.py``: ``collect``, ``pairs``, ``train``, ``evaluate``,
the prompt and preference-data sources); this module assembles them into ``RoundConfig``, checks what spans sections
(the method table: ``methods.py``), and loads YAML with overrides. Every section forbids unknown keys, so a typo
fails at load time with the key's dotted name, before any model is loaded. The same pydantic models are the
parameter schema of the Prefect flows (the UI's typed form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline_lib.errors import ConfigError  # noqa: F401  (raised by load_config; imported from here by callers)
from pipeline_lib.judges.base import JUDGES
from pipeline_lib.judges.config import JudgeConfig
from pipeline_lib.judges.rules.judge import RulesOptions
from pipeline_lib.methods import MethodConfig, SailOptions, WpoOptions, validate_round
from pipeline_lib.promotion import PromotionConfig
from pipeline_lib.prompts.sources import BuiltinPrompts, PromptSource
from pipeline_lib.scale import ScaleConfig
from pipeline_lib.sections import RunConfig, Section
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.dataset_pairs import PreferenceSource
from pipeline_lib.stages.evaluate import EvaluateConfig
from pipeline_lib.stages.hybrid_pair import HybridOptions
from pipeline_lib.stages.pair import PairsConfig
from pipeline_lib.stages.train import TrainConfig


class DataConfig(Section):
    """Where the round's preference pairs come from (docs/data_sources.md)."""

    mode: Literal["on_policy", "off_policy", "hybrid"] = Field(
        "on_policy", description="on_policy: collect -> annotate -> pair; off_policy: the dataset's pairs as they "
                                "are (no collection); hybrid (WPO HB): dataset responses + K samples judged together")
    preference_data: PreferenceSource | None = Field(None, description="the preference dataset (off_policy, hybrid)")
    hybrid: HybridOptions = HybridOptions()

    @model_validator(mode="after")
    def _dataset_when_needed(self) -> "DataConfig":
        if self.mode != "on_policy" and self.preference_data is None:
            raise ValueError(f"data.mode={self.mode} needs data.preference_data (e.g. {{source: jsonl, path: ...}})")
        return self


class RoundConfig(Section):
    name: str = "round"
    policy: str = Field("embedded:smollm2-135m-instruct", description="model reference (see pipeline_lib.models)")
    initial_policy: str | None = Field(None, description="the campaign's first policy: the fixed reference of "
                                                          "train.reference=initial (default: this round's policy)")
    follow_champion: bool = Field(False, description="sample from the registry's champion when one exists "
                                                     "(scheduled rounds); else from `policy`")
    prompts: PromptSource = BuiltinPrompts()
    data: DataConfig = DataConfig()
    collect: CollectConfig = CollectConfig()
    judge: JudgeConfig = RulesOptions()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promotion: PromotionConfig = PromotionConfig()
    scale: ScaleConfig = ScaleConfig()  # sharded stages and the engine that runs them (pipeline_lib/scale.py)
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RoundConfig":
        # incompatible switches fail when the config loads, naming the conflict (rules: pipeline_lib/methods.py);
        # the round's context first, so a data-mode conflict is named before a pairing one
        validate_round(MethodConfig.model_construct(**self._method_fields()), data_mode=self.data.mode,
                       k=self.collect.k, batch_size=self.train.batch_size, min_margin=self.pairs.min_margin,
                       unfinished=self.pairs.unfinished)
        self.method()
        if self.promotion.metric.startswith("ifeval.") and not self.evaluate.ifeval.enabled:
            raise ValueError(f"promotion.metric={self.promotion.metric} needs evaluate.ifeval.enabled=true")
        return self

    def _method_fields(self) -> dict[str, Any]:
        t = self.train
        fields = dict(loss=t.loss, label_smoothing=t.label_smoothing, weighting=t.weighting, reference=t.reference,
                      optimizer=t.optimizer, pairs=self.pairs.strategy)
        # Pass the option sections when they apply or differ from their defaults, so a dumped-and-reloaded config
        # (Prefect deployment parameters, the UI form) validates the same as the YAML it came from.
        if t.weighting == "wpo" or t.wpo != WpoOptions():
            fields["wpo"] = t.wpo
        if t.loss == "sail" or t.sail != SailOptions():
            fields["sail"] = t.sail
        return fields

    def method(self) -> MethodConfig:
        try:
            return MethodConfig(**self._method_fields())
        except ValidationError as e:  # the rules' messages name the config keys (train.loss, pairs.strategy, …)
            raise ValueError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k!r} is a value, not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. train.beta=0.2)")
        k, v = o.split("=", 1)
        if not all(part.strip() for part in k.split(".")):
            raise ConfigError(f"override {o!r}: the key before '=' is empty or has an empty part (e.g. train.beta=0.2)")
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as e:
            raise ConfigError(f"{k}: cannot parse value {v!r}: {e}") from None
    return out


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in _config_location(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "non_finite":
            loc, msg = ".".join(p for p in (loc, err["ctx"]["path"]) if p), "must be a finite number"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _config_location(loc: tuple) -> tuple:
    """The config keys of an error's location: the judge union's tag (``judge.llm.model``) is not a key."""
    if len(loc) > 1 and loc[0] == "judge" and loc[1] in JUDGES:
        return (loc[0], *loc[2:])
    return loc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = RoundConfig) -> Any:
    """Load YAML (optional), apply ``key=value`` overrides, validate. Raises ConfigError naming the bad key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); expected a YAML recipe") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:  # an empty file silently ran the whole default recipe (issue 22)
            raise ConfigError(f"{p}: the config file is empty (no sections); to run the defaults, omit the sections "
                              "you do not change, not the whole file")
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(data, k, v)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
