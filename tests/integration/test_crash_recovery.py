"""Crash recovery, for real: ``kill -9`` of ``alignflow run`` in the middle of training, then the same command again.

The round talks to a real ``prefect server`` on 127.0.0.1 (not the CLI's ephemeral one, which a kill -9 would
orphan) and a SQLite MLflow store. After the kill the re-run must
- reuse every finished stage: the same artifact directories, untouched (mtimes), Prefect states ``Cached``, and no
  second MLflow run for any of them (the round's parent run is re-opened, not duplicated);
- resume training from the last checkpoint (its first logged step is the one after the checkpoint) and end with the
  same weights as an uninterrupted training on the same pairs;
- leave no corrupt artifact (``pipeline_lib.artifacts.verify`` on every one).
Also here: the retry policy (``tasks.common.retry_transient``) on real Prefect tasks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration._servers import BIN, REPO, prefect_server, start, tail  # noqa: F401 (fixture)

MAX_STEPS = 10
FINISHED_STAGES = ["prompts-train", "prompts-heldout", "collect", "annotate", "pair"]


def _complete_checkpoints(work: Path) -> list[Path]:
    # The Trainer writes trainer_state.json last: a checkpoint without it was cut off while being saved.
    return sorted((p for p in work.glob("artifacts/train/*.work/checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.rsplit("-", 1)[1]))


def _snapshot(work: Path) -> dict[str, tuple[int, int]]:
    """Every finished artifact directory with the mtimes of its manifest and content file."""
    out = {}
    for m in work.glob("artifacts/*/*/manifest.json"):
        data = m.parent / "data.parquet"
        out[str(m.parent)] = (m.stat().st_mtime_ns, data.stat().st_mtime_ns if data.is_file() else 0)
    return out


def _json_tail(stdout: str) -> dict:
    start_at = max(i for i, line in enumerate(stdout.splitlines()) if line.startswith("{"))
    return json.loads("\n".join(stdout.splitlines()[start_at:]))


@pytest.fixture(scope="module")
def crashed_and_rerun(prefect_server, tmp_path_factory):
    from pipeline_lib.stage import code_version

    code_at_start = code_version.__wrapped__()
    tmp = tmp_path_factory.mktemp("crash")
    work, uri = tmp / "work", f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [str(BIN / "alignflow"), "run", "--config", "configs/smoke.yaml", "--json", f"run.work_dir={work}",
           f"run.mlflow_tracking_uri={uri}", "run.registered_model=alignflow-crash", "prompts.n_train=4",
           "prompts.n_heldout=2", "collect.k=2", "evaluate.enabled=false", "train.save_steps=1",
           f"train.max_steps={MAX_STEPS}"]
    env = prefect_server.env()
    log1 = tmp / "run1.log"
    first = start(cmd, env, log1)
    deadline = time.monotonic() + 420
    while not _complete_checkpoints(work):
        assert first.poll() is None, f"the first run ended ({first.returncode}) before a checkpoint: {tail(log1)}"
        assert time.monotonic() < deadline, f"no checkpoint after 420 s: {tail(log1)}"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the CLI, its Prefect flow and every child: no cleanup runs
    first.wait(timeout=30)
    before = _snapshot(work)
    ckpts = _complete_checkpoints(work)
    # A kill between the Trainer's weights and its trainer_state.json leaves a newer, incomplete checkpoint-N+1:
    # the re-run must resume from the last complete one (test_incomplete_checkpoint_is_not_resumed_from).
    resumed_from = int(ckpts[-1].name.rsplit("-", 1)[1])

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("alignflow-smoke")
    runs_before = {r.info.run_name: r.info.run_id for r in c.search_runs([exp.experiment_id])}
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    (tmp / "run2.log").write_text(second.stdout + second.stderr)
    if code_version.__wrapped__() != code_at_start:  # a shared working tree: someone edited pipeline_lib meanwhile
        pytest.skip("pipeline_lib/ changed while the test ran, so every stage cache key changed")
    assert second.returncode == 0, second.stderr[-4000:]
    return dict(work=work, uri=uri, before=before, runs_before=runs_before, resumed_from=resumed_from,
                summary=_json_tail(second.stdout), log2=second.stdout + second.stderr, server=prefect_server)


@pytest.mark.slow
def test_finished_stages_are_reused_untouched(crashed_and_rerun):
    r = crashed_and_rerun
    before, after = r["before"], _snapshot(r["work"])
    assert before and not any("/train/" in p for p in before)  # killed before the checkpoint artifact existed
    assert {p: after[p] for p in before} == before  # same directories, not rewritten
    new = set(after) - set(before)
    assert [Path(p).parent.name for p in new] == ["train"]  # the only new artifact is the checkpoint
    assert not list(r["work"].glob("artifacts/train/*.work"))  # resumable state dropped once finished
    assert sorted(r["runs_before"]) == sorted(["smoke", *FINISHED_STAGES])  # the round and its finished stages


@pytest.mark.slow
def test_no_duplicate_mlflow_runs_and_cached_prefect_states(crashed_and_rerun):
    from mlflow.tracking import MlflowClient

    r = crashed_and_rerun
    c = MlflowClient(r["uri"])
    exp = c.get_experiment_by_name("alignflow-smoke")
    runs = c.search_runs([exp.experiment_id])
    parents = [x for x in runs if "alignflow.round_key" in x.data.tags]
    assert [p.info.run_id for p in parents] == [r["summary"]["mlflow_run_id"]] == [r["runs_before"]["smoke"]]
    assert parents[0].info.status == "FINISHED"
    children = {x.info.run_name: x.info.run_id for x in runs if x.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == sorted([*FINISHED_STAGES, "train"])  # one each: nothing logged twice
    assert all(children[s] == r["runs_before"][s] for s in FINISHED_STAGES)
    flow_run_id = parents[0].data.tags["prefect.flow_run_id"]  # the second flow run re-tagged the parent
    tasks = r["server"].post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    states = {re.sub(r"-[0-9a-f]{3}$", "", t["name"]): t["state"]["type"] for t in tasks
              if not t["name"].startswith("resolve-model")}
    # the prompts task runs are named by split (train, held-out); the others get Prefect's random suffix, cut above
    assert states == {"prompts-train": "COMPLETED", "prompts-heldout": "COMPLETED", "collect": "COMPLETED",
                      "annotate": "COMPLETED", "pair": "COMPLETED", "train": "COMPLETED"}
    names = {t["state"]["name"] for t in tasks if not t["name"].startswith(("resolve-model", "train"))}
    assert names == {"Cached"}


@pytest.mark.slow
def test_training_resumed_from_the_last_checkpoint(crashed_and_rerun):
    """The resumed run's progress starts at step k+1 and ends at N, the checkpoint's log history has every step once, and the weights
    equal an uninterrupted training on the same pairs (same seed, restored optimizer, scheduler and RNG state)."""
    import torch
    from safetensors.torch import load_file

    from pipeline_lib.artifacts import read_manifest, ref_from_dir
    from pipeline_lib.config import load_config
    from pipeline_lib.models import resolve
    from pipeline_lib.stages.train import run as train

    r = crashed_and_rerun
    k = r["resumed_from"]
    # progress lines ("[train] 3/4 steps (75%) | ...") are throttled in a log, but the first report after the
    # resume and the last one are always printed
    steps_logged = [int(s) for s in re.findall(r"\[train\] (\d+)/\d+ steps", r["log2"])]
    assert steps_logged and steps_logged[0] == k + 1 and steps_logged[-1] == MAX_STEPS, (k, steps_logged)
    assert steps_logged == sorted(set(steps_logged)), steps_logged
    ckpt = r["summary"]["checkpoint_path"]
    history = [row["step"] for row in read_manifest(ckpt)["log_history"] if "loss" in row]
    assert history == list(range(1, MAX_STEPS + 1))

    cfg = load_config(REPO / "configs/smoke.yaml", ["train.save_steps=1", f"train.max_steps={MAX_STEPS}"])
    pairs = ref_from_dir(next(r["work"].glob("artifacts/pair/*")))
    policy = resolve("tiny:0")
    straight = train(policy, pairs, cfg.train, cfg.method(), r["work"].parent / "straight", reference=policy,
                     quiet=True)
    a, b = load_file(Path(ckpt) / "model.safetensors"), load_file(straight.dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_no_artifact_is_corrupt(crashed_and_rerun):
    from pipeline_lib.artifacts import ref_from_dir, verify

    refs = [ref_from_dir(m.parent) for m in crashed_and_rerun["work"].glob("artifacts/*/*/manifest.json")]
    assert {Path(x.path).parent.name for x in refs} == {"prompts", "collect", "annotate", "pair", "train"}
    for ref in refs:
        verify(ref)  # recomputes the content hash against the manifest


def test_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    """checkpoint-3 was cut off by a kill after the weights but before trainer_state.json (the Trainer's last
    write): resuming must start from checkpoint-2, the last complete one."""
    from pipeline_lib.stages.train.fit import _last_checkpoint

    for step, complete in ((2, True), (3, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


# -- retries: transient errors again, bad input never -------------------------------------------------------------
@pytest.mark.slow
def test_retry_transient_on_real_prefect_tasks(prefect_server):
    """With the stage tasks' retry policy (2 retries, retry_transient), a task that raises RuntimeError twice and
    then succeeds runs 3 times and completes; one that raises ValueError (bad input) runs once and fails."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.common import task_options

    calls = {"flaky": 0, "bad": 0}
    opts = {**task_options("x"), "retry_delay_seconds": 0, "cache_policy": NO_CACHE, "persist_result": False}

    @task(**{**opts, "name": "flaky"})
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise RuntimeError("vLLM engine died")
        return "ok"

    @task(**{**opts, "name": "bad"})
    def bad() -> str:
        calls["bad"] += 1
        raise ValueError("prompts.jsonl line 3: missing 'prompt'")

    @flow
    def retries() -> dict:
        return {"flaky": flaky(return_state=True), "bad": bad(return_state=True)}

    from prefect.logging.handlers import APILogWorker

    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        states = retries()
        APILogWorker.drain_all(timeout=10)  # ship the logs now, not at exit after the server has stopped
    assert calls == {"flaky": 3, "bad": 1}
    assert states["flaky"].is_completed() and states["flaky"].result() == "ok"
    assert states["bad"].is_failed()
