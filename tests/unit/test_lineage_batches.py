"""Round and stage runs keep every param, metric and tag, however many, in few store transactions.

MLflow caps one store request at 100 params, 100 tags and 1000 entities; its client splits a larger ``log_batch``
into such requests. The stage run once cut its params at 100 itself. Real SQLite MLflow store.
"""

from __future__ import annotations

from pipeline_lib.artifacts import ArtifactRef
from pipeline_lib.lineage import RoundLineage


def _lineage(tmp_path):
    return RoundLineage(f"sqlite:///{tmp_path}/mlflow.db", "batches")


def test_stage_run_keeps_all_params_metrics_and_step_metrics(tmp_path):
    lin = _lineage(tmp_path)
    parent = lin.start_round("k", "r", {"a": 1}, tags={})
    ref = ArtifactRef(kind="table", name="t", path=str(tmp_path / "out"), sha256="ab" * 32)
    config = {f"p{i:03d}": i for i in range(250)}                    # 3 batches of params
    metrics = {f"m{i:04d}": i / 2 for i in range(1500)}              # 2 batches of metrics
    steps = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    rid = lin.stage_run(parent, "train", {}, {"checkpoint": ref}, config, metrics, step_metrics=steps)
    run = lin.client.get_run(rid)
    assert run.data.params == {k: str(v) for k, v in config.items()}
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("m")} == metrics
    assert [m.value for m in sorted(lin.client.get_metric_history(rid, "loss"), key=lambda m: m.step)] == [1.0, 0.5,
                                                                                                      1.0 / 3]
    assert run.data.tags["output.checkpoint"] == "ab" * 32
    assert run.info.status == "FINISHED"


def test_round_params_and_tags_in_batches_and_a_rerun_retags(tmp_path):
    lin = _lineage(tmp_path)
    config = {"train": {f"k{i}": i for i in range(130)}, "name": "x"}
    parent = lin.start_round("key", "r", config, tags={"prefect.flow_run_id": "first"})
    run = lin.client.get_run(parent)
    assert len(run.data.params) == 131 and run.data.params["train.k129"] == "129"
    lin.finish_round(parent, {"wall": 2.0, "skipped": float("nan")}, status="FAILED")
    # the re-run of a crashed round re-opens the same run and its new tags replace the old values
    again = lin.start_round("key", "r", config, tags={"prefect.flow_run_id": "second"})
    assert again == parent
    lin.finish_round(parent, {"wall": 3.0}, tags={f"alignflow.artifact.a{i}": str(i) for i in range(120)})
    run = lin.client.get_run(parent)
    assert run.data.tags["prefect.flow_run_id"] == "second"
    assert run.data.tags["alignflow.artifact.a119"] == "119"
    assert run.data.metrics == {"wall": 3.0} and run.info.status == "FINISHED"
