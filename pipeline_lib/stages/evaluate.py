"""The evaluate stage on held-out verifiable prompts: greedy responses from a model (``run``; a sharded evaluation
generates in shards with ``generate`` and judges the merged responses with ``run``), then

- ``pass_rate_strict``: share of prompts whose every instruction is followed (IFEval prompt-level strict accuracy);
- ``instruction_pass_rate``: share of all instructions followed (IFEval instruction-level strict accuracy);
- ``mean_score``: the configured judge's mean score; ``mean_tokens`` / ``mean_chars``: response length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pydantic import Field

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, ref_from_dir, write_table
from pipeline_lib.evaluation.ifeval import IFEvalOptions
from pipeline_lib.generation.sampling import SamplingSpec, render_chat, sample
from pipeline_lib.judges.base import JudgeOptions, build_judge
from pipeline_lib.judges.batching import items_from_rows, judge_in_chunks
from pipeline_lib.models import ResolvedModel
from pipeline_lib.report.progress import Progress
from pipeline_lib.sections import Section
from pipeline_lib.stage import done, output_dir

METRICS = ["pass_rate_strict", "instruction_pass_rate", "mean_score", "mean_tokens", "mean_chars"]


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


def follows_strict(df) -> list[list[bool]]:
    """Per row, IFEval strict verdicts of its instructions."""
    from pipeline_lib.judges.rules import follow_list

    return [follow_list(r.prompt, r.response, list(r.instruction_id_list), json.loads(r.kwargs), loose=False)
            for r in df.itertuples(index=False)]


def heldout_metrics(df) -> dict[str, float]:
    follows = follows_strict(df)
    per_prompt = [all(f) for f in follows]
    flat = [x for f in follows for x in f]
    return {
        "pass_rate_strict": float(np.mean(per_prompt)) if per_prompt else float("nan"),
        "instruction_pass_rate": float(np.mean(flat)) if flat else float("nan"),
        "mean_score": float(df["score"].mean()),
        "mean_tokens": float(df["n_tokens"].mean()),
        "mean_chars": float(df["response"].str.len().mean()),
        "n_prompts": len(df),
    }


def _generate(model: ResolvedModel, df, cfg: EvaluateConfig, seed: int, kv_cache_gib: float, quiet: bool,
              tensor_parallel_size: int):
    """One response per prompt row of ``df`` (in its order) and the worker's stats."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    _, ids = render_chat(tok, [[{"role": "user", "content": p}] for p in df["prompt"]])
    spec = SamplingSpec(n=1, temperature=cfg.temperature, top_p=1.0, max_tokens=cfg.max_tokens, seed=seed,
                        kv_cache_gib=kv_cache_gib, tensor_parallel_size=tensor_parallel_size, quiet=quiet)
    with Progress(len(ids), "evaluate (generate)", "responses", quiet=quiet) as progress:
        gen, stats = sample(model.path, ids, spec, progress)
    return gen.sort_values("prompt_index").reset_index(drop=True), stats


def generate(model: ResolvedModel, prompts: ArtifactRef, cfg: EvaluateConfig, work_dir: str | Path,
                     seed: int = 0, kv_cache_gib: float = 1.0, quiet: bool = False,
                     tensor_parallel_size: int = 1) -> ArtifactRef:
    """The generation half of the evaluation as a stage of its own (one shard of a sharded evaluation): the prompt
    rows with ``prompt_index``, ``response``, ``n_tokens``, ``finish_reason``; the worker's stats as metrics."""
    config = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": seed}
    inputs = {"model": model.sha256, "prompts": prompts.sha256}
    out = output_dir(work_dir, "heldout-generate", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df = read_table(prompts).reset_index(drop=True)
    gen, stats = _generate(model, df, cfg, seed, kv_cache_gib, quiet, tensor_parallel_size)
    df = df.assign(prompt_index=range(len(df)), response=gen["response"], n_tokens=gen["n_tokens"],
                   finish_reason=gen["finish_reason"])
    return write_table(df, out, name="responses", producer="heldout-generate", inputs=inputs, config=config,
                       extra={"metrics": stats})


def run(model: ResolvedModel, prompts: ArtifactRef, judge_cfg: JudgeOptions | Mapping[str, Any],
        cfg: EvaluateConfig, work_dir: str | Path, seed: int = 0, kv_cache_gib: float = 1.0, quiet: bool = False,
        tensor_parallel_size: int = 1, responses: ArtifactRef | None = None) -> ArtifactRef:
    """The evaluation table of ``model`` on the held-out ``prompts`` (responses, judge scores, IFEval verdicts),
    the metrics in its manifest. ``tensor_parallel_size``: GPUs vLLM shards the model over (a round passes
    ``collect.tensor_parallel_size``: a policy that needs K GPUs to sample needs them to be evaluated). Like
    ``kv_cache_gib`` it says how the engine runs, not what is evaluated, so it is not part of the artifact's key.
    ``responses``: the model's responses to ``prompts`` generated already (a sharded evaluation's merged
    ``generate`` shards), judged instead of sampling; they are an input of the artifact."""
    judge = build_judge(judge_cfg)
    config = {**cfg.model_dump(), "judge": judge.identity(), "seed": seed}
    inputs = {"model": model.sha256, "prompts": prompts.sha256}
    if responses is not None:
        inputs["responses"] = responses.sha256
    out = output_dir(work_dir, "evaluate", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df = read_table(prompts)
    if responses is None:
        gen, stats = _generate(model, df, cfg, seed, kv_cache_gib, quiet, tensor_parallel_size)
    else:
        gen, stats = read_table(responses).sort_values("prompt_index").reset_index(drop=True), \
            read_manifest(responses.path)["metrics"]
        if len(gen) != len(df) or list(gen["prompt_id"]) != list(df["prompt_id"]):
            raise ValueError(f"responses {responses.path} do not answer the prompts {prompts.path} row for row")
    df = df.reset_index(drop=True).assign(response=gen["response"], n_tokens=gen["n_tokens"])
    try:
        with Progress(len(df), "evaluate (judge)", "responses", quiet=quiet) as progress:
            df["score"] = judge_in_chunks(judge.score, items_from_rows(df), progress, group=lambda it: it.prompt)
    finally:
        judge.close()
    metrics = {**heldout_metrics(df), "tokens_per_s": stats["generated_tokens"] / max(stats["generate_s"], 1e-9),
               "truncated_share": float((gen["finish_reason"] == "length").mean())}
    df["follow_strict"] = follows_strict(df)  # per prompt, for paired comparisons of two models (paired_heldout)
    return write_table(df, out, name="evaluation", producer="evaluate", inputs=inputs, config=config,
                       extra={"metrics": metrics, "model": {"ref": model.ref, "sha256": model.sha256}})


# The held-out metrics a promotion can compare, and how: (per-prompt numerator, denominator or None, binary).
PAIRED = {
    "pass_rate_strict": (lambda d: np.array([all(f) for f in d["follow_strict"]], dtype=int), None, True),
    "instruction_pass_rate": (lambda d: np.array([sum(f) for f in d["follow_strict"]]),
                              lambda d: np.array([len(f) for f in d["follow_strict"]]), False),
    "mean_score": (lambda d: d["score"].to_numpy(dtype=float), None, False),
}


def paired_heldout(before, after, n_resamples: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, dict]:
    """Champion (``before``) and candidate (``after``) evaluation tables on the same held-out prompts (matched by
    ``prompt_id``): each of :data:`PAIRED` with its paired bootstrap CI, pass rates with the exact McNemar test."""
    from pipeline_lib.evaluation.paired import compare

    a = after.set_index("prompt_id")
    if set(a.index) != set(before["prompt_id"]):
        raise ValueError("paired held-out comparison: the two evaluations hold different prompts")
    a = a.loc[before["prompt_id"]].reset_index()
    out = {}
    for metric, (num, den, binary) in PAIRED.items():
        out[metric] = compare(metric, num(before), num(a), den(before) if den else None, binary=binary,
                              n_resamples=n_resamples, seed=seed, confidence=confidence).as_dict()
    return out
