"""``alignflow campaign``: N rounds in a row from a campaign YAML (top-level name, rounds, chain, round: {...})."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="run N alignment rounds, each from the previous round's model",
                       description="Run an iterative campaign (SPPO iterations, BPO phases, online DPO) and print "
                                   "the held-out metrics per round.")
    p.add_argument("--config", "-c", required=True, help="campaign YAML (keys: name, rounds, chain, round)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=3 round.train.beta=0.2")
    p.add_argument("--json", action="store_true", help="print the round summaries as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def format_campaign(result: dict) -> str:
    summaries = result["rounds"]
    keys = list(summaries[0]["after"])
    head = "| round | " + " | ".join(keys) + " | promoted |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    lines.append("| 0 (start) | " + " | ".join(f"{summaries[0]['before'][k]:.3f}" for k in keys) + " | |")
    for i, s in enumerate(summaries, 1):
        lines.append(f"| {i} | " + " | ".join(f"{s['after'][k]:.3f}" for k in keys) + f" | {s['promoted']} |")
    final = result.get("final")
    if final:
        from pipeline_lib.commands.run import format_paired

        lines.append(f"\nstart ({final['start']}) -> final ({final['final']}), same prompts; the rounds took "
                     f"{final['rounds_wall_s'] / 60:.1f} min:")
        lines += [f"  {k}: {final['before'][k]:.3f} -> {final['after'][k]:.3f}" for k in final["before"]]
        lines += format_paired(final["paired"])
        lines.append(f"MLflow run {final['mlflow_run_id']}")
    return "\n".join(lines)


def run(args) -> int:
    from flows.campaign import CampaignConfig
    from pipeline_lib.config import load_config

    overrides = list(args.overrides) + (["round.run.quiet=true"] if args.quiet else [])
    cfg = load_config(args.config, overrides, model=CampaignConfig)
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.round.run.mlflow_tracking_uri)
    from pipeline_lib.commands.run import preflight_models

    preflight_models(cfg.round)  # pre-flight: a missing model fails before Prefect starts
    from flows.campaign import alignment_campaign

    result = alignment_campaign(cfg)
    print(json.dumps(result, indent=2) if args.json else format_campaign(result))
    return 0
