"""Typed configuration of a round: YAML file + ``key=value`` overrides, validated up front.

Every section forbids unknown keys, so a typo fails at load time with the key's dotted name, before any model is
loaded. The same pydantic models are the parameter schema of the Prefect flows (the UI's typed form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline_lib.evaluation.ifeval import IFEvalOptions
from pipeline_lib.methods import PAIRINGS, PAIRS, MethodConfig, SailOptions, WpoOptions, validate_round
from pipeline_lib.prompts.sources import BuiltinPrompts, PromptSource
from pipeline_lib.scale import ScaleConfig
from pipeline_lib.stages.dataset_pairs import PreferenceSource
from pipeline_lib.stages.hybrid_pair import HybridOptions


class ConfigError(ValueError):
    """A bad config key or value. The message names the key."""


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
    import math

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
    k: int = Field(4, ge=2, le=256, description="samples per prompt (at most 256: k=10000 was accepted and sat at "
                                                "0/160000 samples with a 3 GB worker)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)


class PairsConfig(Section):
    strategy: Literal["best_worst", "all_pairs", "iid_pairs", "sppo_winprob", "sppo_all", "unlabelled"] = "best_worst"
    min_margin: float = Field(0.0, ge=0.0, description="drop pairs whose score gap is not above this (ties always)")
    winprob: Literal["authors", "pairwise"] = Field(
        "authors", description="SPPO's P(a > b) from a pairwise judge: authors = LLM-Blender's scores over all K "
                               "samples (uclaml/SPPO); pairwise = the judge's probability of each pair alone")
    unfinished: Literal["keep", "last", "drop"] = Field(
        "keep", description="samples cut at collect.max_tokens (they never ended): keep = ranked by score like the "
                            "rest; last = ranked below every finished sample of the prompt; drop = not paired")

    @model_validator(mode="after")
    def _winprob_applies(self) -> "PairsConfig":
        if self.winprob != "authors" and not PAIRINGS[self.strategy].columns:
            users = ", ".join(name for name, spec in PAIRINGS.items() if spec.columns)
            raise ValueError(f"pairs.winprob={self.winprob} applies to win-probability pairings ({users}), not "
                             f"pairs.strategy={self.strategy}")
        if self.unfinished != "keep" and not PAIRINGS[self.strategy].ranks_by_score:
            users = ", ".join(name for name in PAIRS if PAIRINGS[name].ranks_by_score)
            raise ValueError(f"pairs.unfinished={self.unfinished} applies to pairings that rank samples by the "
                             f"judge's score ({users}), not pairs.strategy={self.strategy}")
        return self


class TrainConfig(Section):
    # The method switches (ARCHITECTURE: orthogonal options); validated together with pairs.strategy.
    loss: Literal["dpo", "ipo", "hinge", "sppo", "sppo_single", "sppo_hard", "sail"] = "dpo"
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


class RoundIFEval(IFEvalOptions):
    """IFEval in a round: champion and candidate on the same IFEval prompts, compared pair by pair."""

    enabled: bool = Field(False, description="evaluate champion and candidate on IFEval too (541 prompts: ~10 min "
                                             "per model for a 135M model on 2 CPU cores)")


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="evaluate champion and candidate (off: no promotion either)")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    ifeval: RoundIFEval = RoundIFEval()
    n_resamples: int = Field(2000, ge=2000, description="paired bootstrap resamples of the prompts for the "
                                                        "confidence interval of after - before")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the paired confidence intervals")


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
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "non_finite":
            loc, msg = ".".join(p for p in (loc, err["ctx"]["path"]) if p), "must be a finite number"
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
