"""Scheduled iterative rounds: ``alignflow serve --interval N`` against a real Prefect server produces consecutive
rounds, and with ``follow_champion: true`` the second samples from the champion the first one promoted.

The smoke recipe on the tiny model, judged by the tiny reward model; promotion on ``mean_score`` with sampled
(temperature 1) held-out responses on 32 prompts, where the smoke training raises the reward model's mean score
(measured: champion 0.086, candidate 0.099), so round 1 promotes its candidate. The evidence that round 2 started
from it is in MLflow: its parent run's ``alignflow.policy`` tag is the registry's champion and
``alignflow.policy_sha256`` is round 1's checkpoint hash, which is also the policy digest its collect run consumed.
"""

from __future__ import annotations

import time

import pytest

from tests.integration._servers import BIN, REPO, TERMINAL, prefect_server, start, stop, tail  # noqa: F401

NAME = "alignflow-sched"
SCHED = ["follow_champion=true", "prompts.n_heldout=32", "evaluate.temperature=1.0", "promotion.metric=mean_score",
         "run.quiet=true", f"run.registered_model={NAME}", f"run.experiment={NAME}"]


def test_serve_parameters_validate_as_the_flow_parameters():
    """A deployment's parameters are JSON that the flow run validates again: RoundConfig must survive model_dump()
    -> model_validate() (it did not while config.method() took the dumped default `sail`/`wpo` as set)."""
    from pipeline_lib.config import RoundConfig, load_config

    cfg = load_config(REPO / "configs/smoke.yaml", SCHED)
    assert RoundConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_serve_runs_one_round_at_a_time():
    from pipeline_lib.commands.serve import build_deployments
    from pipeline_lib.config import load_config

    round_dep = build_deployments(load_config(REPO / "configs/smoke.yaml", SCHED), "t", None, 60, 2)[0]
    assert round_dep.concurrency_limit == 1


@pytest.mark.slow
def test_the_server_scheduler_creates_runs(prefect_server):
    """An interval schedule on a real server yields scheduled flow runs within a few scheduler loops."""
    flow = prefect_server.post("/flows/", {"name": "schedule-probe"}).json()
    dep = prefect_server.post("/deployments/", {"name": "every-minute", "flow_id": flow["id"],
                                                "schedules": [{"schedule": {"interval": 60}, "active": True}]}).json()
    deadline = time.monotonic() + 15  # the recent-deployments scheduler loops every 5 s
    while not (runs := prefect_server.flow_runs(dep["id"])) and time.monotonic() < deadline:
        time.sleep(1)
    # SQLAlchemy 2.1 breaks Prefect 3.7.7's scheduler ("Can't evaluate bulk DML statement"): cpu.lock pins 2.0.x
    assert "Can't evaluate bulk DML statement" not in prefect_server.log_tail(10**7)
    assert runs and all(r["auto_scheduled"] and r["state"]["type"] == "SCHEDULED" for r in runs)
    starts = sorted(r["expected_start_time"] for r in runs)
    assert len(starts) >= 2  # several future runs, 60 s apart


@pytest.mark.slow
def test_two_scheduled_rounds_the_second_from_the_promoted_champion(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "serve.log"
    serve = start([str(BIN / "alignflow"), "serve", "--config", "configs/smoke.yaml", *SCHED,
                   f"run.work_dir={tmp_path / 'work'}", f"run.mlflow_tracking_uri={uri}",
                   "--interval", "20", "--name", "sched"], prefect_server.env(), log)
    try:
        deadline = time.monotonic() + 600
        done: list[dict] = []
        while len(done) < 2:
            assert serve.poll() is None, f"alignflow serve exited {serve.returncode}: {tail(log)}"
            assert time.monotonic() < deadline, f"{len(done)} scheduled rounds finished in 600 s: {tail(log)}"
            time.sleep(2)
            try:
                dep = prefect_server.deployment("alignment-round", "sched")
            except Exception:
                continue
            runs = prefect_server.flow_runs(dep["id"])
            finished = [r for r in runs if r["state"]["type"] in TERMINAL]
            bad = [r for r in finished if r["state"]["type"] != "COMPLETED"]
            assert not bad, f"scheduled run {bad[0]['name']} ended {bad[0]['state']['type']}: {tail(log)}"
            done = sorted(finished, key=lambda r: r["start_time"])
    finally:
        stop(serve)
    first, second = done[:2]
    assert second["start_time"] >= first["end_time"]  # consecutive, not overlapping
    assert first["auto_scheduled"] and second["auto_scheduled"]  # created by the schedule, not by hand

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(NAME)
    parents = {r.data.tags["prefect.flow_run_id"]: r for r in
               c.search_runs([exp.experiment_id], filter_string="tags.`alignflow.round_key` != ''")}
    r1, r2 = parents[first["id"]], parents[second["id"]]
    assert r1.data.tags["alignflow.policy"] == "tiny:0"
    assert r1.data.tags["alignflow.promoted"] == "true", r1.data.tags["alignflow.promotion_reason"]
    v1 = c.get_model_version(NAME, _candidate_version(c, r1))
    round1_checkpoint = v1.tags["alignflow.sha256"]
    assert r2.data.tags["alignflow.policy"] == f"models:/{NAME}@champion"
    assert r2.data.tags["alignflow.policy_sha256"] == round1_checkpoint
    (collect2,) = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{r2.info.run_id}' "
                                                                   "and tags.`alignflow.stage` = 'collect'")
    policy_in = [d for d in collect2.inputs.dataset_inputs
                 if {t.key: t.value for t in d.tags}.get("alignflow.role") == "policy"]
    assert [d.dataset.digest for d in policy_in] == [round1_checkpoint[:36]]


def _candidate_version(c, parent) -> str:
    """The version registered from this round's checkpoint (tagged with the round key)."""
    (mv,) = c.search_model_versions(f"name = '{NAME}' and tag.`alignflow.round_key` = "
                                    f"'{parent.data.tags['alignflow.round_key']}'")
    return mv.version
