"""``alignflow alpaca-eval score`` and ``alignflow mt-bench score``: benchmark metrics from a judge's output files.

``alpaca-eval score --annotations FILE --instruction-difficulty FILE [--json]``: AlpacaEval 2 leaderboard metrics
(win rate, standard error, counts, discrete win rate, average length, length-controlled win rate) for one model's
annotations against the reference (CSV, CSV.gz, JSON or JSONL with ``index``, ``preference`` and ``len_1``/``len_2``
or ``output_1``/``output_2``).

``mt-bench score --ratings FILE [--questions FILE] [--model NAME] [--chart PNG] [--json]``: MT-Bench scores per
turn, per category and overall from a table of ratings (``category``, ``turn``, ``rating``); FastChat's judgment
JSONL (``question_id``, ``turn``, ``score``, ``model``) works with ``--questions`` supplying the categories.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pandas as pd


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alpaca-eval", help="AlpacaEval 2 metrics from judge annotations",
                       description="AlpacaEval 2 metrics (win rate, length-controlled win rate) from annotations.")
    inner = p.add_subparsers(dest="alpaca_eval_command", metavar="SUBCOMMAND", required=True)
    s = inner.add_parser("score", help="score one model's annotations against the reference",
                         description="Leaderboard metrics for one model's annotations against the reference.")
    s.add_argument("--annotations", "-a", required=True,
                   help="CSV / CSV.gz / JSON / JSONL: index, preference, len_1/len_2 or output_1/output_2")
    s.add_argument("--instruction-difficulty", required=True,
                   help="CSV: index, instruction_difficulty (the hub's instruction_difficulty.csv or an estimate)")
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    s.set_defaults(func=alpaca_score_command)

    p = sub.add_parser("mt-bench", help="MT-Bench scores from judge ratings",
                       description="MT-Bench scores per turn, per category and overall from judge ratings.")
    inner = p.add_subparsers(dest="mt_bench_command", metavar="SUBCOMMAND", required=True)
    s = inner.add_parser("score", help="aggregate one model's ratings",
                         description="Aggregate one model's single-answer ratings (invalid ratings counted).")
    s.add_argument("--ratings", "-r", required=True,
                   help="JSONL / CSV / JSON: category, turn, rating (or FastChat's question_id, turn, score)")
    s.add_argument("--questions", help="question.jsonl, to look up categories by question_id")
    s.add_argument("--model", help="keep only this model's rows (files holding several models)")
    s.add_argument("--chart", help="write a per-category bar chart (PNG) here")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.set_defaults(func=mt_bench_score_command)


def _jsonable(x: Any) -> Any:
    """NaN (a group with no valid value) becomes null: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def alpaca_score_command(args) -> int:
    from pipeline_lib.errors import UserError
    from pipeline_lib.evaluation.alpaca_eval import load_instruction_difficulty, score_annotations

    try:
        gamma = load_instruction_difficulty(args.instruction_difficulty)
        metrics = score_annotations(args.annotations, gamma)
    except ValueError as e:
        raise UserError(str(e), hint="see `alignflow alpaca-eval score --help` for the expected columns") from None
    if args.json:
        print(json.dumps(_jsonable(metrics)))
        return 0
    glm = metrics.pop("glm")
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")
    print(f"GLM: length {glm['length']:.4f}, difficulty {glm['difficulty']:.4f}, model {glm['model']:.4f} "
          f"({glm['n_iter']} Newton steps{'' if glm['converged'] else ', NOT converged'})")
    return 0


def _ratings_table(args) -> pd.DataFrame:
    from pipeline_lib.evaluation.data import read_table
    from pipeline_lib.evaluation.mt_bench import load_questions

    df = read_table(args.ratings)
    if "rating" not in df.columns and "score" in df.columns:  # FastChat's judgment files call it score
        df = df.rename(columns={"score": "rating"})
    if args.model:
        if "model" not in df.columns:
            raise ValueError(f"{args.ratings}: --model given but the file has no 'model' column")
        df = df[df["model"] == args.model]
        if df.empty:
            raise ValueError(f"{args.ratings}: no rows for model {args.model!r}")
    if "category" not in df.columns:
        if not args.questions or "question_id" not in df.columns:
            raise ValueError(f"{args.ratings}: no 'category' column; give --questions and a 'question_id' column")
        cats = {q["question_id"]: q["category"] for q in load_questions(args.questions)}
        unknown = sorted(set(df["question_id"]) - set(cats))
        if unknown:
            raise ValueError(f"{args.ratings}: question_id {unknown[0]} not in {args.questions}")
        df = df.assign(category=df["question_id"].map(cats))
    return df


def mt_bench_score_command(args) -> int:
    from pipeline_lib.errors import UserError
    from pipeline_lib.evaluation.mt_bench import aggregate, category_chart

    try:
        summary = aggregate(_ratings_table(args))
    except ValueError as e:
        raise UserError(f"{args.ratings}: {e}" if not str(e).startswith(str(args.ratings)) else str(e),
                        hint="rows need category (or question_id with --questions), turn and rating") from None
    if args.chart:
        category_chart(summary, args.chart)
    if args.json:
        print(json.dumps(_jsonable(summary)))
        return 0
    rows = [("overall", summary["overall"])] + [(f"turn {t}", g) for t, g in summary["per_turn"].items()]
    rows += list(summary["per_category"].items())
    width = max(len(name) for name, _ in rows)
    for name, g in rows:
        print(f"{name.ljust(width)}  {g['score']:.3f}  (n={g['n_valid']}, invalid={g['n_invalid']})")
    return 0
