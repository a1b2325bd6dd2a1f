"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models") as a benchmark stage.

541 prompts with 834 verifiable instructions of 25 types. The stage generates one greedy response per prompt with
the evaluated model (vLLM, the model's chat template, no system prompt of our own) and scores it with the rules
judge's checkers (:mod:`pipeline_lib.judges.rules`), which implement every IFEval instruction type:

- ``prompt_level_strict`` / ``prompt_level_loose``: share of prompts whose every instruction is followed;
- ``instruction_level_strict`` / ``instruction_level_loose``: share of all instructions followed;
- ``truncated_share``: share of responses cut at ``max_tokens`` (a response that never ends cannot satisfy an end
  phrase, a closing quotation mark or a postscript, so the share says how much the token limit decides);
- ``by_instruction``: per instruction type, its count and strict/loose accuracy.

The table keeps each prompt's verdicts (``strict_follow`` / ``loose_follow`` lists, ``strict_all`` / ``loose_all``),
so two models' artifacts on the same data can be compared prompt by prompt (:func:`paired_ifeval`).

Data: the Hugging Face dataset ``google/IFEval`` (split ``train``; its ``kwargs`` carry every key with nulls, which
the checkers drop), a local JSONL of IFEval's ``input_data.jsonl`` rows, or, by default, the copy in the evaluation
data directory when there is one (offline machines), else the hub. IFEval is an evaluation set: no IFEval prompt is
ever trained on (``tests/unit/test_prompts_builtin.py`` checks the builtin generator against it).

Departures from the reference (``instruction_following_eval``): the checkers' (see
:mod:`pipeline_lib.judges.rules.instructions`); generation is greedy with a token limit of our choosing
(``max_tokens``), where published figures come from various harnesses (lm-evaluation-harness uses 1,280 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, sha256_json, write_table
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stage import done, output_dir

HUB_REPO = "google/IFEval"
LOCAL_FILE = Path("ifeval") / "input_data.jsonl"  # in the evaluation data directory
METRICS = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose"]
COLUMNS = ["key", "prompt", "instruction_id_list", "kwargs"]


class IFEvalOptions(BaseModel):
    """What an IFEval evaluation generates (``evaluate.ifeval`` of a round, ``ifeval`` of ``alignflow evaluate``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str | None = Field(None, description="a local JSONL of IFEval rows, or a hub dataset id; empty: the "
                                               "evaluation data directory's copy when present, else google/IFEval")
    subset: int | None = Field(None, ge=1, description="a seeded random sample of this many prompts (quick runs)")
    subset_seed: int = 0
    max_tokens: int = Field(1024, ge=1, description="new tokens per response (greedy); the share cut at the "
                                                    "limit is reported as truncated_share")
    seed: int = 0
    kv_cache_gib: float = Field(4.0, gt=0, description="vLLM CPU KV cache: 541 prompts at 1,024 tokens")

    def content_fingerprint(self) -> str:
        """For task cache keys: which rows the source holds, not only where it is."""
        path = resolve_source(self.data)
        p = Path(path)
        if p.is_file():
            from pipeline_lib.artifacts import sha256_file

            return sha256_file(p)
        return f"hub:{path}"


def resolve_source(data: str | None) -> str:
    """A local file path or a hub dataset id: ``data`` as given, else the evaluation data directory's copy, else
    the hub's ``google/IFEval``."""
    if data:
        return data
    from pipeline_lib.evaluation.data import eval_data_dir

    try:
        local = eval_data_dir() / LOCAL_FILE
    except FileNotFoundError:  # no evaluation data directory anywhere: the hub
        return HUB_REPO
    return str(local) if local.is_file() else HUB_REPO


def _validate(rows: list[tuple[int, dict]], where: str) -> pd.DataFrame:
    from pipeline_lib.judges.rules.judge import parse_kwargs
    from pipeline_lib.judges.rules.instructions import bind

    out = []
    for n, row in rows:
        missing = [c for c in ("prompt", "instruction_id_list", "kwargs") if c not in row]
        if missing:
            raise ValueError(f"{where} row {n}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where} row {n}: 'prompt' must be a non-empty string")
        ids = row["instruction_id_list"]
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise ValueError(f"{where} row {n}: 'instruction_id_list' must be a list")
        ids = [str(i) for i in ids]
        try:
            kwargs = parse_kwargs(row["kwargs"], len(ids))
            # hub rows carry every kwarg of every type with nulls: keep the set ones, as IFEval's loader does
            kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
            for iid, kw in zip(ids, kwargs):
                bind(iid, kw)  # unknown ids and bad kwargs fail here, naming them
        except ValueError as e:
            raise ValueError(f"{where} row {n}: {e}") from None
        out.append({"key": str(row.get("key", n)), "prompt": row["prompt"], "instruction_id_list": ids,
                    "kwargs": json.dumps(kwargs, sort_keys=True)})
    if not out:
        raise ValueError(f"{where}: no rows")
    df = pd.DataFrame(out, columns=COLUMNS)
    dup = df["key"][df["key"].duplicated()]
    if len(dup):
        raise ValueError(f"{where}: duplicate key {dup.iloc[0]!r}")
    return df


def load_rows(data: str | None = None, subset: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """(IFEval rows: key, prompt, instruction_id_list, kwargs as JSON; where they came from). ValueError naming the
    source and row for a malformed row."""
    where = resolve_source(data)
    if Path(where).is_file():
        from pipeline_lib.evaluation.data import read_jsonl_numbered

        rows = read_jsonl_numbered(where)
    elif where.endswith((".jsonl", ".json")) or "/" not in where or where.startswith((".", "/")):
        raise FileNotFoundError(f"IFEval data: no such file {where}")
    else:
        from datasets import load_dataset

        ds = load_dataset(where, split="train")
        rows = [(i + 1, dict(r)) for i, r in enumerate(ds)]
    df = _validate(rows, where)
    if subset is not None:
        if subset > len(df):
            raise ValueError(f"ifeval.subset={subset}: {where} has {len(df)} prompts")
        pick = np.sort(np.random.default_rng(seed).choice(len(df), size=subset, replace=False))
        df = df.iloc[pick].reset_index(drop=True)
    return df, where


def score_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-prompt verdicts of ``df`` (IFEval rows + ``response``) and the metrics: the four IFEval accuracies,
    counts, and ``by_instruction``."""
    from pipeline_lib.judges.rules.judge import follow_list

    df = df.copy()
    for mode in ("strict", "loose"):
        follows = [follow_list(r.prompt, r.response, list(r.instruction_id_list), r.kwargs, loose=mode == "loose")
                   for r in df.itertuples(index=False)]
        df[f"{mode}_follow"] = follows
        df[f"{mode}_all"] = [all(f) for f in follows]
    n_inst = int(sum(len(f) for f in df["strict_follow"]))
    metrics: dict[str, Any] = {"n_prompts": len(df), "n_instructions": n_inst}
    for mode in ("strict", "loose"):
        metrics[f"prompt_level_{mode}"] = float(df[f"{mode}_all"].mean())
        metrics[f"instruction_level_{mode}"] = sum(sum(f) for f in df[f"{mode}_follow"]) / n_inst if n_inst \
            else float("nan")
    by: dict[str, dict[str, float]] = {}
    for r in df.itertuples(index=False):
        for iid, s, lo in zip(r.instruction_id_list, r.strict_follow, r.loose_follow):
            e = by.setdefault(iid, {"n": 0, "strict": 0, "loose": 0})
            e["n"], e["strict"], e["loose"] = e["n"] + 1, e["strict"] + s, e["loose"] + lo
    metrics["by_instruction"] = {iid: {"n": e["n"], "strict": e["strict"] / e["n"], "loose": e["loose"] / e["n"]}
                                 for iid, e in sorted(by.items())}
    return df, metrics


def load_ifeval_set(opts: IFEvalOptions, work_dir) -> ArtifactRef:
    """The IFEval rows as an artifact of their own (logged to MLflow with their digest)."""
    df, where = load_rows(opts.data, opts.subset, opts.subset_seed)
    config = {"source": where if not Path(where).is_file() else str(Path(where).resolve()), "subset": opts.subset,
              "subset_seed": opts.subset_seed}
    out = output_dir(work_dir, "ifeval-set", {"content": sha256_json(df.to_dict(orient="records"))}, config)
    return write_table(df, out, name="ifeval_set", producer="ifeval-set", config=config)


def evaluate_ifeval(model: ResolvedModel, data: ArtifactRef, opts: IFEvalOptions, work_dir, quiet: bool = False,
                    tensor_parallel_size: int = 1) -> ArtifactRef:
    """Greedy responses of ``model`` to the IFEval rows of ``data``, scored; metrics in the manifest.
    ``tensor_parallel_size`` and ``kv_cache_gib`` say how the engine runs, not what is generated: not in the key."""
    from pipeline_lib.generation.requests import SamplingKey, run_requests
    from pipeline_lib.report.progress import Progress

    config = {"max_tokens": opts.max_tokens, "seed": opts.seed, "temperature": 0.0}
    inputs = {"model": model.sha256, "ifeval_set": data.sha256}
    out = output_dir(work_dir, "ifeval", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df = read_table(data)
    key = SamplingKey(0.0, 1.0, opts.max_tokens, opts.seed, opts.kv_cache_gib)
    with Progress(len(df), "ifeval (generate)", "responses", quiet=quiet) as progress:
        res, stats = run_requests(model, [[{"role": "user", "content": p}] for p in df["prompt"]],
                                  [key] * len(df), quiet, progress, tensor_parallel_size)
    df = df.assign(response=[r["response"] for r in res], n_tokens=[r["n_tokens"] for r in res],
                   finish_reason=[r["finish_reason"] for r in res])
    df, metrics = score_table(df)
    by_instruction = metrics.pop("by_instruction")
    metrics.update({"truncated_share": float((df["finish_reason"] == "length").mean()),
                    "mean_tokens": float(df["n_tokens"].mean()), "generated_tokens": int(df["n_tokens"].sum()),
                    "generate_s": stats["generate_s"], "engine_load_s": stats["load_s"],
                    "tokens_per_s": stats["generated_tokens"] / max(stats["generate_s"], 1e-9)})
    return write_table(df, out, name="ifeval_responses", producer="ifeval", inputs=inputs, config=config,
                       extra={"metrics": metrics, "by_instruction": by_instruction,
                              "model": {"ref": model.ref, "sha256": model.sha256}})


def paired_ifeval(before: pd.DataFrame, after: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                  confidence: float = 0.95) -> dict[str, dict]:
    """The four IFEval metrics of two models' scored tables on the same prompts (matched by ``key``), each with
    the paired bootstrap CI of after - before; prompt-level ones with the exact McNemar test."""
    from pipeline_lib.evaluation.paired import compare

    a = after.set_index("key")
    if set(a.index) != set(before["key"]):
        raise ValueError("paired IFEval comparison: the two evaluations hold different prompts")
    a = a.loc[before["key"]]
    out = {}
    for mode in ("strict", "loose"):
        out[f"prompt_level_{mode}"] = compare(
            f"prompt_level_{mode}", before[f"{mode}_all"].to_numpy(int), a[f"{mode}_all"].to_numpy(int),
            binary=True, n_resamples=n_resamples, seed=seed, confidence=confidence).as_dict()
        den = np.array([len(f) for f in before[f"{mode}_follow"]])
        out[f"instruction_level_{mode}"] = compare(
            f"instruction_level_{mode}", np.array([sum(f) for f in before[f"{mode}_follow"]]),
            np.array([sum(f) for f in a[f"{mode}_follow"]]), den, n_resamples=n_resamples, seed=seed,
            confidence=confidence).as_dict()
    return out


def format_by_instruction(by_instruction: dict[str, dict], other: dict[str, dict] | None = None) -> str:
    """The per-instruction-type table (strict/loose accuracy; with ``other``, a before/after pair)."""
    rows = [("instruction", "n", "strict", "loose")] if other is None else \
        [("instruction", "n", "strict before", "strict after", "loose before", "loose after")]
    for iid, s in by_instruction.items():
        if other is None:
            rows.append((iid, str(s["n"]), f"{s['strict']:.3f}", f"{s['loose']:.3f}"))
        else:
            o = other.get(iid, {"strict": float("nan"), "loose": float("nan")})
            rows.append((iid, str(s["n"]), f"{s['strict']:.3f}", f"{o['strict']:.3f}", f"{s['loose']:.3f}",
                         f"{o['loose']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
