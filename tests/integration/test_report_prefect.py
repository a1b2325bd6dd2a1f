"""Inside a real Prefect flow (a temporary Prefect server): Progress keeps a progress artifact, and
log_round_charts publishes the round's charts as a markdown artifact with the PNGs inline."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from pipeline_lib.report.progress import Progress
from tests.integration._report_store import log_round, new_store, pairs_table, seed_policy


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=240):
        yield


def artifacts(key: str) -> list:
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_artifact_follows_the_count(prefect_api):
    """Four units on a fake clock, one per second, pushed to Prefect at most every 2 s (the last one always): one
    artifact, created when the Progress starts and updated in place, ending at 100 % with the final count."""
    clock = Clock()

    @task
    def judge_all() -> str:
        with Progress(4, "Annotate (judge)", "responses", quiet=True, prefect_every_s=2.0, clock=clock) as p:
            for t in range(4):
                clock.t = float(t)
                p.update(1)
            return str(p._artifact_id)

    @flow
    def round_like() -> str:
        return judge_all()

    artifact_id = round_like()
    found = artifacts("annotate-judge-progress")
    assert [str(a.id) for a in found] == [artifact_id]
    a = found[0]
    assert a.type == "progress" and a.data == 100.0
    assert a.description.startswith("Annotate (judge): 4/4 responses, ETA 0s")


def test_annotate_stage_progress_artifact_ends_at_100(prefect_api, tmp_path):
    """The annotate stage run inside a task of a real flow (quiet, as in CI): its progress artifact
    ``annotate-progress`` ends at 100 % with all 4 responses counted."""
    import pandas as pd

    from pipeline_lib.artifacts import read_table, write_table
    from pipeline_lib.stages.annotate import run as annotate
    from pipeline_lib.prompts.sources import BuiltinPrompts
    from pipeline_lib.stages.prompts import run as make_prompts

    prompts = read_table(make_prompts(BuiltinPrompts(n_train=2), "train", 2, tmp_path))
    gens = write_table(pd.concat([prompts.assign(response="yes."), prompts.assign(response="no, it was.")]),
                       tmp_path / "generations", name="generations", producer="test")

    @task
    def annotate_stage() -> str:
        return annotate(gens, {"kind": "rules"}, tmp_path / "work", quiet=True).path

    @flow
    def round_like() -> str:
        return annotate_stage()

    round_like()
    (a,) = artifacts("annotate-progress")
    assert a.type == "progress" and a.data == 100.0
    assert a.description.startswith("annotate: 4/4 responses")


def test_train_progress_starts_at_0_until_the_trainer_reports_its_total(prefect_api):
    """The train stage's Progress starts with total 0 (unknown until the trainer's first log): the artifact is
    created at 0 %, not 100 %, and the trainer's rows take it to 100 % at max_steps."""

    @task
    def train_like() -> float:
        with Progress(0, "train", "steps", quiet=True) as p:
            (created,) = artifacts("train-progress")
            on_log = p.trainer_callback()
            for step in (1, 2):
                on_log({"step": step, "max_steps": 2, "loss": 0.69})
        return created.data

    @flow
    def round_like() -> float:
        return train_like()

    assert round_like() == 0.0
    (a,) = artifacts("train-progress")
    assert a.data == 100.0 and a.description.startswith("train: 2/2 steps")


def test_round_charts_markdown_artifact(prefect_api, tmp_path):
    from pipeline_lib.report.publish import log_round_charts

    _, lin = new_store(tmp_path)
    r = log_round(lin, tmp_path, name="pf-r1", campaign="pf", index=1, policy=seed_policy(tmp_path),
                  before={"pass_rate_strict": 0.25}, after={"pass_rate_strict": 0.5},
                  pairs=pairs_table([0.9, 0.7], [0.1, 0.3], [8, 9], [9, 10]), losses=[0.7, 0.5, 0.4], promoted=True)

    @flow
    def end_of_round() -> dict:
        return log_round_charts(lin, r["parent"], pairs=r["pairs"], checkpoint=r["checkpoint"], campaign="pf",
                                round_name="pf-r1")

    logged = end_of_round()
    assert sorted(logged) == ["pairs.png", "training.png", "trend.png"]
    (a,) = artifacts("round-charts")
    assert a.type == "markdown" and r["parent"] in a.description
    md = a.data
    assert md.startswith("## Round pf-r1")
    assert [h for h in re.findall(r"^### (.+)$", md, flags=re.M)] == [
        "Held-out metrics per round", "Preference pairs: score and length", "Training curves"]
    pngs = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(pngs) == 3
    # The inline pictures are the very files MLflow holds.
    for name, b64 in zip(["trend.png", "pairs.png", "training.png"], pngs):
        local = lin.client.download_artifacts(r["parent"], f"charts/{name}", str(tmp_path / "dl"))
        assert open(local, "rb").read() == base64.b64decode(b64)
        assert Image.open(io.BytesIO(base64.b64decode(b64))).format == "PNG"
