"""The ``alignflow`` command line.

Each subcommand lives in its own module of ``pipeline_lib/commands/`` exposing ``register(subparsers)``, which adds a
parser whose ``func`` default takes the parsed args and returns an exit code. The commands are the outermost layer:
the only part of ``pipeline_lib`` that imports ``flows`` (inside the command's function, so that ``--help`` loads
neither Prefect nor torch). Errors a user can fix (bad config, missing model, malformed data) print one line plus a
hint and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline_lib.commands import benchmark_scores, campaign, evaluate, ifeval, lineage, report, run, serve, ui
from pipeline_lib.errors import UserError

# The subcommands' modules, in help order: align, evaluate, inspect.
SUBCOMMANDS = [run, campaign, serve, evaluate, ifeval, benchmark_scores, lineage, report, ui]

EPILOG = """\
commands by task:
  align       run (one round), campaign (N rounds), serve (scheduled rounds, typed forms in the Prefect UI)
  evaluate    evaluate (AlpacaEval 2 + MT-Bench for a model); ifeval, alpaca-eval, mt-bench (score files)
  inspect     lineage (where a model came from), report (HTML page), ui (Prefect + MLflow UIs)

examples:
{examples}

'alignflow COMMAND --help' for a command's options; docs/operations.md, docs/methods.md for more.
"""
EXAMPLES = [
    ("alignflow run --config configs/default.yaml train.beta=0.2", "one round on the embedded model"),
    ("alignflow run --config configs/smoke.yaml --quiet", "tiny model, every stage, ~2 min"),
    ("alignflow campaign --config configs/campaign_smoke.yaml", "rounds chained through checkpoints"),
    ("alignflow lineage models:/alignflow-policy@champion", "the champion's chain with digests"),
    ("alignflow report <campaign | MLflow run id> --out report/", "tables, pictures, lineage, config"),
]
EPILOG = EPILOG.format(examples="\n".join(f"  {cmd:<60} {what}" for cmd, what in EXAMPLES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignflow",
        description="Align language models to preferences, round after round (collect, annotate, pair, train, evaluate).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.register(sub)
    return parser


def quiet_third_party() -> None:
    """No phone-home attempts (this may run offline) and no progress bars from libraries in quiet mode."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: list[str] | None = None) -> int:
    from pipeline_lib.console import forget_last_log

    quiet_third_party()
    forget_last_log()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipeline_lib.artifacts import ArtifactError
    from pipeline_lib.config import ConfigError
    from pipeline_lib.models import ModelError
    from pipeline_lib.prompts.validate import DataError

    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, ModelError, DataError, ArtifactError, FileNotFoundError) as e:
        if args.debug or os.environ.get("ALIGNFLOW_DEBUG"):
            raise
        print(f"alignflow: error: {e}", file=sys.stderr)
        hint = getattr(e, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        _name_log()
        return 2
    except OSError as e:  # a full disk, a read-only work dir: one line naming the cause and the file
        from pipeline_lib.errors import describe_storage_error, storage_error

        if not storage_error(e) or args.debug or os.environ.get("ALIGNFLOW_DEBUG"):
            raise
        print(f"alignflow: error: {describe_storage_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignflow: interrupted", file=sys.stderr)
        _name_log()
        return 130
    except Exception:
        _name_log()
        raise


def _name_log() -> None:
    """After a failure, say where the libraries' output of the run went (pipeline_lib/console.py)."""
    from pipeline_lib.console import last_log

    if last_log() is not None:
        print(f"alignflow: the libraries' output of this run is in {last_log()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
