"""What an AlpacaEval 2 / MT-Bench / IFEval evaluation is asked to do: the typed config (``alignflow evaluate --config``, the
Prefect UI's form for ``evaluate_model``) and the per-benchmark judge options."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from pipeline_lib.evaluation import mt_bench as mtb
from pipeline_lib.evaluation.ifeval import IFEvalOptions
from pipeline_lib.judges.base import JudgeOptions, parse_judge_options
from pipeline_lib.sections import RunConfig, Section

BENCHMARKS = ("alpaca_eval", "mt_bench", "ifeval")
Benchmark = Literal["alpaca_eval", "mt_bench", "ifeval"]
JUDGED = ("alpaca_eval", "mt_bench")  # the benchmarks that need an LLM judge (IFEval's checkers are rules)


class GenerationConfig(Section):
    """AlpacaEval generation of the evaluated model (AlpacaEval's model configs: ``temperature``, ``top_p``,
    ``max_new_tokens``; 0 = greedy)."""

    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)
    seed: int = 0
    kv_cache_gib: float = Field(1.0, gt=0)


class AlpacaEvalConfig(Section):
    eval_set: str | None = Field(None, description="local JSON/JSONL/CSV of the 805 instructions with reference "
                                                   "outputs; empty: the hub's tatsu-lab/alpaca_eval")
    subset: int | None = Field(None, ge=1, description="a seeded random sample of this many instructions")
    subset_seed: int = 0
    instruction_difficulty: str | None = Field(None, description="CSV of per-instruction difficulty for the LC "
                                                                 "win rate; empty: the hub's file")
    generation: GenerationConfig = GenerationConfig()


class MTBenchConfig(Section):
    questions: str | None = Field(None, description="FastChat question.jsonl; empty: the hub's lighteval/mt-bench")
    n_questions: int | None = Field(None, ge=1, description="a seeded random sample of this many questions")
    question_ids: list[int] | None = Field(None, description="exactly these questions (instead of n_questions)")
    subset_seed: int = 0
    reference_answers: str | None = Field(None, description="reference_answer/gpt-4.jsonl; empty: the shared copy")
    judge_prompts: str | None = Field(None, description="judge_prompts.jsonl; empty: the shared copy")
    max_tokens: int = Field(mtb.MAX_NEW_TOKENS, ge=1)
    seed: int = 0
    kv_cache_gib: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one_selection(self) -> "MTBenchConfig":
        if self.n_questions is not None and self.question_ids is not None:
            raise ValueError("mt_bench: set n_questions or question_ids, not both")
        return self


class EvaluateModelConfig(Section):
    """Parameters of ``evaluate_model`` (the Prefect UI's typed form) and of ``alignflow evaluate --config``."""

    name: str = "evaluate"
    benchmarks: list[Benchmark] = Field(default_factory=lambda: list(JUDGED))
    judge: dict[str, Any] = Field(default_factory=dict, description="the LLM judge (kind: llm); the protocol is "
                                                                    "set per benchmark")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs vLLM shards the evaluated model over (as the "
                                                           "round's collect.tensor_parallel_size; gpu_count >= it)")
    alpaca_eval: AlpacaEvalConfig = AlpacaEvalConfig()
    mt_bench: MTBenchConfig = MTBenchConfig()
    ifeval: IFEvalOptions = IFEvalOptions()
    run: RunConfig = RunConfig(experiment="alignflow-evaluate")

    @field_validator("judge")
    @classmethod
    def _judge_known(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            judge_options(v, "alpaca_eval")
        return v


def judge_options(judge_cfg: Mapping[str, Any], protocol: str, judge_prompts: str | None = None) -> dict[str, Any]:
    """The judge config for one benchmark's protocol: ``alpaca_eval`` (pairwise) or ``mt_bench`` (ratings, with the
    judge-prompts file); options of the other protocol are dropped. ValueError naming the key when it is no llm
    judge or its options are invalid."""
    if not judge_cfg:
        raise ValueError("judge: required (an LLM judge: kind: llm, model, base_url or backend: vllm)")
    if judge_cfg.get("kind") != "llm":
        raise ValueError(f"judge.kind: {judge_cfg.get('kind')!r}; AlpacaEval and MT-Bench need kind 'llm'")
    cfg = {k: v for k, v in judge_cfg.items() if k not in ("protocol", "judge_prompts")}
    cfg["protocol"] = protocol
    if protocol == "mt_bench":
        cfg = {k: v for k, v in cfg.items() if k not in ("swap_consistency", "template", "top_logprobs")}
        cfg["judge_prompts"] = judge_prompts
    parse_judge_options(cfg)  # validates, naming the bad key
    return cfg


def protocol_judge(judge_cfg: Mapping[str, Any], protocol: str, judge_prompts: str | None = None) -> JudgeOptions:
    """``judge_options`` parsed: the typed options a benchmark stage builds its judge from."""
    return parse_judge_options(judge_options(judge_cfg, protocol, judge_prompts))


def shared_mt_bench_file(name: str) -> str:
    """A file of the evaluation data directory's ``mt_bench/`` (lookup: pipeline_lib/evaluation/data.py)."""
    from pipeline_lib.evaluation.data import eval_data_dir

    return str(eval_data_dir() / "mt_bench" / name)
