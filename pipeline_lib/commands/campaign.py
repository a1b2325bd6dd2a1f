"""``alignflow campaign``: N rounds in a row from a campaign YAML (top-level name, rounds, chain, round: {...})."""

from __future__ import annotations

import argparse
import json
import os

from pipeline_lib.console import add_output_options, command_output, stdout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="run N alignment rounds, each from the previous round's model",
                       description="Run an iterative campaign (SPPO iterations, BPO phases, online DPO) and print "
                                   "the held-out metrics per round.")
    p.add_argument("--config", "-c", required=True, help="campaign YAML (keys: name, rounds, chain, round)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=3 round.train.beta=0.2")
    p.add_argument("--json", action="store_true", help="print the round summaries as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and data, locate the models, print each round's plan and exit")
    add_output_options(p)
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


def format_result(result: dict) -> str:
    """Per-round metrics and the start-vs-final comparison, then what the campaign cost: one row per round and the
    sum (pipeline_lib/cost)."""
    from pipeline_lib.cost import campaign_cost, format_cost_table

    out = format_campaign(result)
    summaries = result["rounds"]
    if not all(s.get("cost") for s in summaries):
        return out
    rounds = [{"stage": f"round {i}", "cached": False, **s["cost"]["total"]} for i, s in enumerate(summaries, 1)]
    table = format_cost_table({"stages": rounds, "total": campaign_cost([s["cost"] for s in summaries])},
                              title="campaign cost")
    return out + "\n\n" + table


def dry_run(cfg, config_path: str) -> str:
    """Each round's plan: round k+1 samples from round k's checkpoint, known only when that is a cache hit."""
    from flows.campaign import round_config
    from flows.plan import describe_models, format_plan, plan_round
    from pipeline_lib.commands.run import preflight_data

    out, policy = [], cfg.round.policy
    for k in range(cfg.rounds):
        rc = round_config(cfg, k, policy)
        note = preflight_data(rc)
        plan = plan_round(rc, policy_ref=policy)
        models = describe_models(rc) if k == 0 else [("policy", policy, "the previous round's checkpoint")]
        out.append(format_plan(f"plan: campaign {cfg.name!r} round {k + 1}/{cfg.rounds} ({config_path})", rc, plan,
                               models, note, log_name=cfg.name))
        if plan["checkpoint"] is None:
            later = f"round {k + 2}" if k + 2 == cfg.rounds else f"rounds {k + 2}-{cfg.rounds}"
            if k + 1 < cfg.rounds:
                out.append(f"{later}: every stage runs (round {k + 1} trains a new checkpoint)")
            break
        policy = plan["checkpoint"] if cfg.chain == "checkpoint" else f"models:/{rc.run.registered_model}@champion"
    return "\n".join(out)


def run(args) -> int:
    from flows.campaign import CampaignConfig
    from pipeline_lib.config import load_config

    overrides = list(args.overrides) + (["round.run.quiet=true"] if args.quiet else [])
    cfg = load_config(args.config, overrides, model=CampaignConfig)
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.round.run.mlflow_tracking_uri)
    if args.dry_run:
        print(dry_run(cfg, args.config), file=stdout())
        return 0
    from pipeline_lib.commands.run import preflight_models

    preflight_models(cfg.round)  # pre-flight: a missing model fails before Prefect starts
    with command_output(args, cfg.round.run.work_dir, cfg.name):
        from flows.campaign import alignment_campaign

        result = alignment_campaign(cfg)
        print(json.dumps(result, indent=2, default=str) if args.json else format_result(result), file=stdout())
    return 0
