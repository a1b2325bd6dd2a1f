"""The hybrid-candidates stage: per prompt, the preference dataset's responses and the policy's samples in one table,
which the annotate stage judges on one scale. The hybrid round: ``stages/hybrid_pair.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.stage import done, output_dir

RESPONSE_SOURCES = ("off_policy", "on_policy", "reference")
# Prompt-level columns a candidate row carries (from the generations when present: collect's rendering).
PROMPT_LEVEL = ["prompt_id", "prompt", "prompt_text", "instruction_id_list", "kwargs", "base_task", "split"]


def candidates_table(dataset_pairs: pd.DataFrame, generations: pd.DataFrame) -> pd.DataFrame:
    """The rows to judge: per prompt, the dataset's distinct responses (chosen then rejected, in dataset order) and
    then the generated samples (sample order), numbered 0.. as ``sample_index``; each keeps ``response_source``
    (dataset rows: their pairs-table source, ``off_policy``; generations: their column, default ``on_policy``).
    Raises ValueError when the two tables do not cover the same prompts or render a prompt differently."""
    gens = {pid: g.sort_values("sample_index") for pid, g in generations.groupby("prompt_id", sort=False)}
    data = dict(tuple(dataset_pairs.groupby("prompt_id", sort=False)))
    missing, extra = sorted(set(data) - set(gens)), sorted(set(gens) - set(data))
    if missing or extra:
        raise ValueError(f"dataset pairs and generations cover different prompts: {len(missing)} without samples "
                         f"(e.g. {missing[:3]}), {len(extra)} not in the dataset (e.g. {extra[:3]})")
    rows = []
    for pid, d in data.items():
        g = gens[pid]
        if g["prompt_text"].iloc[0] != d["prompt_text"].iloc[0]:
            raise ValueError(f"prompt {pid}: the dataset and the generations render it differently (another "
                             f"tokenizer or chat template?): {d['prompt_text'].iloc[0]!r:.80} vs "
                             f"{g['prompt_text'].iloc[0]!r:.80}")
        base = {c: g[c].iloc[0] if c in g.columns else d[c].iloc[0] for c in PROMPT_LEVEL
                if c in g.columns or c in d.columns}
        cands = [(r[side], r.get(f"{side}_response_source", "off_policy"), r.get(f"{side}_score", np.nan),
                  np.nan, np.nan) for r in d.to_dict("records") for side in ("chosen", "rejected")]
        cands += [(r["response"], r.get("response_source", "on_policy"), np.nan, r.get("behavior_logp_seq", np.nan),
                   r.get("n_tokens", np.nan)) for r in g.to_dict("records")]
        seen: set[str] = set()
        for text, source, dataset_score, logp, n_tok in cands:
            if source not in RESPONSE_SOURCES:
                raise ValueError(f"prompt {pid}: response_source {source!r} is not one of {RESPONSE_SOURCES}")
            if text in seen:
                continue
            seen.add(text)
            rows.append({**base, "response": text, "response_source": source, "sample_index": len(seen) - 1,
                         "dataset_score": float(dataset_score), "behavior_logp_seq": float(logp),
                         "n_tokens": float(n_tok)})
    return pd.DataFrame(rows)


def run(dataset_pairs: ArtifactRef, generations: ArtifactRef, work_dir: str | Path) -> ArtifactRef:
    """The hybrid candidates table (dataset responses + samples), the input of annotate."""
    inputs = {"dataset_pairs": dataset_pairs.sha256, "generations": generations.sha256}
    out = output_dir(work_dir, "hybrid_candidates", inputs, {})
    if done(out):
        return ref_from_dir(out)
    data, gens = read_table(dataset_pairs), read_table(generations)
    df = candidates_table(data, gens)
    offered = 2 * len(data) + len(gens)
    metrics = {"n_candidates": len(df), "n_duplicates_dropped": offered - len(df),
               **{f"candidates_{s}": int((df["response_source"] == s).sum()) for s in RESPONSE_SOURCES}}
    return write_table(df, out, name="generations", producer="hybrid_candidates", inputs=inputs, config={},
                       extra={"metrics": metrics})
