"""``alignflow evaluate --model REF [--benchmarks alpaca_eval mt_bench ifeval] [--config FILE] [key=value ...]``:
AlpacaEval 2, MT-Bench and IFEval for any model reference, as the Prefect flow ``evaluate-model`` (MLflow parent run
"evaluate <model>")."""

from __future__ import annotations

import argparse
import json
import math
import os

from pipeline_lib.console import add_output_options, command_output, stdout
from pipeline_lib.evaluation.bench_config import BENCHMARKS, JUDGED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="AlpacaEval 2, MT-Bench and IFEval for a model",
                       description="Evaluate a model (tiny:<seed>, models:/name@alias, a directory, a hub id) on "
                                   "AlpacaEval 2 and MT-Bench with an LLM judge, and on IFEval (verifiable "
                                   "instructions, no judge); results in MLflow and Prefect.")
    p.add_argument("--model", "-m", required=True, help="model reference")
    p.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, help="default: the config's (alpaca_eval mt_bench)")
    p.add_argument("--config", "-c", help="YAML (see configs/evaluate_smoke.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. alpaca_eval.subset=20 judge.base_url=...")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_output_options(p)
    p.set_defaults(func=evaluate_command)


def format_summary(summary: dict) -> str:
    lines = [f"model {summary['model']} ({summary['model_sha256'][:12]}), MLflow run {summary['mlflow_run_id']}"]
    a = summary["benchmarks"].get("alpaca_eval")
    if a:
        m = a["metrics"]
        lines.append(f"AlpacaEval 2: LC win rate {m['length_controlled_winrate']:.2f}, win rate {m['win_rate']:.2f} "
                     f"(SE {_f(m['standard_error'])}), {m['n_total']} instructions, avg length {m['avg_length']}")
    t = summary["benchmarks"].get("mt_bench")
    if t:
        m = t["metrics"]
        turns = ", ".join(f"turn {k.split('_')[1].split('.')[0]} {_f(v)}" for k, v in m.items()
                          if k.startswith("turn_") and k.endswith(".score"))
        lines.append(f"MT-Bench: {_f(m['score'])} ({turns}); {m['n_invalid']} invalid rating(s); chart {t['chart']}")
    i = summary["benchmarks"].get("ifeval")
    if i:
        from pipeline_lib.evaluation.ifeval import format_by_instruction

        m = i["metrics"]
        lines.append(f"IFEval ({m['n_prompts']} prompts): prompt-level strict {m['prompt_level_strict']:.4f}, "
                     f"instruction-level strict {m['instruction_level_strict']:.4f}, prompt-level loose "
                     f"{m['prompt_level_loose']:.4f}, instruction-level loose {m['instruction_level_loose']:.4f}; "
                     f"{m['truncated_share']:.1%} of responses cut at the token limit")
        lines.append(format_by_instruction(i["by_instruction"]))
    return "\n".join(lines)


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def evaluate_command(args) -> int:
    from pipeline_lib.config import load_config
    from pipeline_lib.evaluation.bench_config import EvaluateModelConfig

    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else [])
    cfg = load_config(args.config, overrides, model=EvaluateModelConfig)
    if not cfg.judge and any(b in JUDGED for b in (args.benchmarks or cfg.benchmarks)):
        from pipeline_lib.errors import UserError

        raise UserError("no judge configured", "set judge.kind=llm judge.model=... judge.base_url=... (or a config)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.run.mlflow_tracking_uri)
    if not args.model.startswith("models:/"):
        from pipeline_lib.models import resolve

        resolve(args.model)  # pre-flight: a missing model fails here, in one line, before Prefect starts
    with command_output(args, cfg.run.work_dir, "evaluate"):
        from flows.evaluate import evaluate_model

        summary = evaluate_model(args.model, benchmarks=args.benchmarks, config=cfg)
        print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary), file=stdout())
    return 0
