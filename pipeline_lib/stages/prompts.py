"""The prompts stage: materialise a prompt set as a table artifact (the root of every round's lineage).

Config: ``prompts:``, one of the prompt sources (``PromptSource``: builtin, hub, jsonl, csv, parquet; the sources and
the builtin generator are in ``pipeline_lib/prompts/``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.artifacts import ArtifactRef, ref_from_dir, sha256_json, write_table
from pipeline_lib.prompts.sources import PromptSetOptions, PromptSource, load_prompt_table  # noqa: F401
from pipeline_lib.stage import done, output_dir


def run(cfg: PromptSetOptions, split: str, n: int, work_dir: str | Path) -> ArtifactRef:
    """Build ``n`` prompts of ``split`` ("train" or "heldout") from the configured source. Every source row is
    validated first (DataError: file, row, reason), so nothing is written for a bad file."""
    df = load_prompt_table(cfg, split, n)
    # Keyed by content: a file edited in place gives a new artifact; the same prompts (e.g. the held-out set of
    # every round) the same one.
    out = output_dir(work_dir, "prompts", {"content": sha256_json(df.to_dict("records"))}, {"split": split})
    if done(out):
        return ref_from_dir(out)
    return write_table(df, out, name=f"prompts-{split}", producer="prompts",
                       config={**cfg.model_dump(), "split": split, "n": n}, extra={"metrics": {"n_prompts": len(df)}})
