"""The hybrid-prompts stage (a hybrid round's first step after ``dataset_pairs``): the preference dataset's prompts
as a prompt table, which collect samples K responses for. The hybrid round: ``stages/hybrid_pair.py``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.prompts.sources import PROMPT_COLUMNS
from pipeline_lib.stage import done, output_dir


def prompts_from_pairs(dataset_pairs: pd.DataFrame) -> pd.DataFrame:
    """The prompt table (one row per prompt, first-appearance order) that collect samples for a hybrid round.
    Collect renders a prompt as one user message, so multi-turn dataset conversations are refused here, before any
    sampling (column ``single_turn`` of the dataset pairs)."""
    multi = dataset_pairs.loc[~dataset_pairs["single_turn"].astype(bool), "source_row"].tolist()
    if multi:
        raise ValueError(f"hybrid rounds need single-turn prompts (collect renders one user message); "
                         f"{len(multi)} pair(s) continue a longer conversation, e.g. source rows {multi[:5]}")
    first = dataset_pairs.drop_duplicates("prompt_id")
    return pd.DataFrame({"prompt_id": first["prompt_id"].tolist(), "prompt": first["prompt"].tolist(),
                         "instruction_id_list": [[] for _ in range(len(first))], "kwargs": "[]",
                         "base_task": first["prompt"].tolist(), "split": "train"}, columns=PROMPT_COLUMNS)


def run(dataset_pairs: ArtifactRef, work_dir: str | Path) -> ArtifactRef:
    """The prompt table of a hybrid round: the dataset's prompts, for collect."""
    inputs = {"dataset_pairs": dataset_pairs.sha256}
    out = output_dir(work_dir, "hybrid_prompts", inputs, {})
    if done(out):
        return ref_from_dir(out)
    df = prompts_from_pairs(read_table(dataset_pairs))
    return write_table(df, out, name="prompts-train", producer="hybrid_prompts", inputs=inputs, config={},
                       extra={"metrics": {"n_prompts": len(df)}})
