"""Judgment cache: re-annotating the same samples with the same judge costs nothing.

A judgment is keyed by the content hash of everything that determines it: the judge's identity hash (kind, options
that change verdicts, model content hash), the view (``score`` or ``compare``), the prompt, the response(s), and a
hash of the item's ``meta``.

Storage: a log of immutable Parquet segments, ``<cache_dir>/segments/<time ns>-<random>.parquet``, one per flush. A
segment is written under a temporary name and renamed into place, and is never changed afterwards; no file is
written by two processes and no lock is taken. So the cache is safe wherever ``work_dir`` lives, a network
filesystem shared by many hosts included (NFS, EFS, CephFS: any POSIX rename), where the SQLite file in WAL mode used
before was not: WAL keeps its index in shared memory, which only processes of one host can share (sqlite.org/wal.html,
"WAL does not work over a network filesystem"). A reader loads each segment once (immutable: what it read stays
true) and only new segments on later lookups; a key written twice (two shards of a pairwise judge racing on the same
pair) keeps the value it first read. A ``judgments.sqlite`` left by an older version is not read: a cache miss
costs a judge call, nothing else.

:class:`CachedJudge` wraps any judge and sends only the misses to it:
- a judge with a native ``score`` is cached per item; ``compare`` and ``rank`` then come from the cached scores
  through the base class's Bradley-Terry adapter;
- a pairwise-only judge (PairRM, pairwise LLM judges) is cached per unordered pair: the key sorts the two responses
  and the stored value is P(first sorted response wins), so (a, b) and (b, a) share one entry. Its pointwise
  ``score`` is a mean win probability against the other candidates of the same prompt, which depends on that set,
  so it is never cached itself: it is rebuilt from cached pairs.
Fresh verdicts are written as one segment at the end of each ``score`` call (annotate calls it once per slice, so a
crash keeps the slices already judged), when FLUSH_AT are pending, and at ``close``.

NaN verdicts (a judge that failed on an item) are returned but not stored, so the next run retries them.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline_lib.artifacts import sha256_json
from pipeline_lib.judges.base import Item, Judge, pairwise_matrix

SEGMENTS = "segments"
FLUSH_AT = 4096  # pending verdicts that trigger a segment between score calls (pairwise rank calls per prompt)


def meta_hash(meta: Mapping[str, Any] | None) -> str:
    return sha256_json(dict(meta or {}))[:16]


def score_key(judge_hash: str, item: Item) -> str:
    return sha256_json([judge_hash, "score", item.prompt, item.response, meta_hash(item.meta)])


def compare_key(judge_hash: str, prompt: str, a: str, b: str, meta: Mapping[str, Any] | None) -> tuple[str, bool]:
    """Key of the unordered pair {a, b} and whether (a, b) is the stored order (else the value is P(b wins))."""
    first, second = (a, b) if a <= b else (b, a)
    return sha256_json([judge_hash, "compare", prompt, first, second, meta_hash(meta)]), a <= b


class JudgmentCache:
    """Float judgments by key, as immutable segments under ``<cache_dir>/segments/``; safe across threads,
    processes and hosts (one handle per thread: a handle's in-memory index is not locked)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir) / SEGMENTS
        self.dir.mkdir(parents=True, exist_ok=True)
        self._values: dict[str, float] = {}
        self._seen: set[str] = set()

    def _refresh(self) -> None:
        """Load the segments this process has not read yet, oldest name first (first value of a key wins)."""
        import pyarrow.parquet as pq

        new = sorted(e.name for e in os.scandir(self.dir) if e.name.endswith(".parquet") and e.name not in self._seen)
        for name in new:
            t = pq.read_table(self.dir / name, columns=["key", "value"])
            for k, v in zip(t.column("key").to_pylist(), t.column("value").to_pylist()):
                self._values.setdefault(k, v)
            self._seen.add(name)

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        """The stored values of those ``keys`` that are present."""
        self._refresh()
        return {k: self._values[k] for k in dict.fromkeys(keys) if k in self._values}

    def put_many(self, items: Iterable[tuple[str, float]], judge: str = "") -> int:
        """Store (key, value) pairs as one new segment; a key already stored keeps its value (same key, same
        judgment) and NaN values are skipped. Returns the number of rows written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._refresh()
        rows = {}
        for k, v in items:
            if not math.isnan(float(v)) and k not in self._values:
                rows.setdefault(k, float(v))
        if not rows:
            return 0
        table = pa.table({"key": list(rows), "value": list(rows.values()), "judge": [judge] * len(rows),
                          "created_at": [time.time()] * len(rows)})
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / name)  # readers see the whole segment or none of it
        self._seen.add(name)
        for k, v in rows.items():
            self._values.setdefault(k, v)
        return len(rows)

    def __len__(self) -> int:
        self._refresh()
        return len(self._values)


class CachedJudge(Judge):
    """A judge whose verdicts are looked up in a :class:`JudgmentCache` first; only misses reach ``judge``.
    ``stats`` counts hits and misses per view (``score`` items, ``compare`` pairs)."""

    def __init__(self, judge: Judge, cache: JudgmentCache | str | Path):
        super().__init__(judge.options)
        self.judge = judge
        self.kind = judge.kind
        self.cache = cache if isinstance(cache, JudgmentCache) else JudgmentCache(cache)
        self.judge_hash = judge.identity_hash()
        self.stats = {"score_hits": 0, "score_misses": 0, "compare_hits": 0, "compare_misses": 0}
        self._pending: dict[str, float] = {}  # fresh verdicts not yet in a segment

    def _lookup(self, keys: Sequence[str]) -> dict[str, float]:
        found = self.cache.get_many([k for k in keys if k not in self._pending])
        found.update({k: self._pending[k] for k in keys if k in self._pending})
        return found

    def _remember(self, fresh: Mapping[str, float]) -> None:
        self._pending.update({k: v for k, v in fresh.items() if not math.isnan(v)})  # a failed verdict is retried
        if len(self._pending) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write the pending verdicts as one segment."""
        if self._pending:
            self.cache.put_many(self._pending.items(), judge=self.judge_hash)
            self._pending = {}

    @property
    def native_score(self) -> bool:
        return self.judge.native_score

    def identity(self) -> dict[str, Any]:
        return self.judge.identity()

    # -- pointwise ----------------------------------------------------------------------------------------------
    def score(self, items: Sequence[Item]) -> np.ndarray:
        if not self.native_score:  # mean win probability over cached pairs (base adapter via self.rank)
            out = Judge.score(self, items)
            self.flush()
            return out
        keys = [score_key(self.judge_hash, it) for it in items]
        found = self._lookup(keys)
        todo = {k: it for k, it in zip(keys, items) if k not in found}  # de-duplicated misses
        n_missing = sum(k not in found for k in keys)
        self.stats["score_hits"] += len(items) - n_missing
        self.stats["score_misses"] += n_missing
        if todo:
            fresh = self.judge.score(list(todo.values()))
            computed = dict(zip(todo, (float(v) for v in fresh)))
            self._remember(computed)
            found.update(computed)
        self.flush()  # one segment per score call: annotate's slices reach storage as they finish
        return np.array([found[k] for k in keys], dtype=float)

    # -- pairwise -----------------------------------------------------------------------------------------------
    def compare(self, prompt: str, a: str, b: str, meta: Mapping[str, Any] | None = None) -> float:
        if self.native_score:  # Bradley-Terry on cached scores
            return Judge.compare(self, prompt, a, b, meta)
        return float(self._pairs(prompt, [(a, b)], meta, [a, b])[0])

    def rank(self, prompt: str, candidates: Sequence[str], meta: Mapping[str, Any] | None = None) -> np.ndarray:
        if self.native_score:
            return Judge.rank(self, prompt, candidates, meta)
        return pairwise_matrix(len(candidates), lambda pairs: self._pairs(
            prompt, [(candidates[i], candidates[j]) for i, j in pairs], meta, list(candidates)))

    def _pairs(self, prompt: str, pairs: list[tuple[str, str]], meta: Mapping[str, Any] | None,
               candidates: list[str]) -> list[float]:
        """P(a beats b) for each pair, from the cache where present; misses go to the judge, in one ``rank``
        call over ``candidates`` when nothing is cached (the judge batches it), else one ``compare`` each."""
        keyed = [compare_key(self.judge_hash, prompt, a, b, meta) for a, b in pairs]
        found = self._lookup([k for k, _ in keyed])
        missing = [(pair, key, stored_order) for pair, (key, stored_order) in zip(pairs, keyed) if key not in found]
        self.stats["compare_hits"] += len(pairs) - len(missing)
        self.stats["compare_misses"] += len(missing)
        if missing:
            fresh: dict[str, float] = {}
            if len(missing) == len(pairs) and len(pairs) > 1:
                m = self.judge.rank(prompt, candidates, meta)
                index = {c: i for i, c in enumerate(candidates)}
                for (a, b), key, stored_order in missing:
                    p = float(m[index[a], index[b]])
                    fresh[key] = p if stored_order else 1.0 - p
            else:
                for (a, b), key, stored_order in missing:
                    if key not in fresh:
                        p = float(self.judge.compare(prompt, a, b, meta))
                        fresh[key] = p if stored_order else 1.0 - p
            self._remember(fresh)
            found.update(fresh)
        return [found[key] if stored_order else 1.0 - found[key] for key, stored_order in keyed]

    def close(self) -> None:
        self.flush()
        self.judge.close()
