"""The hybrid-pair stage of WPO's hybrid (HB) setting: a preference dataset's responses plus K on-policy samples,
judged together, then paired.

WPO (Zhou et al. 2024) trains in an off-policy setting (a fixed preference dataset), an on-policy setting (the
policy's own samples, judged) and a hybrid one where a prompt's candidates are the dataset's responses together with
the policy's samples. Here the hybrid round is (stage modules in brackets):

    dataset pairs --prompts_from_pairs [hybrid_prompts]--> prompt table --collect (K samples)--> generations
    dataset pairs + generations --candidates_table [hybrid_candidates]--> candidates --annotate (any judge)--> judged
    judged --hybrid_pairs [hybrid_pair]--> pairs (each side's response_source kept) --> train

Every candidate of a prompt is scored by the same judge in the same stage, so dataset and on-policy responses are
compared on one scale; the dataset's own scores are kept (``dataset_score``) but never used for pairing.

Departures / choices: exact-duplicate responses of one prompt are judged once (the first occurrence, so a dataset
response wins over an identical sample; the count is reported); a candidate whose score is within ``min_margin`` of
the best is never the rejected one. The WPO text does not pin the rejected-selection rule down for our purposes, so
it is a switch (``lowest``, ``random_other``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.stage import done, output_dir
from pipeline_lib.stages.hybrid_candidates import RESPONSE_SOURCES
from pipeline_lib.stages.pair import PAIR_PROMPT_COLUMNS, SIDE_COLUMNS


class HybridOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rejected: Literal["lowest", "random_other"] = Field(
        "lowest", description="lowest: the lowest-scored candidate; random_other: a seeded uniform draw among the "
                              "candidates scored more than min_margin below the chosen one")
    seed: int = 0
    min_margin: float = Field(0.0, ge=0.0, description="a pair needs chosen - rejected score > this")


# ---------------------------------------------------------------------------------------------- rejected selection
# A rule gets the prompt's scores (sample order), the chosen index, the margin and the prompt's rng, and returns
# the rejected index, or None when no candidate is more than the margin below the chosen one.
RejectedRule = Callable[[np.ndarray, int, float, np.random.Generator], "int | None"]


def _lowest(s: np.ndarray, i: int, margin: float, rng: np.random.Generator) -> int | None:
    j = int(np.argmin(s))  # ties: the first in sample order
    return j if s[i] - s[j] > margin else None


def _random_other(s: np.ndarray, i: int, margin: float, rng: np.random.Generator) -> int | None:
    lower = np.flatnonzero(s[i] - s > margin)
    return int(rng.choice(lower)) if len(lower) else None


REJECTED: dict[str, RejectedRule] = {"lowest": _lowest, "random_other": _random_other}


def _prompt_rng(seed: int, prompt_id: str) -> np.random.Generator:
    # One stream per (seed, prompt): a prompt's draw does not depend on which other prompts are in the table.
    return np.random.default_rng([seed, int(hashlib.sha256(str(prompt_id).encode()).hexdigest()[:15], 16)])


def hybrid_pairs(judged: pd.DataFrame, rejected: str = "lowest", seed: int = 0,
                 min_margin: float = 0.0) -> tuple[pd.DataFrame, dict]:
    """One pair per prompt from judged candidates: (pairs, counts).

    chosen = the highest score; among equal highest scores the first in ``sample_index`` order, i.e. a dataset
    response before an on-policy sample (``candidates_table`` puts them first). rejected = ``REJECTED[rejected]``:
    ``lowest`` the lowest score (ties: the first in sample order), ``random_other`` a uniform draw, seeded by
    (seed, prompt_id), among the candidates scored more than ``min_margin`` below the chosen one, so a candidate
    tied with the chosen one is never rejected. A prompt with no candidate more than ``min_margin`` below its best
    gives no pair (counted in ``n_prompts_tied``). Counts report, per side, how many responses came from each source
    and the share of on-policy ones."""
    rule = REJECTED[rejected]
    rows, n_tied = [], 0
    for pid, g in judged.groupby("prompt_id", sort=False):
        g = g.sort_values("sample_index").reset_index(drop=True)
        s = g["score"].to_numpy(dtype=float)
        i = int(np.argmax(s))
        j = rule(s, i, min_margin, _prompt_rng(seed, pid))
        if j is None:
            n_tied += 1
            continue
        row = {c: g.at[0, c] for c in PAIR_PROMPT_COLUMNS if c in g.columns}
        for side, k in (("chosen", i), ("rejected", j)):
            row.update({f"{side}_{c}": g.at[k, c] for c in [*SIDE_COLUMNS, "dataset_score"] if c in g.columns})
        rows.append(row)
    pairs = pd.DataFrame(rows).rename(columns={"chosen_response": "chosen", "rejected_response": "rejected"})
    n = len(pairs)
    counts: dict = {"n_prompts": int(judged["prompt_id"].nunique()), "n_pairs": n, "n_prompts_tied": n_tied,
                    "mean_score_gap": float((pairs["chosen_score"] - pairs["rejected_score"]).mean()) if n else 0.0}
    for side in ("chosen", "rejected"):
        sources = pairs[f"{side}_response_source"] if n else pd.Series([], dtype=str)
        for src in RESPONSE_SOURCES:
            counts[f"{side}_{src}"] = int((sources == src).sum())
        counts[f"on_policy_{side}_share"] = counts[f"{side}_on_policy"] / n if n else float("nan")
    return pairs, counts


def run(judgments: ArtifactRef, cfg: HybridOptions, work_dir: str | Path) -> ArtifactRef:
    """One pair per prompt of the judged candidates (``hybrid_pairs``); ValueError when every prompt is tied."""
    config = cfg.model_dump()
    inputs = {"judgments": judgments.sha256}
    out = output_dir(work_dir, "hybrid_pair", inputs, config)
    if done(out):
        return ref_from_dir(out)
    pairs, counts = hybrid_pairs(read_table(judgments), cfg.rejected, cfg.seed, cfg.min_margin)
    if counts["n_pairs"] == 0:
        raise ValueError(f"no preference pairs: all {counts['n_prompts']} prompts had tied scores "
                         f"(margin > {cfg.min_margin} required)")
    return write_table(pairs, out, name="pairs", producer="hybrid_pair", inputs=inputs, config=config,
                       extra={"metrics": counts})
