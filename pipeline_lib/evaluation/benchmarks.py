"""AlpacaEval 2 and MT-Bench as pipeline stages: generate with the evaluated model (vLLM, ``sample()``), judge with
the LLM judge, score with :mod:`~pipeline_lib.evaluation.alpaca_eval` / :mod:`~pipeline_lib.evaluation.mt_bench`.

Each stage writes a table artifact (``pipeline_lib.artifacts.write_table`` under ``stage.output_dir``) whose manifest
holds the stage's ``metrics``, its generation config or judge identity, and the evaluation data it read (an artifact
of its own, ``alpaca-eval-set`` / ``mt-bench-questions``, so the data is logged to MLflow with its digest).

Stages:
- :func:`generate_benchmarks`, from the evaluation data :func:`load_alpaca_set` / :func:`load_mt_bench_set` wrote:
  one greedy-or-sampled output per AlpacaEval instruction (chat template applied), and the MT-Bench answers in two
  turns, turn 2 with turn 1's question and the model's own answer in context, at FastChat's per-category
  temperature (0 = greedy).
- :func:`alpaca_annotate`: the judge's pairwise protocol, model output vs the eval set's reference ``output``;
  AlpacaEval's preference on its 1-2 scale is ``1 + P(model > reference)`` (the reference is output_1, the model
  output_2), then :func:`~pipeline_lib.evaluation.alpaca_eval.score_annotations`.
- :func:`mt_bench_judge`: single-answer grading per (question, turn), reference-guided for math, reasoning and
  coding, aggregated per turn / category / overall with invalid counts, and the per-category chart (PNG) written
  next to the artifact (``<artifact dir>.categories.png``).

Generation requests are grouped by sampling parameters, one vLLM worker call per group: :func:`generate_benchmarks`
runs AlpacaEval and MT-Bench turn 1 in the same call when their parameters agree, then turn 2.

Departures from the references:
- A pairwise reply with neither identifier among the top log-probs counts as a tie (preference 1.5; AlpacaEval: no
  verdict) because the pairwise judge returns a probability; the count is the metric ``n_no_verdict``.
- Outputs identical to the reference are a tie without a judge call (the LLM judge's ``compare_many``).
- MT-Bench samples each question once with one engine seed for the whole batch (FastChat: per-question seeding via
  ``torch.manual_seed`` of the HF generator is absent from vLLM's CPU path).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, sha256_file, write_table
from pipeline_lib.evaluation import alpaca_eval as ae
from pipeline_lib.evaluation import mt_bench as mtb
from pipeline_lib.evaluation.bench_config import GenerationConfig, protocol_judge, shared_mt_bench_file
from pipeline_lib.generation.requests import GREEDY_BELOW, SamplingKey, run_requests
from pipeline_lib.judges.base import Item, JudgeOptions, build_judge
from pipeline_lib.judges.batching import judge_in_chunks
from pipeline_lib.models import ResolvedModel
from pipeline_lib.report.progress import Progress
from pipeline_lib.stage import done, output_dir

def _table_digest(df: pd.DataFrame) -> str:
    from pipeline_lib.artifacts import sha256_json

    return sha256_json(df.to_dict(orient="records"))


def _data_artifact(df: pd.DataFrame, stage: str, name: str, source: str, selection: dict, work_dir) -> ArtifactRef:
    """The evaluation data a stage read, as its own table artifact (logged to MLflow with its digest)."""
    config = {"source": source, **selection}
    out = output_dir(work_dir, stage, {"content": _table_digest(df)}, config)
    return write_table(df, out, name=name, producer=stage, config=config)


def load_alpaca_set(eval_set_path: str | None, subset: int | None, seed: int, work_dir) -> ArtifactRef:
    df = ae.load_eval_set(eval_set_path, subset, seed)
    keep = [c for c in ("index", "instruction", "dataset", "output", "generator") if c in df.columns]
    return _data_artifact(df[keep], "alpaca-eval-set", "alpaca_eval_set", eval_set_path or f"hub:{ae.HUB_REPO}",
                          {"subset": subset, "seed": seed}, work_dir)


def load_mt_bench_set(questions_path: str | None, n_questions: int | None, work_dir,
                      question_ids: Sequence[int] | None = None, seed: int = 0) -> ArtifactRef:
    qs = mtb.load_questions(questions_path)
    where = questions_path or f"hub:{mtb.HUB_QUESTIONS}"
    if question_ids is not None:
        by_id = {q["question_id"]: q for q in qs}
        missing = [i for i in question_ids if i not in by_id]
        if missing:
            raise ValueError(f"mt_bench.question_ids: {missing} not in {where}")
        qs = [by_id[i] for i in question_ids]
    elif n_questions is not None:
        if n_questions > len(qs):
            raise ValueError(f"mt_bench.n_questions={n_questions}: {where} has {len(qs)} questions")
        qs = [qs[i] for i in np.sort(np.random.default_rng(seed).choice(len(qs), n_questions, replace=False))]
    df = pd.DataFrame([{"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
                       for q in qs])
    return _data_artifact(df, "mt-bench-questions", "mt_bench_questions", where,
                          {"n_questions": n_questions, "question_ids": list(question_ids or []) or None,
                           "seed": seed}, work_dir)


def _alpaca_key(g: GenerationConfig) -> SamplingKey:
    return SamplingKey(g.temperature, g.top_p, g.max_tokens, g.seed, g.kv_cache_gib)


def _mt_key(category: str, max_tokens: int, seed: int, kv: float) -> SamplingKey:
    return SamplingKey(mtb.sampling_temperature(category), 1.0, max_tokens, seed, kv)


def _mt_config(max_tokens: int, seed: int, kv: float) -> dict:
    return {"max_tokens": max_tokens, "seed": seed, "kv_cache_gib": kv, "top_p": 1.0,
            "temperature": dict(mtb.TEMPERATURE), "default_temperature": mtb.DEFAULT_TEMPERATURE,
            "greedy_below": GREEDY_BELOW}


def generate_benchmarks(model: ResolvedModel, work_dir, *, alpaca: tuple[ArtifactRef, GenerationConfig] | None = None,
                        mt_bench: tuple[ArtifactRef, int, int, float] | None = None,
                        quiet: bool = False, tensor_parallel_size: int = 1) -> dict[str, ArtifactRef]:
    """Outputs of ``model`` for the AlpacaEval set (``alpaca``: eval-set artifact, generation config) and/or the
    MT-Bench questions (``mt_bench``: questions artifact, max_tokens, seed, kv_cache_gib). AlpacaEval and MT-Bench
    turn 1 share the worker calls of equal sampling parameters; turn 2 follows (it needs turn 1's answers). Each
    benchmark's artifact is keyed by its own inputs and config only, so a benchmark's cached output is found again
    whether it was generated alone or together. ``tensor_parallel_size``: GPUs vLLM shards the model over (how the
    engine runs, not what is generated: not part of the keys)."""
    outs: dict[str, ArtifactRef] = {}
    plan: dict[str, Any] = {}

    def cached_or_planned(name: str, stage: str, source: ArtifactRef, source_key: str, config: dict) -> None:
        inputs = {"model": model.sha256, source_key: source.sha256}
        out = output_dir(work_dir, stage, inputs, config)
        if done(out):
            outs[name] = ref_from_dir(out)
        else:
            plan[name] = (source, read_table(source), config, inputs, out)

    if alpaca is not None:
        eval_ref, gen = alpaca
        cached_or_planned("alpaca_eval", "alpaca-generate", eval_ref, "eval_set", {"generation": gen.model_dump()})
    if mt_bench is not None:
        q_ref, max_tokens, seed, kv = mt_bench
        cached_or_planned("mt_bench", "mt-bench-generate", q_ref, "questions",
                          {"generation": _mt_config(max_tokens, seed, kv)})
    if not plan:
        return outs

    # turn 1 (and AlpacaEval) in one batch of requests, grouped by sampling parameters
    msgs, keys, owner = [], [], []
    if "alpaca_eval" in plan:
        df = plan["alpaca_eval"][1]
        for i, instr in enumerate(df["instruction"]):
            msgs.append([{"role": "user", "content": instr}]), keys.append(_alpaca_key(alpaca[1]))
            owner.append(("alpaca_eval", i))
    if "mt_bench" in plan:
        qdf = plan["mt_bench"][1]
        for i, q in enumerate(qdf.itertuples(index=False)):
            msgs.append(mtb.conversation(q._asdict(), [], 1)), keys.append(_mt_key(q.category, *mt_bench[1:]))
            owner.append(("mt_bench", i))
    t0 = time.perf_counter()
    n_turn2 = sum(len(q.turns) > 1 for q in plan["mt_bench"][1].itertuples()) if "mt_bench" in plan else 0
    progress = Progress(len(msgs) + n_turn2, "benchmarks (generate)", "responses", quiet=quiet)
    first, stats1 = run_requests(model, msgs, keys, quiet, progress, tensor_parallel_size)
    shared_calls = stats1["worker_calls"]
    results: dict[str, dict[int, dict]] = {"alpaca_eval": {}, "mt_bench": {}}
    for (bench, i), r in zip(owner, first):
        results[bench][i] = r

    if "alpaca_eval" in plan:
        eval_ref, df, config, inputs, out = plan["alpaca_eval"]
        res = [results["alpaca_eval"][i] for i in range(len(df))]
        rows = pd.DataFrame({"index": df["index"].astype(int), "instruction": df["instruction"],
                             "dataset": df.get("dataset", pd.Series([""] * len(df))),
                             "output": [r["response"] for r in res], "generator": model.ref,
                             "reference_output": df["output"],
                             "reference_generator": df.get("generator", pd.Series([""] * len(df))),
                             "n_tokens": [r["n_tokens"] for r in res],
                             "finish_reason": [r["finish_reason"] for r in res]})
        metrics = {"n_instructions": len(rows), "generated_tokens": int(rows["n_tokens"].sum()),
                   "mean_tokens": float(rows["n_tokens"].mean()),
                   "avg_length": int(rows["output"].str.len().mean()),
                   "truncated_share": float((rows["finish_reason"] == "length").mean()),
                   "worker_calls_shared": shared_calls, "generate_s": stats1["generate_s"],
                   "engine_load_s": stats1["load_s"]}
        outs["alpaca_eval"] = write_table(
            rows, out, name="alpaca_eval_outputs", producer="alpaca-generate", inputs=inputs, config=config,
            extra={"metrics": metrics, "generation": config["generation"], "model": _model_info(model),
                   "eval_set": {"path": eval_ref.path, "sha256": eval_ref.sha256, "rows": len(df)}})

    if "mt_bench" in plan:
        q_ref, qdf, config, inputs, out = plan["mt_bench"]
        answers = [[results["mt_bench"][i]] for i in range(len(qdf))]
        msgs, keys, where = [], [], []
        for i, q in enumerate(qdf.itertuples(index=False)):
            if len(q.turns) > 1:
                msgs.append(mtb.conversation(q._asdict(), [answers[i][0]["response"]], 2))
                keys.append(_mt_key(q.category, *mt_bench[1:]))
                where.append(i)
        stats2 = {"worker_calls": 0, "load_s": 0.0, "generate_s": 0.0, "generated_tokens": 0}
        if msgs:
            second, stats2 = run_requests(model, msgs, keys, quiet, progress, tensor_parallel_size)
            for i, r in zip(where, second):
                answers[i].append(r)
        rows = pd.DataFrame({"question_id": qdf["question_id"], "category": qdf["category"],
                             "turns": [list(t) for t in qdf["turns"]],
                             "answers": [[a["response"] for a in ans] for ans in answers],
                             "n_tokens": [[a["n_tokens"] for a in ans] for ans in answers],
                             "finish_reason": [[a["finish_reason"] for a in ans] for ans in answers],
                             "temperature": [mtb.sampling_temperature(c) for c in qdf["category"]],
                             "generator": model.ref})
        n_tok = [t for ts in rows["n_tokens"] for t in ts]
        metrics = {"n_questions": len(rows), "n_answers": len(n_tok), "generated_tokens": int(sum(n_tok)),
                   "mean_tokens": float(np.mean(n_tok)), "worker_calls_shared": shared_calls,
                   "worker_calls_turn2": stats2["worker_calls"], "generate_s": stats1["generate_s"]
                   + stats2["generate_s"], "engine_load_s": stats1["load_s"] + stats2["load_s"]}
        outs["mt_bench"] = write_table(
            rows, out, name="mt_bench_answers", producer="mt-bench-generate", inputs=inputs, config=config,
            extra={"metrics": metrics, "generation": config["generation"], "model": _model_info(model),
                   "questions": {"path": q_ref.path, "sha256": q_ref.sha256, "rows": len(qdf)},
                   "wall_s": time.perf_counter() - t0})
    progress.close()
    return outs


def _model_info(model: ResolvedModel) -> dict:
    return {"ref": model.ref, "path": model.path, "sha256": model.sha256}


# -- judging --------------------------------------------------------------------------------------------------------
def alpaca_annotate(outputs_ref: ArtifactRef, judge_cfg: JudgeOptions | Mapping[str, Any], work_dir,
                    instruction_difficulty: str | None = None, quiet: bool = False) -> ArtifactRef:
    """The judge's pairwise verdicts, model output vs reference, on AlpacaEval's scale (preference = 1 + P(model >
    reference)), and the leaderboard metrics (win rate, LC win rate, ...) in the manifest. ``judge_cfg``: the
    judge's options for the ``alpaca_eval`` protocol (``bench_config.protocol_judge``), or the evaluation's judge
    config, from which they are derived here."""
    if not isinstance(judge_cfg, JudgeOptions):
        judge_cfg = protocol_judge(judge_cfg, "alpaca_eval")
    judge = build_judge(judge_cfg)
    gamma_src = instruction_difficulty or f"hub:{ae.HUB_REPO}/{ae.DIFFICULTY_FILE}"
    gamma_sha = sha256_file(Path(instruction_difficulty)) if instruction_difficulty else gamma_src
    try:
        identity = judge.identity()
        config = {"judge": identity}
        inputs = {"outputs": outputs_ref.sha256, "instruction_difficulty": gamma_sha}
        out = output_dir(work_dir, "alpaca-annotate", inputs, config)
        if done(out):
            return ref_from_dir(out)
        df = read_table(outputs_ref)
        triples = [(r.instruction, r.output, r.reference_output) for r in df.itertuples(index=False)]
        # the pairwise LLM judge sends a slice's requests at once; other judges compare one pair at a time
        compare = getattr(judge, "compare_many", None) or (lambda ts: [judge.compare(*t) for t in ts])
        with Progress(len(triples), "alpaca_eval (judge)", "outputs", quiet=quiet) as progress:
            p_model = judge_in_chunks(compare, triples, progress)
        no_verdict = int(getattr(judge, "no_verdict", 0))
    finally:
        judge.close()
    table = pd.DataFrame({"index": df["index"].astype(int), "instruction": df["instruction"],
                          "output_1": df["reference_output"], "output_2": df["output"],
                          "generator_1": df["reference_generator"], "generator_2": df["generator"],
                          "p_model_better": p_model, "preference": 1.0 + p_model,
                          "len_1": df["reference_output"].str.len(), "len_2": df["output"].str.len()})
    gamma = ae.load_instruction_difficulty(instruction_difficulty)
    scores = ae.score_annotations(table, gamma)
    glm = scores.pop("glm")
    metrics = {**scores, "n_no_verdict": no_verdict}
    return write_table(table, out, name="alpaca_eval_annotations", producer="alpaca-annotate", inputs=inputs,
                       config=config, extra={"metrics": metrics, "glm": glm, "judge": identity,
                                             "instruction_difficulty": {"source": gamma_src, "sha256": gamma_sha}})


def mt_bench_judge(answers_ref: ArtifactRef, judge_cfg: JudgeOptions | Mapping[str, Any],
                   reference_answers_path: str | None, judge_prompts_path: str | None, work_dir,
                   quiet: bool = False) -> ArtifactRef:
    """Single-answer ratings per (question, turn), aggregated per turn / category / overall (invalid ratings
    counted), with the per-category chart next to the artifact. ``judge_cfg``: the judge's options for the
    ``mt_bench`` protocol (with its judge-prompts file), or the evaluation's judge config, from which they are
    derived here with ``judge_prompts_path`` (default: the shared copy)."""
    ref_path = reference_answers_path or shared_mt_bench_file("reference_answer_gpt-4.jsonl")
    if not isinstance(judge_cfg, JudgeOptions):
        prompts_path = judge_prompts_path or shared_mt_bench_file("judge_prompts.jsonl")
        judge_cfg = protocol_judge(judge_cfg, "mt_bench", prompts_path)
    references = mtb.load_reference_answers(ref_path)
    judge = build_judge(judge_cfg)
    try:
        identity = judge.identity()
        config = {"judge": identity}
        inputs = {"answers": answers_ref.sha256, "reference_answers": sha256_file(Path(ref_path))}
        out = output_dir(work_dir, "mt-bench-judge", inputs, config)
        if done(out):
            return ref_from_dir(out)
        df = read_table(answers_ref)
        items, rows = [], []
        for q in df.itertuples(index=False):
            turns, answers = list(q.turns), list(q.answers)
            guided = q.category in mtb.REFERENCE_CATEGORIES
            for t in range(1, len(answers) + 1):
                meta = {"question_id": q.question_id, "category": q.category, "turns": turns[:t],
                        "answers": answers[:t], "turn": t}
                if guided:
                    meta["reference"] = references.get(q.question_id)
                items.append(Item(turns[t - 1], answers[t - 1], meta))
                rows.append({"question_id": q.question_id, "category": q.category, "turn": t,
                             "template": mtb.judge_template_name(q.category, t), "reference_guided": guided})
        with Progress(len(items), "mt_bench (judge)", "answers", quiet=quiet) as progress:
            ratings = judge_in_chunks(judge.score, items, progress)
    finally:
        judge.close()
    table = pd.DataFrame(rows).assign(rating=ratings)
    summary = mtb.aggregate(table)
    chart = mtb.category_chart(summary, chart_path(out), title=f"MT-Bench: {df['generator'].iloc[0]}")
    return write_table(table, out, name="mt_bench_ratings", producer="mt-bench-judge", inputs=inputs, config=config,
                       extra={"metrics": mt_bench_metrics(summary), "summary": summary, "judge": identity,
                              "chart": {"path": str(chart), "sha256": sha256_file(chart)},
                              "reference_answers": {"path": ref_path, "sha256": inputs["reference_answers"]}})


def chart_path(artifact_dir: str | Path) -> Path:
    """Where the per-category chart of an MT-Bench judge artifact lives: beside it, not inside (a table artifact's
    directory holds its table and manifest only)."""
    d = Path(artifact_dir)
    return d.parent / f"{d.name}.categories.png"


def mt_bench_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric names for the MT-Bench summary: ``score`` / ``n_valid`` / ``n_invalid`` overall, ``turn_<t>.*``
    and ``category.<name>.*``."""
    out = {k: v for k, v in summary["overall"].items()}
    for t, g in summary["per_turn"].items():
        out.update({f"turn_{t}.{k}": v for k, v in g.items()})
    for c, g in summary["per_category"].items():
        out.update({f"category.{c}.{k}": v for k, v in g.items()})
    return out


def summary_rows(manifest: Mapping[str, Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    """``[{metric, value}]`` of a stage manifest's metrics, for the Prefect table artifact."""
    m = manifest.get("metrics", {})
    return [{"metric": k, "value": m[k]} for k in keys if k in m]
