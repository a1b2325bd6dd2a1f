"""Judging a table in slices: judge items from a table's rows, and verdicts over many items with progress shown.

Used by every stage that judges (annotate, the held-out evaluation, the benchmarks).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from pipeline_lib.judges.base import Item
from pipeline_lib.report.progress import Progress

# Judging in slices so progress can be shown: every slice ends with the judge's batch or request pool draining,
# so there are few slices (~CHUNKS per stage) and each is large (>= MIN_CHUNK items, a full vLLM batch).
CHUNKS, MIN_CHUNK = 20, 256


def items_from_rows(df) -> list[Item]:
    """Judge items from a table with prompt, response and (optional) IFEval constraint columns."""
    has_rules = "instruction_id_list" in df.columns
    out = []
    for r in df.itertuples(index=False):
        meta = {}
        if has_rules:
            meta = {"instruction_id_list": list(r.instruction_id_list), "kwargs": json.loads(r.kwargs)}
        out.append(Item(prompt=r.prompt, response=r.response, meta=meta))
    return out


def judge_in_chunks(fn: Callable[[list], Sequence[float]], items: Sequence, progress: Progress,
                    group: Callable[[Any], Hashable] | None = None, chunks: int = CHUNKS,
                    min_chunk: int = MIN_CHUNK) -> np.ndarray:
    """``fn`` (one verdict per item, e.g. ``judge.score``) over ``items`` in about ``chunks`` slices of at least
    ``min_chunk`` items, ``progress`` advanced by each slice's size and showing the mean verdict so far (NaN
    verdicts left out). Items with equal ``group(item)`` stay in one slice: a pairwise judge's ``score`` compares the
    responses to the same prompt with each other, so a slice must hold all of them to give the verdicts one call over
    all items gives."""
    by_group: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        by_group.setdefault(group(it) if group else i, []).append(i)
    size = max(min_chunk, math.ceil(len(items) / chunks))
    out = np.zeros(len(items))
    batch: list[int] = []
    total, counted = 0.0, 0
    progress.set(progress.done)  # the start line, and the rate's origin: the judge's time only, its loading included
    for n, idx in enumerate(by_group.values(), start=1):
        batch += idx
        if len(batch) >= size or n == len(by_group):
            verdicts = np.asarray(fn([items[i] for i in batch]), dtype=float)
            out[batch] = verdicts
            total, counted = total + np.nansum(verdicts), counted + int((~np.isnan(verdicts)).sum())
            progress.update(len(batch), extra=f"mean {total / counted:.3f}" if counted else "mean ?")
            batch = []
    return out
