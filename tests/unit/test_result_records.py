"""tasks.results on its own (no server): what a record holds on disk, and how it reads back elsewhere."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pipeline_lib.artifacts import write_table
from tasks.results import ArtifactJSON, WorkDirResults


def _record(obj, key: str) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=key, serializer=ArtifactJSON()),
                        result=obj).serialize()


def _read(store: WorkDirResults, key: str):
    from prefect._internal.result_records import ResultRecord

    return ResultRecord.deserialize(store.read_path(key, _sync=True)).result


def test_dict_of_references_is_stored_relative_and_read_back_in_a_copy(tmp_path):
    """The evaluation tasks return {benchmark: ArtifactRef}. On disk the paths are relative to the work dir; read
    from a copied work dir they point into the copy."""
    a = tmp_path / "a"
    refs = {name: write_table(pd.DataFrame({"x": [i]}), a / "artifacts" / "data" / name, name=name, producer="t")
            for i, name in enumerate(["alpaca_eval", "mt_bench"])}
    store = WorkDirResults(basepath=str(a / "prefect-results"))
    store.write_path("k1", _record(refs, "k1"), _sync=True)
    on_disk = json.loads((a / "prefect-results" / "k1").read_bytes())
    assert json.loads(on_disk["result"])["dict"]["mt_bench"]["ArtifactRef"]["path"] == "artifacts/data/mt_bench"
    assert _read(store, "k1") == refs

    shutil.copytree(a, tmp_path / "b")
    got = _read(WorkDirResults(basepath=str(tmp_path / "b" / "prefect-results")), "k1")
    assert {k: v.path for k, v in got.items()} == {k: str(tmp_path / "b" / "artifacts" / "data" / k) for k in refs}
    assert {k: v.sha256 for k, v in got.items()} == {k: v.sha256 for k, v in refs.items()}

    shutil.rmtree(tmp_path / "b" / "artifacts" / "data" / "alpaca_eval")  # one of the two is gone: no hit
    with pytest.raises(ValueError, match="alpaca_eval is missing"):
        _read(WorkDirResults(basepath=str(tmp_path / "b" / "prefect-results")), "k1")


def test_a_shard_split_list_is_a_record_and_every_shard_is_checked(tmp_path):
    """The split task returns one ArtifactRef per shard: stored relative, read back, and no hit once a shard is
    gone (before, a list could not be stored at all and the split's transaction rolled back on every run)."""
    a = tmp_path / "a"
    refs = [write_table(pd.DataFrame({"x": [i]}), a / "artifacts" / "split" / f"s{i}", name=f"s{i}", producer="t")
            for i in range(2)]
    store = WorkDirResults(basepath=str(a / "prefect-results"))
    store.write_path("k", _record(refs, "k"), _sync=True)
    on_disk = json.loads(json.loads((a / "prefect-results" / "k").read_bytes())["result"])
    assert [r["ArtifactRef"]["path"] for r in on_disk["list"]] == ["artifacts/split/s0", "artifacts/split/s1"]
    assert _read(store, "k") == refs
    shutil.rmtree(a / "artifacts" / "split" / "s1")
    with pytest.raises(ValueError, match="s1 is missing"):
        _read(store, "k")


def test_only_known_types_are_written():
    with pytest.raises(TypeError, match="not int"):
        ArtifactJSON().dumps([1, 2])
    with pytest.raises(ValueError, match="not an alignflow task result type: 'os.system'"):
        ArtifactJSON().loads(b'{"os.system": "echo"}')


def test_lock_manager_travels_to_another_process_without_its_held_locks(tmp_path):
    """Ray and Dask pickle a task, with its cache policy and this lock manager, to run it on a worker: the copy names
    the same lock directory, holds none of the sender's locks, and can take a lock of its own."""
    import cloudpickle

    from tasks.results import FlockLocks

    here = FlockLocks(tmp_path)
    assert here.acquire_lock("k1", "run-a")
    there = cloudpickle.loads(cloudpickle.dumps(here))
    assert there.directory == here.directory and not there.is_locked("k2")
    assert there.acquire_lock("k2", "run-b") and there.is_locked("k2")
    there.release_lock("k2", "run-b")
    here.release_lock("k1", "run-a")
    assert not here.is_locked("k1")


def test_the_dry_run_plan_reads_records_as_the_run_does(tmp_path):
    """`--dry-run` predicts a hit for a record the run wrote (alignflow JSON), and a miss -- without unpickling it --
    for a planted pickle record, as the run's own storage does."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from flows.plan import _Planner

    ref = write_table(pd.DataFrame({"x": [1]}), tmp_path / "artifacts" / "collect" / "k", name="g", producer="t")
    store = WorkDirResults(basepath=str(tmp_path / "prefect-results"))
    store.write_path("good", _record(ref, "good"), _sync=True)
    marker = tmp_path / "pwned"
    planted = ResultRecord(metadata=ResultRecordMetadata(storage_key="bad", serializer=PickleSerializer()),
                           result=_Planted(str(marker))).serialize()
    (tmp_path / "prefect-results" / "bad").write_bytes(planted)
    planner = _Planner(str(tmp_path))
    assert planner.store.exists("good") and planner.store.read("good").result == ref
    assert not planner.store.exists("bad") and not marker.exists()


class _Planted:
    """Unpickling it creates a file: the sign that a planted record was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)
