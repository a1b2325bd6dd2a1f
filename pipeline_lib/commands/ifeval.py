"""``alignflow ifeval score``: IFEval verdicts for a JSONL file of responses.

Input rows are IFEval's ``input_data.jsonl`` rows plus a ``response``: ``prompt``, ``instruction_id_list``,
``kwargs`` (a list of dicts, or its JSON text) and ``response``; other fields (``key``) are passed through.
With ``--output``, each row is written back with two nested objects added::

    "strict": {"follow_instruction_list": [true, false], "follow_all_instructions": false},
    "loose":  {"follow_instruction_list": [true, true],  "follow_all_instructions": true}

The summary has IFEval's four headline numbers, prompt-level and instruction-level accuracy in strict and loose
mode (prompt-level: share of rows whose every instruction is followed; instruction-level: share of all
instructions followed), and per-instruction-id accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline_lib.judges.rules.judge import follow_list

REQUIRED = ("prompt", "instruction_id_list", "kwargs", "response")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ifeval", help="IFEval-compatible verifiable-instruction scoring",
                       description="IFEval-compatible verifiable-instruction scoring (strict and loose).")
    inner = p.add_subparsers(dest="ifeval_command", metavar="SUBCOMMAND", required=True)
    s = inner.add_parser("score", help="score a JSONL file of responses",
                         description="Score responses against their prompts' verifiable instructions.")
    s.add_argument("--input", "-i", required=True, help="JSONL: prompt, instruction_id_list, kwargs, response")
    s.add_argument("--output", "-o", help="write the rows with 'strict' and 'loose' verdicts to this JSONL file")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    s.set_defaults(func=score_command)


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    from pipeline_lib.errors import UserError
    from pipeline_lib.evaluation.data import read_jsonl_numbered

    try:
        parsed = read_jsonl_numbered(path)
    except ValueError as e:  # malformed JSON: the message names the file and line
        raise UserError(str(e)) from None
    rows = []
    for lineno, row in parsed:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise UserError(f"{path} line {lineno}: missing field(s) {', '.join(missing)}",
                            hint=f"each row needs {', '.join(REQUIRED)}")
        for k in ("prompt", "response"):
            if not isinstance(row[k], str):
                raise UserError(f"{path} line {lineno}: field {k!r} must be a string")
        if not isinstance(row["instruction_id_list"], list):
            raise UserError(f"{path} line {lineno}: field 'instruction_id_list' must be a list")
        rows.append((lineno, row))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def score_rows(rows: list[tuple[int, dict]], path: str = "input") -> tuple[list[dict], dict]:
    from pipeline_lib.errors import UserError

    out, per_id = [], {}
    totals = {m: {"prompts": 0, "instructions": 0} for m in ("strict", "loose")}
    n_instructions = 0
    for lineno, row in rows:
        row = dict(row)
        ids = row["instruction_id_list"]
        n_instructions += len(ids)
        for iid in ids:
            per_id.setdefault(iid, {"n": 0, "strict": 0, "loose": 0})["n"] += 1
        for mode in ("strict", "loose"):
            try:
                follows = follow_list(row["prompt"], row["response"], ids, row["kwargs"], loose=mode == "loose")
            except ValueError as e:
                raise UserError(f"{path} line {lineno}: {e}") from None
            row[mode] = {"follow_instruction_list": follows, "follow_all_instructions": all(follows)}
            totals[mode]["prompts"] += all(follows)
            totals[mode]["instructions"] += sum(follows)
            for iid, ok in zip(ids, follows):
                per_id[iid][mode] += ok
        out.append(row)
    summary = {"n_prompts": len(rows), "n_instructions": n_instructions}
    for mode, t in totals.items():
        summary[mode] = {"prompt_level": t["prompts"] / len(rows),
                         "instruction_level": t["instructions"] / n_instructions if n_instructions else float("nan")}
    summary["by_instruction"] = {iid: {"n": s["n"], "strict": s["strict"] / s["n"], "loose": s["loose"] / s["n"]}
                                 for iid, s in sorted(per_id.items())}
    return out, summary


def format_summary(summary: dict) -> str:
    rows = [("", "prompt-level", "instruction-level")]
    rows += [(m, f"{summary[m]['prompt_level']:.4f}", f"{summary[m]['instruction_level']:.4f}")
             for m in ("strict", "loose")]
    rows += [("", "", "")]
    rows += [("instruction", "strict", "loose")]
    rows += [(f"{iid} (n={s['n']})", f"{s['strict']:.4f}", f"{s['loose']:.4f}")
             for iid, s in summary["by_instruction"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"\n{summary['n_prompts']} prompts, {summary['n_instructions']} instructions")
    return "\n".join(lines)


def score_command(args) -> int:
    out, summary = score_rows(read_rows(args.input), path=args.input)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{args.output}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(args.output)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
