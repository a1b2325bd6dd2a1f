"""Evaluate any model on AlpacaEval 2, MT-Bench and IFEval: ``evaluate_model("tiny:0")``,
``alignflow evaluate --model REF``.

Stages (cached, retryable Prefect tasks; one child MLflow run each under a parent run "evaluate <model>"):
benchmark data -> generate (AlpacaEval + MT-Bench turn 1 in shared vLLM calls, then turn 2) -> AlpacaEval
annotate / MT-Bench judge; IFEval generates greedily and scores with the rules judge's checkers (no LLM judge). The parent run gets the headline metrics; Prefect gets a summary table per benchmark
and the MT-Bench category chart (markdown with the PNG inline).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline_lib.artifacts import read_manifest, sha256_file, sha256_json
from pipeline_lib.evaluation import bench_config as bc
from pipeline_lib.evaluation import benchmarks as bm
from pipeline_lib.judges.base import build_judge
from pipeline_lib.lineage import RoundLineage
from tasks.bound import StageTasks
from tasks.common import RoundContext, flow_run_id
from tasks.stages import resolve_model_task

ALPACA_KEYS = ["win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "discrete_win_rate",
               "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length", "n_no_verdict"]
IFEVAL_KEYS = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose",
               "truncated_share", "mean_tokens", "n_prompts"]
MT_BENCH_KEYS = ["score", "n_valid", "n_invalid", "turn_1.score", "turn_1.n_invalid", "turn_2.score",
                 "turn_2.n_invalid"]


def _data_fingerprint(cfg: bc.EvaluateModelConfig, benchmarks: list[str]) -> str:
    """Hashes of the local data files the stages read, so an edited file misses the task cache."""
    a, m = cfg.alpaca_eval, cfg.mt_bench
    files = [a.eval_set, a.instruction_difficulty] if "alpaca_eval" in benchmarks else []
    files += [m.questions, m.reference_answers, m.judge_prompts] if "mt_bench" in benchmarks else []
    if "ifeval" in benchmarks:
        from pipeline_lib.evaluation.ifeval import resolve_source

        files.append(resolve_source(cfg.ifeval.data))
    return sha256_json({f: sha256_file(Path(f)) for f in files if f and Path(f).is_file()})


@flow(name="evaluate-model", log_prints=True)
def evaluate_model(model_ref: str, benchmarks: list[bc.Benchmark] | None = None, judge: dict[str, Any] | None = None,
                   config: bc.EvaluateModelConfig = bc.EvaluateModelConfig()) -> dict:
    """AlpacaEval 2, MT-Bench and/or IFEval for one model reference (``tiny:0``, ``models:/name@alias``, a directory, a hub
    id). ``benchmarks`` / ``judge`` default to the config's. Returns the metrics per benchmark and artifact paths."""
    from pipeline_lib.evaluation.data import use_eval_data_dir

    logger = get_run_logger()
    t0 = time.perf_counter()
    benchmarks = list(dict.fromkeys(benchmarks or config.benchmarks))
    use_eval_data_dir(config.run.eval_data_dir)  # the config's data directory, for every stage of this process
    judge = dict(judge or config.judge)
    prompts = config.mt_bench.judge_prompts or (bc.shared_mt_bench_file("judge_prompts.jsonl")
                                                 if "mt_bench" in benchmarks else None)
    # each judged benchmark's typed judge options (its protocol); bad options fail before any model
    judges = {b: bc.protocol_judge(judge, b, prompts) for b in benchmarks if b in bc.JUDGED}
    work_dir = str(Path(config.run.work_dir).resolve())
    t = StageTasks.in_work_dir(work_dir)
    lineage = RoundLineage(config.run.mlflow_tracking_uri, config.run.experiment)
    model = resolve_model_task(model_ref)
    judge_id = {b: build_judge(options).identity() for b, options in judges.items()}
    key = sha256_json({"model": model.sha256, "benchmarks": benchmarks, "judge": judge_id,
                       "config": config.model_dump(exclude={"run", "judge", "tensor_parallel_size"})})[:20]
    parent = lineage.start_round(key, f"evaluate {model.ref}", {**config.model_dump(exclude={"judge"}),
                                                               "judge": judge_id, "benchmarks": benchmarks},
                                 tags={"prefect.flow_run_id": flow_run_id(), "alignflow.model": model.ref,
                                       "alignflow.model_sha256": model.sha256, "alignflow.kind": "evaluate"})
    ctx = RoundContext.of_run(config.run, work_dir, parent)

    # each task gets only the settings it reads, so its cache key does not change with the others'
    a_cfg = config.alpaca_eval if "alpaca_eval" in benchmarks else None
    m_cfg = config.mt_bench if "mt_bench" in benchmarks else None
    i_cfg = config.ifeval if "ifeval" in benchmarks else None
    data = t.benchmark_data(a_cfg, m_cfg, _data_fingerprint(config, benchmarks), ctx, i_cfg)
    outputs = {}
    if a_cfg is not None or m_cfg is not None:
        outputs = t.benchmark_generate(model, {b: r for b, r in data.items() if b in bc.JUDGED}, config.alpaca_eval,
                        config.mt_bench, ctx, config.tensor_parallel_size)
    summary: dict[str, Any] = {"model": model.ref, "model_sha256": model.sha256, "mlflow_run_id": parent,
                               "benchmarks": {}}
    parent_metrics: dict[str, float] = {}
    if "alpaca_eval" in benchmarks:
        ann = t.alpaca_annotate(outputs["alpaca_eval"], data["alpaca_eval"], judges["alpaca_eval"],
                                config.alpaca_eval, ctx)
        m = read_manifest(ann.path)["metrics"]
        summary["benchmarks"]["alpaca_eval"] = {"metrics": m, "outputs": outputs["alpaca_eval"].path,
                                                "annotations": ann.path}
        parent_metrics.update({f"alpaca_eval.{k}": m[k] for k in ALPACA_KEYS if k in m})
        create_table_artifact(key="alpaca-eval-summary", table=bm.summary_rows({"metrics": m}, ALPACA_KEYS),
                              description=f"AlpacaEval 2 of {model.ref} ({m['n_total']} instructions)")
    if "mt_bench" in benchmarks:
        rat = t.mt_bench_judge(outputs["mt_bench"], data["mt_bench"], judges["mt_bench"], config.mt_bench, ctx)
        man = read_manifest(rat.path)
        m = man["metrics"]
        summary["benchmarks"]["mt_bench"] = {"metrics": m, "answers": outputs["mt_bench"].path, "ratings": rat.path,
                                             "chart": man["chart"]["path"]}
        parent_metrics.update({f"mt_bench.{k}": m[k] for k in MT_BENCH_KEYS if k in m})
        create_table_artifact(key="mt-bench-summary", table=_mt_bench_table(man["summary"]),
                              description=f"MT-Bench of {model.ref}: per turn and category (invalid counted)")
        png = base64.b64encode(Path(man["chart"]["path"]).read_bytes()).decode()
        create_markdown_artifact(key="mt-bench-chart", markdown=f"![MT-Bench per category](data:image/png;base64,"
                                                                 f"{png})", description="MT-Bench per category")
    if "ifeval" in benchmarks:
        ev = t.ifeval(model, data["ifeval"], config.ifeval, ctx, tensor_parallel_size=config.tensor_parallel_size)
        man = read_manifest(ev.path)
        m = man["metrics"]
        summary["benchmarks"]["ifeval"] = {"metrics": m, "by_instruction": man["by_instruction"],
                                           "responses": ev.path}
        parent_metrics.update({f"ifeval.{k}": m[k] for k in IFEVAL_KEYS if k in m})
        create_table_artifact(key="ifeval-summary", table=bm.summary_rows({"metrics": m}, IFEVAL_KEYS),
                              description=f"IFEval of {model.ref} ({m['n_prompts']} prompts, greedy, "
                                          f"<= {config.ifeval.max_tokens} new tokens)")
        create_table_artifact(key="ifeval-by-instruction",
                              table=[{"instruction": k, **v} for k, v in man["by_instruction"].items()],
                              description=f"IFEval of {model.ref}: accuracy per instruction type")
    summary["wall_s"] = time.perf_counter() - t0
    lineage.finish_round(parent, {**parent_metrics, "evaluate_wall_s": summary["wall_s"]})
    logger.info("evaluated %s: %s", model.ref, {k: v for k, v in parent_metrics.items()
                                              if "score" in k or "win" in k or k.endswith("level_strict")})
    return summary


def _mt_bench_table(s: dict) -> list[dict[str, Any]]:
    rows = [{"group": "overall", **s["overall"]}]
    rows += [{"group": f"turn {t}", **g} for t, g in s["per_turn"].items()]
    rows += [{"group": c, **g} for c, g in s["per_category"].items()]
    return rows
