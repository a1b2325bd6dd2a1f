"""The annotate stage: score every sample of a generations table with the configured judge.

Config: ``judge:``, one of the judges' option models (``JudgeConfig``, ``pipeline_lib/judges/config.py``).

Adds ``score`` (the judge's pointwise view) and SPPO's win-probability columns (``pipeline_lib/winprob.py``) to the
table; verdicts go through the judgment cache (``judges/cache.py``), so re-annotating the same samples costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.judges.base import JudgeOptions, build_judge
from pipeline_lib.judges.config import JudgeConfig  # noqa: F401  (the stage's config section)
from pipeline_lib.judges.batching import items_from_rows, judge_in_chunks
from pipeline_lib.report.progress import Progress
from pipeline_lib.stage import done, output_dir
from pipeline_lib.winprob import win_probability_columns


def run(generations: ArtifactRef, judge_cfg: JudgeOptions | Mapping[str, Any], work_dir: str | Path,
        quiet: bool = False) -> ArtifactRef:
    """The judgments table: ``generations`` with ``score``, the win-probability columns and the judge's hash.
    ``judge_cfg``: the round's typed ``judge`` section (a mapping is parsed first)."""
    from pipeline_lib.judges.cache import CachedJudge

    # Judgments are cached by (judge identity, prompt, response): re-annotating the same samples costs nothing.
    judge = CachedJudge(build_judge(judge_cfg), Path(work_dir) / "cache" / "judgments")
    identity = judge.identity()
    inputs = {"generations": generations.sha256}
    out = output_dir(work_dir, "annotate", inputs, identity)
    if done(out):
        return ref_from_dir(out)
    df = read_table(generations)
    try:
        items = items_from_rows(df)
        # Each slice's verdicts go to the judgment cache as it finishes: a crash keeps the slices already judged.
        with Progress(len(items), "annotate", "responses", quiet=quiet) as progress:
            scores = judge_in_chunks(judge.score, items, progress, group=lambda it: it.prompt)
        df["score"] = scores
        df = df.assign(**win_probability_columns(judge, df, items))  # SPPO's P̂, both forms (winprob.py)
    finally:
        judge.close()
    df["judge"] = judge.identity_hash()
    metrics = {"n_judged": len(df), "mean_score": float(scores.mean()) if len(df) else float("nan"),
               "std_score": float(scores.std()) if len(df) else float("nan")}
    return write_table(df, out, name="judgments", producer="annotate", inputs=inputs, config=identity,
                       extra={"metrics": metrics, "judge": identity})
