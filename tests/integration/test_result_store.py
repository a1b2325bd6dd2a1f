"""The stage tasks' result store on a real Prefect server (issue 22, findings 2, 3 and 5): a planted record never
executes, a cached result is used only where its artifact is and verifies, and two runs of the same stage at once
compute it once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_lib.artifacts import ArtifactRef, verify
from tests.integration._servers import BIN, REPO, prefect_server, start, stop, tail  # noqa: F401 (fixture)


@pytest.fixture
def api(prefect_server):  # noqa: F811
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        yield prefect_server


def _records(work: Path) -> list[Path]:
    return [p for p in (work / "prefect-results").iterdir() if p.is_file() and not p.name.startswith(".")]


class Planted:
    """Unpickling this creates ``marker``: what a malicious record in a shared work dir would do (here, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_hook(obj):
    """A JSON object hook named by import path in a record: Prefect's JSON serializer would import and call it."""
    Path(os.environ["ALIGNFLOW_TEST_MARKER"]).write_text("hook ran")
    return obj


def _planted_record(kind: str, key: str, marker: Path) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer, PickleSerializer

    if kind == "pickle":
        meta = ResultRecordMetadata(storage_key=key, serializer=PickleSerializer())
        return ResultRecord(metadata=meta, result=Planted(str(marker))).serialize()
    serializer = JSONSerializer(object_decoder=f"{__name__}.planted_hook")
    return ResultRecord(metadata=ResultRecordMetadata(storage_key=key, serializer=serializer),
                        result={"a": 1}).serialize()


@pytest.mark.parametrize("kind", ["pickle", "json-with-import-hook"])
def test_a_planted_record_is_never_executed(api, tmp_path, monkeypatch, kind):
    """Finding 2. Run the prompts stage, then replace its result record with a pickle (or a JSON record naming an
    object hook by import path) that creates a marker file when decoded. Control: Prefect's stock local storage
    decodes it at the mere existence check (the marker appears). Ours ignores it: the stage runs again, no marker,
    and its own record replaces the planted one."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    from tests.integration._result_flow import prompts_flow

    work, uri = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ALIGNFLOW_TEST_MARKER", str(marker))
    first = prompts_flow(str(work), uri)
    (record,) = _records(work)
    record.write_bytes(_planted_record(kind, record.name, marker))

    stock = ResultStore(result_storage=LocalFileSystem(basepath=str(record.parent)))
    stock.exists(record.name)
    assert marker.exists(), "the control: Prefect's stock storage decodes the planted record"
    marker.unlink()

    again = prompts_flow(str(work), uri)
    assert not marker.exists()
    assert again["state"] == "Completed" and again["ref"] == first["ref"]  # recomputed, same content
    written = json.loads(record.read_bytes())
    assert written["metadata"]["serializer"] == {"type": "alignflow-json"}
    assert prompts_flow(str(work), uri)["state"] == "Cached"


def test_a_result_whose_artifact_is_gone_or_corrupt_is_recomputed(api, tmp_path):
    """Finding 3. Delete the artifact a cached result points at: the re-run used to be a cache hit on a missing
    directory (every later stage failed with "no manifest at ..."); now it runs the stage again. Corrupt it in place:
    the directory is moved aside and rebuilt, never returned."""
    from tests.integration._result_flow import prompts_flow

    work, uri = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = prompts_flow(str(work), uri)
    path = Path(first["ref"]["path"])
    shutil.rmtree(path)
    again = prompts_flow(str(work), uri)
    assert again["state"] == "Completed" and again["ref"] == first["ref"]
    verify(ArtifactRef(**again["ref"]))

    (path / "data.parquet").write_bytes(b"not the table any more")
    third = prompts_flow(str(work), uri)
    assert third["state"] == "Completed"
    verify(ArtifactRef(**third["ref"]))
    assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1


def test_a_copied_work_dir_uses_its_own_artifacts(api, tmp_path):
    """Finding 3. Copy a work dir and run on the copy: cached results held absolute paths, so the copy read (and
    registered) the original's artifacts. Now records keep paths relative to the work dir: a hit, into the copy."""
    from tests.integration._result_flow import prompts_flow

    a, b, uri = tmp_path / "a", tmp_path / "b", f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = prompts_flow(str(a), uri)
    shutil.copytree(a, b)
    copy = prompts_flow(str(b), uri)
    assert copy["state"] == "Cached"
    assert Path(copy["ref"]["path"]).is_relative_to(b.resolve()) and copy["ref"]["sha256"] == first["ref"]["sha256"]
    shutil.rmtree(a)  # the copy does not need the original
    assert prompts_flow(str(b), uri)["state"] == "Cached"


@pytest.mark.slow
def test_two_runs_of_one_stage_compute_it_once(prefect_server, tmp_path):  # noqa: F811
    """Finding 5. Two processes run the same stage (same cache key) at once. Before: both computed it and the round
    got two child runs. Now the second waits on the first's lock (it says so), then takes its record: one
    computation, one MLflow child run, the second run's task state Cached. Run A holds the stage open until B is
    seen waiting, so the overlap is certain, not a matter of timing."""
    work, uri, hold = tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    work.mkdir()
    env = prefect_server.env()
    cmd = [sys.executable, "-m", "tests.integration._result_flow", str(work), uri, str(hold)]
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start(cmd, env, log_a)
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob("ran-*")):
            assert a.poll() is None and time.monotonic() < deadline, tail(log_a)
            time.sleep(0.2)
        b = start(cmd, env, log_b)
        try:
            while "another run is computing this stage" not in tail(log_b) and not len(list(work.glob("ran-*"))) > 1:
                assert b.poll() is None and time.monotonic() < deadline, tail(log_b)
                time.sleep(0.2)
            hold.touch()
            assert a.wait(timeout=240) == 0, tail(log_a)
            assert b.wait(timeout=240) == 0, tail(log_b)
        finally:
            stop(b)
    finally:
        hold.touch()
        stop(a)
    out_a = json.loads(log_a.read_text().strip().splitlines()[-1])
    out_b = json.loads(log_b.read_text().strip().splitlines()[-1])
    assert len(list(work.glob("ran-*"))) == 1
    assert (out_a["state"], out_b["state"]) == ("Completed", "Cached") and out_a["ref"] == out_b["ref"]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("result-store")
    runs = c.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["probe", "probe"]  # the parent and one child run
