"""Rounds at the same time on one MLflow store (issue 22, finding 5): a fresh SQLite store is created once, one
parent run per round key, one first champion, and promotion is a compare-and-set. Real processes (fork) released
together by a barrier, a real SQLite store."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from pathlib import Path

import pytest

from pipeline_lib.artifacts import ArtifactRef

N = 4


def _together(target, args_per_proc: list[tuple]) -> list:
    """Run ``target(*args)`` in one forked process each, all released at once; their results (or tracebacks)."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(args_per_proc)), ctx.Queue()

    def run(i, args):
        try:
            barrier.wait(timeout=60)
            results.put((i, "ok", target(*args)))
        except BaseException:  # noqa: BLE001
            results.put((i, "error", traceback.format_exc()))

    procs = [ctx.Process(target=run, args=(i, a)) for i, a in enumerate(args_per_proc)]
    for p in procs:
        p.start()
    out = dict((i, (status, value)) for i, status, value in (results.get(timeout=180) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    return [out[i] for i in range(len(procs))]


def _open_and_start(uri: str) -> str:
    from pipeline_lib.lineage import RoundLineage

    return RoundLineage(uri, "race").start_round("same-round-key", "round", {"a": 1}, {})


def test_fresh_store_and_parent_run_under_concurrent_rounds(tmp_path):
    """Four rounds open a store that does not exist yet and start the same round. Before: one died with
    "table ... already exists" (both created the schema); and each created its own parent run. Now all succeed and
    agree on one parent run."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    out = _together(_open_and_start, [(uri,)] * N)
    errors = [v for s, v in out if s == "error"]
    assert not errors, errors[0]
    assert len({v for _, v in out}) == 1

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    assert len(c.search_runs([c.get_experiment_by_name("race").experiment_id])) == 1


def _model(d: Path, seed: int) -> ArtifactRef:
    from pipeline_lib.models import dir_hash

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(f'{{"seed": {seed}}}')
    return ArtifactRef(kind="model", name=f"m{seed}", path=str(d), sha256=dir_hash(d))


def _seed(uri: str, path: str, seed: int) -> str:
    from pipeline_lib.lineage import RoundLineage

    lin = RoundLineage(uri, "race")
    run = lin.start_round(f"seed-{seed}", "r", {}, {})
    return str(lin.seed_champion(run, _model(Path(path), seed), "race-policy").version)


def _promote(uri: str, expected: str, version: str) -> bool:
    from pipeline_lib.lineage import RoundLineage

    return RoundLineage(uri, "race").promote("race-policy", expected, version)[0]


def test_first_champion_and_promotion_are_compare_and_set(tmp_path):
    """Four first rounds from different policies: one seed becomes the champion and all four see it. Then four
    candidates, each evaluated against that champion, promote at once: exactly one moves the alias; the others are
    told the champion moved. Before, the champion read before evaluation was never checked again: every round set
    the alias, the last writer won."""
    from pipeline_lib.lineage import RoundLineage

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    _open_and_start(uri)  # the store exists; this test is about the registry
    seeds = _together(_seed, [(uri, str(tmp_path / f"seed{i}"), i) for i in range(N)])
    assert all(s == "ok" for s, _ in seeds), seeds
    champions = {v for _, v in seeds}
    assert len(champions) == 1
    (v1,) = champions

    lin = RoundLineage(uri, "race")
    run = lin.start_round("candidates", "r", {}, {})
    cands = [lin.register_checkpoint(run, _model(tmp_path / f"cand{i}", 100 + i), "race-policy", "candidate")
             for i in range(N)]
    out = _together(_promote, [(uri, v1, v) for v in cands])
    assert all(s == "ok" for s, _ in out), out
    assert sum(v for _, v in out) == 1
    winner = cands[[v for _, v in out].index(True)]
    assert str(lin.alias_version("race-policy", "champion").version) == winner

    moved, why = lin.promote("race-policy", v1, cands[0])
    assert not moved and why == (f"champion kept: it moved from v{v1} to v{winner} while this round ran, and the "
                                 f"candidate was compared with v{v1}")
