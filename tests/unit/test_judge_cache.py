"""Judgment cache: hits and misses, zero judge calls on a re-run, identity/meta changes miss, pairwise entries are
shared by both orders, NaN is not stored, several processes write the same cache directory at once, and storage is
immutable segments (no file written twice, nothing half-written visible)."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.judges.base import Item, Judge, JudgeOptions
from pipeline_lib.judges.cache import CachedJudge, JudgmentCache

REPO = Path(__file__).resolve().parents[2]


class LengthOptions(JudgeOptions):
    bonus: float = 0.0


class LengthJudge(Judge):
    """Pointwise: score = number of words + bonus; records every call it receives."""

    kind = "length"
    Options = LengthOptions

    def __init__(self, options):
        super().__init__(options)
        self.calls: list[list[str]] = []

    def score(self, items):
        self.calls.append([it.response for it in items])
        return np.array([len(it.response.split()) + self.options.bonus for it in items], dtype=float)


class TablePairwise(Judge):
    """Pairwise only: P(x beats y) from a table; records every compare call."""

    kind = "table_pairwise"
    P = {("x", "y"): 0.8, ("x", "z"): 0.6, ("y", "z"): 0.3, ("w", "x"): 0.1, ("w", "y"): 0.5, ("w", "z"): 0.9}

    def __init__(self, options):
        super().__init__(options)
        self.calls: list[tuple[str, str]] = []

    def compare(self, prompt, a, b, meta=None):
        self.calls.append((a, b))
        return self.P[(a, b)] if (a, b) in self.P else 1.0 - self.P[(b, a)]


def length_judge(bonus=0.0):
    return LengthJudge(LengthOptions(kind="length", bonus=bonus))


ITEMS = [Item("p", "one"), Item("p", "two words"), Item("q", "three more words")]


def test_misses_go_to_the_judge_once_and_hits_do_not(tmp_path):
    judge = length_judge()
    cached = CachedJudge(judge, tmp_path)
    np.testing.assert_array_equal(cached.score(ITEMS), [1, 2, 3])
    assert judge.calls == [["one", "two words", "three more words"]]
    assert (cached.stats["score_hits"], cached.stats["score_misses"]) == (0, 3)

    # 3 known items + 1 new one: only the new one reaches the judge.
    more = ITEMS + [Item("q", "a b c d")]
    np.testing.assert_array_equal(cached.score(more), [1, 2, 3, 4])
    assert judge.calls[1:] == [["a b c d"]]
    assert (cached.stats["score_hits"], cached.stats["score_misses"]) == (3, 4)


def test_second_run_makes_zero_judge_calls(tmp_path):
    first = length_judge()
    CachedJudge(first, tmp_path).score(ITEMS)
    second = length_judge()  # a new judge and a new cache handle, as in a re-run of the stage
    again = CachedJudge(second, JudgmentCache(tmp_path))
    np.testing.assert_array_equal(again.score(ITEMS), [1, 2, 3])
    assert second.calls == []
    assert again.stats["score_hits"] == 3


def test_changed_identity_or_meta_misses(tmp_path):
    CachedJudge(length_judge(), tmp_path).score(ITEMS)
    other = length_judge(bonus=10.0)
    np.testing.assert_array_equal(CachedJudge(other, tmp_path).score(ITEMS), [11, 12, 13])
    assert len(other.calls) == 1  # the changed option is a different judge: nothing reused

    same = length_judge()
    CachedJudge(same, tmp_path).score([Item("p", "one", {"category": "poem"})])
    assert same.calls == [["one"]]  # same text, different meta: a different judgment


def test_duplicate_items_are_judged_once(tmp_path):
    judge = length_judge()
    out = CachedJudge(judge, tmp_path).score([Item("p", "x y"), Item("p", "x y"), Item("p", "z")])
    np.testing.assert_array_equal(out, [2, 2, 1])
    assert judge.calls == [["x y", "z"]]


def test_pairwise_entries_serve_both_orders_and_scores(tmp_path):
    """rank(x, y, z) makes the 3 unordered comparisons once; afterwards compare in either order, rank, and the
    mean-win-probability scores (x: (0.8 + 0.6) / 2 = 0.7, y: (0.2 + 0.3) / 2 = 0.25, z: (0.4 + 0.7) / 2 = 0.55)
    come from the cache with no judge call."""
    judge = TablePairwise(JudgeOptions(kind="table_pairwise"))
    cached = CachedJudge(judge, tmp_path)
    m = cached.rank("p", ["x", "y", "z"])
    np.testing.assert_allclose(m, [[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]], atol=1e-12)
    assert len(judge.calls) == 3
    cached.close()  # pending pairwise verdicts reach storage at the end of a score call or at close

    fresh = TablePairwise(JudgeOptions(kind="table_pairwise"))
    again = CachedJudge(fresh, tmp_path)
    assert again.compare("p", "y", "x") == pytest.approx(0.2, abs=1e-12)
    assert again.compare("p", "x", "y") == pytest.approx(0.8, abs=1e-12)
    np.testing.assert_allclose(again.rank("p", ["z", "x", "y"]), [[0.5, 0.4, 0.7], [0.6, 0.5, 0.8], [0.3, 0.2, 0.5]],
                               atol=1e-12)
    np.testing.assert_allclose(again.score([Item("p", "x"), Item("p", "y"), Item("p", "z")]), [0.7, 0.25, 0.55],
                               atol=1e-12)
    assert fresh.calls == []

    # A fourth candidate costs exactly its 3 new comparisons.
    again.rank("p", ["x", "y", "z", "w"])
    assert sorted(map(frozenset, fresh.calls)) == sorted(map(frozenset, [("w", "x"), ("w", "y"), ("w", "z")]))


def test_nan_verdicts_are_not_stored(tmp_path):
    class Flaky(LengthJudge):
        def score(self, items):
            super().score(items)
            return np.array([math.nan if it.response == "bad" else 1.0 for it in items])

    judge = Flaky(LengthOptions(kind="length"))
    cached = CachedJudge(judge, tmp_path)
    first = cached.score([Item("p", "bad"), Item("p", "good")])
    assert math.isnan(first[0]) and first[1] == 1.0
    cached.score([Item("p", "bad"), Item("p", "good")])
    assert judge.calls == [["bad", "good"], ["bad"]]  # the failed one is retried, the good one is not


def test_get_many_returns_only_present_keys_in_large_batches(tmp_path):
    cache = JudgmentCache(tmp_path)
    cache.put_many([(f"k{i}", float(i)) for i in range(0, 1200, 2)], judge="j")
    got = cache.get_many([f"k{i}" for i in range(1200)])  # more keys than one SELECT ... IN chunk
    assert got == {f"k{i}": float(i) for i in range(0, 1200, 2)}
    cache.put_many([("k0", 99.0)])  # an existing key keeps its first value
    assert cache.get_many(["k0"]) == {"k0": 0.0}


WRITER = textwrap.dedent("""
    import sys
    from pipeline_lib.judges.cache import JudgmentCache
    cache = JudgmentCache(sys.argv[1])
    start = int(sys.argv[2])
    for lo in range(start, start + 300, 10):  # 30 small segments, interleaving with the other writers
        cache.put_many([(f"k{i}", float(i)) for i in range(lo, lo + 10)], judge="w")
""")


def test_concurrent_writers_in_separate_processes(tmp_path):
    """Three processes write overlapping key ranges [0, 300), [150, 450), [300, 600) at the same time."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for start in (0, 150, 300)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cache = JudgmentCache(tmp_path)
    assert len(cache) == 600
    assert cache.get_many([f"k{i}" for i in range(600)]) == {f"k{i}": float(i) for i in range(600)}


def test_segments_are_immutable_whole_files_and_other_handles_see_new_ones(tmp_path):
    """Every put is one new file, published by rename (no temporary file left, none rewritten); a handle that read
    the cache before another process wrote sees the new verdicts on its next lookup."""
    reader = JudgmentCache(tmp_path)
    assert reader.get_many(["a", "b"]) == {}
    writer = JudgmentCache(tmp_path)
    writer.put_many([("a", 1.0)])
    seg_dir = tmp_path / "segments"
    first = {p.name: p.stat().st_mtime_ns for p in seg_dir.iterdir()}
    writer.put_many([("a", 5.0), ("b", 2.0)])  # 'a' is known: only 'b' is written
    files = sorted(seg_dir.iterdir())
    assert len(files) == 2 and not any(p.name.startswith(".") for p in files)
    assert all(p.stat().st_mtime_ns == first[p.name] for p in files if p.name in first)  # never rewritten
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(files[1]).column("key").to_pylist()) == ["b"]
    assert reader.get_many(["a", "b"]) == {"a": 1.0, "b": 2.0}


def test_pairwise_verdicts_of_many_prompts_make_one_segment(tmp_path):
    """A pairwise judge ranks prompt by prompt (annotate's win-probabilities); its verdicts are buffered and written
    as one segment at close, not one file per prompt."""
    judge = TablePairwise(JudgeOptions(kind="table_pairwise"))
    cached = CachedJudge(judge, tmp_path)
    for i in range(10):
        cached.rank(f"p{i}", ["x", "y", "z"])
    assert not list((tmp_path / "segments").iterdir())
    cached.close()
    assert len(list((tmp_path / "segments").iterdir())) == 1
    assert len(JudgmentCache(tmp_path)) == 30
