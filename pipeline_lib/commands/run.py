"""``alignflow run``: one alignment round from a YAML recipe plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import os

from pipeline_lib.console import add_output_options, command_output, stdout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one alignment round (collect, annotate, pair, train, evaluate)",
                       description="Run one alignment round and print the held-out metrics before and after.")
    p.add_argument("--config", "-c", default="configs/default.yaml", help="YAML recipe (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.beta=0.2")
    p.add_argument("--json", action="store_true", help="print the round summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output (CI logs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and data, locate the models, print the plan (stages, expected cache "
                        "hits, where artifacts and runs go) and exit; loads no model")
    add_output_options(p)
    p.set_defaults(func=run)


def format_table(summary: dict) -> str:
    rows = [("metric", "before", "after", "delta")]
    for k, b in summary["before"].items():
        a = summary["after"][k]
        rows.append((k, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += format_paired(summary.get("paired") or {})
    p = summary["pairs"]
    lines.append(f"\npairs: {p['n_pairs']} from {p['n_prompts']} prompts ({p['n_prompts_tied']} tied, dropped); "
                 f"candidate: {summary['registered_model']} v{summary['candidate_version']}; "
                 f"wall time {summary['wall_s']:.0f} s; MLflow run {summary['mlflow_run_id']}")
    return "\n".join(lines)


def format_paired(paired: dict[str, dict]) -> list[str]:
    """The paired comparisons as lines under the table: ``after - before`` with its confidence interval, and for
    prompt-level metrics the prompts gained and lost and McNemar's exact p-value."""
    from pipeline_lib.evaluation.paired import PairedResult

    if not paired:
        return []
    any_ = next(iter(paired.values()))
    lines = [f"\npaired on the same prompts (after - before, {any_['confidence']:.0%} CI from "
             f"{any_['n_resamples']:,} bootstrap resamples of the prompts):"]
    width = max(len(k) for k in paired)
    for metric, p in paired.items():
        r = PairedResult(**p)
        verdict = "  (CI excludes 0)" if r.excludes_zero() else ""
        lines.append(f"  {metric.ljust(width)}  n={r.n:<4} {r.describe()}{verdict}")
    return lines


def preflight_data(cfg) -> str:
    """Every row of the round's data sources validated before any model is resolved (DataError: file, row, reason);
    returns what was checked, in words."""
    from pipeline_lib.stages.dataset_pairs import validate_pairs
    from pipeline_lib.prompts.sources import load_prompt_table

    n_held = len(load_prompt_table(cfg.prompts, "heldout", cfg.prompts.n_heldout))
    source = getattr(cfg.prompts, "source", "builtin")
    if cfg.data.mode == "on_policy":
        n_train = len(load_prompt_table(cfg.prompts, "train", cfg.prompts.n_train))
        return f"prompts ({source}): {n_train} train and {n_held} held-out rows validated"
    validate_pairs(cfg.data.preference_data)
    return (f"prompts ({source}): {n_held} held-out rows validated; preference data "
            f"({cfg.data.preference_data.source}) validated, mode {cfg.data.mode}")


def dry_run(cfg, data_note: str, title: str) -> str:
    """The plan of one round (``--dry-run``): models located, stages with their expected cache state."""
    from flows.plan import describe_models, format_plan, plan_round

    models = describe_models(cfg)  # raises ModelError for a reference that cannot resolve
    return format_plan(title, cfg, plan_round(cfg), models, data_note)


def preflight_models(cfg) -> None:
    """Every model reference of the round resolved before Prefect starts (ModelError, one line): the policy, a
    ``models:/`` one included (its registered digest checked), ``initial_policy``, and the judge's model. Before,
    ``models:/`` and ``initial_policy`` failed only after the flow had started (~25 s), ``judge.model`` only after a
    whole collect."""
    from pipeline_lib.judges import build_judge
    from pipeline_lib.models import resolve

    for ref in dict.fromkeys(r for r in (cfg.policy, cfg.initial_policy) if r):
        resolve(ref)
    build_judge(cfg.judge).identity()  # model judges resolve their model here (no weights are loaded)


def run(args) -> int:
    from pipeline_lib.config import load_config

    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else [])
    cfg = load_config(args.config, overrides)  # validates everything before any model is loaded
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.run.mlflow_tracking_uri)
    data_note = preflight_data(cfg)
    if args.dry_run:
        print(dry_run(cfg, data_note, f"plan: round {cfg.name!r} ({args.config})"), file=stdout())
        return 0
    preflight_models(cfg)
    with command_output(args, cfg.run.work_dir, cfg.name):
        from flows.round import alignment_round

        summary = alignment_round(cfg)
        print(json.dumps(summary, indent=2, default=str) if args.json else format_result(summary), file=stdout())
    return 0


def format_result(summary: dict) -> str:
    """The printed result: the metrics table, then what the round cost (pipeline_lib/cost)."""
    from pipeline_lib.cost import format_cost_table

    out = format_table(summary)
    return out + "\n\n" + format_cost_table(summary["cost"]) if summary.get("cost") else out
