"""Typed configuration of a round: YAML file + ``key=value`` overrides, validated up front.

Every section forbids unknown keys, so a typo fails at load time with the key's dotted name, before any model is
loaded. The same pydantic models are the parameter schema of the Prefect flows (the UI's typed form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline_lib.hybrid import HybridOptions
from pipeline_lib.losses import MethodConfig, SailOptions, WpoOptions
from pipeline_lib.preference_data import PreferenceSource
from pipeline_lib.prompts.sources import BuiltinPrompts, PromptSource
from pipeline_lib.scale import ScaleConfig


class ConfigError(ValueError):
    """A bad config key or value. The message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# `prompts:` is one of the prompt sources (pipeline_lib.prompts.sources: builtin, hub, jsonl, csv, parquet), keyed
# by `source`; without `source` it is the builtin generator (PromptSetOptions: their common fields).
PromptsConfig = BuiltinPrompts  # the name callers used for the builtin source's options


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


class CollectConfig(Section):
    k: int = Field(4, ge=2, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)


class PairsConfig(Section):
    strategy: Literal["best_worst", "all_pairs", "sppo_winprob"] = "best_worst"
    min_margin: float = Field(0.0, ge=0.0, description="drop pairs whose score gap is not above this (ties always)")


class TrainConfig(Section):
    # The method switches (ARCHITECTURE: orthogonal options); validated together with pairs.strategy.
    loss: Literal["dpo", "ipo", "hinge", "sppo", "sppo_hard", "sail"] = "dpo"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo only: conservative DPO epsilon")
    weighting: Literal["none", "wpo"] = "none"
    wpo: WpoOptions = WpoOptions()
    reference: Literal["initial", "behavior"] = Field(
        "initial", description="initial: the campaign's first policy (fixed); behavior (BPO): the policy that "
                               "collected this round's data")
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    sail: SailOptions = SailOptions()
    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(5e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: use epochs")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    bf16: bool = Field(True, description="bf16 autocast (fast on CPUs with AVX512-BF16/AMX, and on GPUs)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype (bfloat16 halves memory "
                                                                         "for 7B+ policies on one GPU)")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory (large models)")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, ge=1)
    ensemble: int = Field(1, ge=1, description="BPO: train N LoRA adapters (seeds seed..seed+N-1) on the same pairs "
                                               "and average their merged weights into the next policy")
    seed: int = 0
    num_processes: int = Field(1, ge=1, description="data-parallel training processes, one per GPU (on CPU: gloo "
                                                    "processes); >1 launches the trainer with torchrun; the batch "
                                                    "per step is batch_size x grad_accum x num_processes")
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config (ZeRO-1/2, e.g. "
                                                    "configs/deepspeed/zero2.json) for the trainer; needs a GPU")
    nnodes: int = Field(1, ge=1, description="hosts training together, num_processes each (torchrun --nnodes): "
                                             "the stage's host and nnodes-1 hosts running `python -m "
                                             "pipeline_lib.train_worker join` (docs/operations.md)")
    rdzv_endpoint: str = Field("", description="HOST:PORT of the c10d rendezvous (torchrun --rdzv-endpoint) "
                                               "when nnodes > 1; HOST is reachable from every training host")

    @model_validator(mode="after")
    def _ensemble_needs_lora(self) -> "TrainConfig":
        if self.ensemble > 1 and not self.lora_r:
            raise ValueError(f"train.ensemble={self.ensemble} averages LoRA adapters: set train.lora_r > 0 "
                             "(e.g. 8)")
        if (self.nnodes > 1) != bool(self.rdzv_endpoint):
            raise ValueError(f"train.nnodes={self.nnodes} and train.rdzv_endpoint={self.rdzv_endpoint!r}: several "
                             "hosts need a rendezvous endpoint (HOST:PORT) and an endpoint needs nnodes > 1")
        return self
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps for resume (0: only at the end)")

    def content_fingerprint(self) -> str | None:
        """For task cache keys: ``deepspeed`` says where the DeepSpeed config is, this says what it is."""
        from pipeline_lib.prompts.validate import content_fingerprint

        return content_fingerprint(self.deepspeed)


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="evaluate champion and candidate (off: no promotion either)")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")


class PromotionConfig(Section):
    """When the round's candidate replaces the champion (registry alias ``champion``)."""

    enabled: bool = True
    metric: Literal["pass_rate_strict", "instruction_pass_rate", "mean_score"] = "pass_rate_strict"
    margin: float = Field(0.0, ge=0.0, description="promote only if candidate > champion + margin")


class RunConfig(Section):
    work_dir: str = "runs"
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "alignflow"
    registered_model: str = "alignflow-policy"
    quiet: bool = False
    gpu_concurrency_limit: str = Field("", description="Prefect global concurrency limit held by GPU stages "
                                                       "(collect, train, evaluate), e.g. 'gpu'; empty: none")


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
    judge: dict[str, Any] = Field(default_factory=lambda: {"kind": "rules"})
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promotion: PromotionConfig = PromotionConfig()
    scale: ScaleConfig = ScaleConfig()  # sharded stages and the engine that runs them (pipeline_lib/scale.py)
    run: RunConfig = RunConfig()

    @field_validator("judge")
    @classmethod
    def _judge_known(cls, v: dict[str, Any]) -> dict[str, Any]:
        from pipeline_lib.judges.base import parse_judge_options

        return parse_judge_options(v).model_dump()

    @model_validator(mode="after")
    def _consistent(self) -> "RoundConfig":
        self.method()  # incompatible switches fail when the config loads, naming the conflict
        if self.data.mode == "off_policy" and self.train.loss == "sppo":
            raise ValueError("train.loss=sppo needs win probabilities from a judge: not available with "
                             "data.mode=off_policy (use hybrid, or another loss)")
        return self

    def method(self) -> MethodConfig:
        t = self.train
        fields = dict(loss=t.loss, label_smoothing=t.label_smoothing, weighting=t.weighting, reference=t.reference,
                      optimizer=t.optimizer, pairs=self.pairs.strategy)
        # Pass the option sections when they apply or differ from their defaults, so a dumped-and-reloaded config
        # (Prefect deployment parameters, the UI form) validates the same as the YAML it came from.
        if t.weighting == "wpo" or t.wpo != WpoOptions():
            fields["wpo"] = t.wpo
        if t.loss == "sail" or t.sail != SailOptions():
            fields["sail"] = t.sail
        try:
            return MethodConfig(**fields)
        except ValidationError as e:
            raise ValueError("train: " + "; ".join(err["msg"].removeprefix("Value error, ")
                                                   for err in e.errors())) from None


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
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as e:
            raise ConfigError(f"{k}: cannot parse value {v!r}: {e}") from None
    return out


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = RoundConfig) -> Any:
    """Load YAML (optional), apply ``key=value`` overrides, validate. Raises ConfigError naming the bad key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(data, k, v)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
