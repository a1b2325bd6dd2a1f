"""``alignflow report``: a self-contained HTML page of a campaign or a round, from what MLflow holds."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML report of a campaign or a round (metrics, charts, lineage)",
                       description="Write one self-contained HTML page (tables, charts as embedded PNG, the "
                                   "candidate's lineage, the config) from the MLflow store and the pairs artifacts "
                                   "its runs point at.")
    p.add_argument("target", help="a campaign name, a round's MLflow run id, or any of its stage runs' ids")
    p.add_argument("--out", "-o", metavar="DIR", default="runs/reports",
                   help="directory to write <target>.html in (default: %(default)s)")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow store to read (default: $MLFLOW_TRACKING_URI, else the --config recipe's, else "
                        "sqlite:///mlflow.db)")
    p.add_argument("--config", "-c", metavar="RECIPE", default=None,
                   help="recipe whose run.mlflow_tracking_uri is the store to read")
    p.set_defaults(func=run)


def tracking_uri(args) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the recipe's (or the default recipe's) run section."""
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from pipeline_lib.config import load_config
    from pipeline_lib.sections import RunConfig

    return load_config(args.config).run.mlflow_tracking_uri if args.config else RunConfig().mlflow_tracking_uri


def run(args) -> int:
    import sys

    from pipeline_lib.errors import UserError
    from pipeline_lib.report.collect import ReportError, collect_report
    from pipeline_lib.report.html import render

    uri = tracking_uri(args)
    try:
        data = collect_report(args.target, uri)
    except ReportError as e:
        raise UserError(str(e), hint="pass --tracking-uri (or --config) for another store; a campaign's name is "
                                     "its CampaignConfig name, a run id is 32 hex digits") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", args.target) + ".html")
    path.write_text(render(data), encoding="utf-8")
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    print(path)
    return 0
