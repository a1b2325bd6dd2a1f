"""``alignflow lineage``: where a model came from, artifact by artifact, with digests and MLflow run ids."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="print a model's lineage (checkpoint <- pairs <- judgments <- generations "
                                       "<- prompts, and the policies it came from)",
                       description="Walk the MLflow stage runs' dataset inputs and the artifact manifests backwards "
                                   "from a model version or an artifact directory.")
    p.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION, a version number (with "
                               "--registered-model or --config), or a checkpoint/artifact directory")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the --config recipe's)")
    p.add_argument("--config", "-c", default=None, help="recipe whose run.mlflow_tracking_uri and "
                                                        "run.registered_model are the defaults")
    p.add_argument("--registered-model", default=None, help="registered model name for a bare version number")
    p.add_argument("--verify", action="store_true", help="also recompute every artifact's content hash")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline_lib.errors import UserError
    from pipeline_lib.lineage_chain import LineageError, lineage_chain, render

    uri, name = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), args.registered_model
    if args.config:
        from pipeline_lib.config import load_config

        cfg = load_config(args.config)
        uri, name = uri or cfg.run.mlflow_tracking_uri, name or cfg.run.registered_model
    if not uri:
        raise UserError("no MLflow tracking store given", hint="pass --tracking-uri sqlite:///mlflow.db, "
                                                               "--config RECIPE, or set MLFLOW_TRACKING_URI")
    try:
        chain = lineage_chain(args.ref, uri, registered_model=name, verify_content=args.verify)
    except LineageError as e:
        raise UserError(str(e), hint="list versions with the MLflow UI or `mlflow models` / check the "
                                     "tracking URI") from None
    print(json.dumps(chain.to_dict(), indent=2) if args.json else render(chain))
    bad = [n for n in chain.root.walk() if n.manifest in ("mismatch", "corrupt")]
    return 1 if bad else 0
