"""Where the offline evaluation data lives, and reading tabular files with errors that name the file.

**Evaluation data directory**: a directory with one folder per benchmark, ``alpaca_eval/`` (the GPT-4 baseline
outputs, instruction difficulties, leaderboard and annotations), ``mt_bench/`` (questions, GPT-4 reference answers,
judge prompts) and ``ifeval/`` (``input_data.jsonl``). :func:`eval_data_dir` looks for it, first found wins:

1. the config key ``run.eval_data_dir`` (set for the process by the flow that reads it: :func:`use_eval_data_dir`);
2. the environment variable ``ALIGNFLOW_EVAL_DATA``;
3. the Hugging Face cache: ``$HF_HOME/alignflow-eval-data`` (``~/.cache/huggingface/alignflow-eval-data``), so a
   worker whose HF cache is pre-populated (a shared cache volume) has it beside its models;
4. this checkout's development copy, ``<repo>/../shared/data`` (``ALIGNFLOW_SHARED_DIR`` moves the ``shared``
   directory; the tests read their data there).

A missing directory is a FileNotFoundError that lists the places looked at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
ENV = "ALIGNFLOW_EVAL_DATA"
HF_CACHE_NAME = "alignflow-eval-data"
_configured: list[str | None] = [None]


def use_eval_data_dir(path: str | None) -> None:
    """The config's ``run.eval_data_dir`` for this process (empty: the other places are looked at)."""
    _configured[0] = path or None


def shared_dir() -> Path:
    """The development ``shared`` directory (``ALIGNFLOW_SHARED_DIR``, default ``<repo>/../shared``); FileNotFoundError
    naming the path and the variable when it is absent."""
    d = Path(os.environ.get("ALIGNFLOW_SHARED_DIR", REPO.parent / "shared"))
    if not (d / "data").is_dir():
        raise FileNotFoundError(f"shared evaluation data not found: {d / 'data'} is not a directory (set "
                                "ALIGNFLOW_SHARED_DIR to the directory that holds data/alpaca_eval and data/mt_bench)")
    return d


def _hf_home() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HOME)
    except Exception:  # noqa: BLE001 - the hub library missing or broken: its default location
        return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))


def eval_data_candidates(configured: str | None = None) -> list[tuple[str, Path]]:
    """(where from, directory) in lookup order; see the module docstring."""
    out = []
    if configured or _configured[0]:
        out.append(("run.eval_data_dir", Path(configured or _configured[0]).expanduser()))
    if os.environ.get(ENV):
        out.append((ENV, Path(os.environ[ENV]).expanduser()))
    out.append(("the Hugging Face cache", _hf_home() / HF_CACHE_NAME))
    out.append(("the development checkout", Path(os.environ.get("ALIGNFLOW_SHARED_DIR", REPO.parent / "shared"))
                / "data"))
    return out


def eval_data_dir(configured: str | None = None) -> Path:
    """The evaluation data directory (holds ``alpaca_eval/``, ``mt_bench/``, ``ifeval/``): the first of
    :func:`eval_data_candidates` that exists. A configured path or ``ALIGNFLOW_EVAL_DATA`` that does not exist is an
    error, not a reason to look elsewhere."""
    looked = []
    for where, d in eval_data_candidates(configured):
        if d.is_dir():
            return d
        if where in ("run.eval_data_dir", ENV):
            raise FileNotFoundError(f"evaluation data directory {d} (from {where}) does not exist")
        looked.append(f"{where}: {d}")
    raise FileNotFoundError("evaluation data not found; looked at " + "; ".join(looked) +
                            f" (set run.eval_data_dir or {ENV} to a directory with alpaca_eval/ and mt_bench/)")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (optionally gzipped), JSON (a list of records) or JSONL file as a DataFrame; ValueError naming the file
    when it cannot be parsed. Missing files raise FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path)
        if name.endswith(".jsonl"):
            return pd.DataFrame([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                                 if line.strip()])
        if name.endswith(".json"):
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("expected a JSON list of objects")
            return pd.DataFrame(records)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    raise ValueError(f"{path}: unknown format (expected .csv, .csv.gz, .json or .jsonl)")


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line; ValueError naming the file and line for a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON objects, one a line; ValueError naming the file and line for a malformed one."""
    return [row for _, row in read_jsonl_numbered(path)]
