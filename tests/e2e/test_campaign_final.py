"""A campaign through the CLI, ending with its start-vs-last comparison on the held-out prompts and on IFEval (a
seeded subset, real vLLM): the printed table, the MLflow run and the paired statistics must agree with the
evaluation artifacts they come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline_lib.artifacts import read_table
from pipeline_lib.evaluation.paired import compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaign")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [sys.executable, "-m", "pipeline_lib.cli", "campaign", "--config", "configs/campaign_smoke.yaml", "--json",
            "--quiet", f"round.run.work_dir={tmp / 'work'}", f"round.run.mlflow_tracking_uri={uri}",
            # rounds without their own evaluation (no promotion gate): the campaign's comparison is the measurement
            "round.evaluate.enabled=false", "round.evaluate.ifeval.enabled=true", "round.evaluate.ifeval.subset=12",
            "round.evaluate.ifeval.max_tokens=16", "round.evaluate.ifeval.kv_cache_gib=1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), uri, tmp


def _evaluation(tmp, stage: str, model_sha: str):
    """The evaluation artifact of ``model_sha`` written by ``stage`` (evaluate / ifeval)."""
    from pipeline_lib.artifacts import read_manifest, ref_from_dir

    for m in (tmp / "work" / "artifacts" / stage).glob("*/manifest.json"):
        man = read_manifest(m.parent)
        if man.get("model", {}).get("sha256") == model_sha:
            return read_table(ref_from_dir(m.parent))
    raise AssertionError(f"no {stage} artifact for {model_sha[:12]}")


def test_final_comparison_equals_the_paired_statistics_of_its_artifacts(campaign):
    result, _, tmp = campaign
    final = result["final"]
    assert len(result["rounds"]) == 2 and final["start"] == "tiny:0"
    assert all(np.isnan(s["after"]["pass_rate_strict"]) for s in result["rounds"])  # rounds evaluated nothing
    from pipeline_lib.models import resolve

    start_sha, final_sha = resolve("tiny:0").sha256, result["rounds"][-1]["artifacts"]["checkpoint"]
    # held-out: mean judge score per prompt (the tiny reward model scores every response differently)
    b, a = _evaluation(tmp, "evaluate", start_sha), _evaluation(tmp, "evaluate", final_sha)
    a = a.set_index("prompt_id").loc[b["prompt_id"]].reset_index()
    want = compare("mean_score", b["score"].to_numpy(), a["score"].to_numpy(), n_resamples=2000, seed=0)
    got = final["paired"]["mean_score"]
    assert (got["delta"], got["ci_low"], got["ci_high"]) == pytest.approx((want.delta, want.ci_low, want.ci_high))
    assert got["before"] == pytest.approx(final["before"]["mean_score"])
    # IFEval: the subset of 12 prompts, prompt-level strict with its McNemar counts
    ib, ia = _evaluation(tmp, "ifeval", start_sha), _evaluation(tmp, "ifeval", final_sha)
    assert len(ib) == len(ia) == 12
    p = final["paired"]["ifeval.prompt_level_strict"]
    gained = int((ia.set_index("key").loc[ib["key"], "strict_all"].to_numpy() & ~ib["strict_all"].to_numpy()).sum())
    assert p["n"] == 12 and p["n_gained"] == gained
    assert final["before"]["ifeval.prompt_level_strict"] == pytest.approx(ib["strict_all"].mean())


def test_mlflow_run_holds_the_comparison_and_the_report_shows_it(campaign, tmp_path):
    result, uri, _ = campaign
    from mlflow.tracking import MlflowClient

    final = result["final"]
    run = MlflowClient(uri).get_run(final["mlflow_run_id"])
    assert run.data.tags["alignflow.campaign_final"] == "smoke-campaign"
    m = run.data.metrics
    for k, p in final["paired"].items():
        assert m[f"paired.{k}.delta"] == pytest.approx(p["delta"])
        assert m[f"paired.{k}.ci_low"] == pytest.approx(p["ci_low"])
    assert m["start.mean_score"] == pytest.approx(final["before"]["mean_score"])
    assert m["rounds_wall_s"] == pytest.approx(final["rounds_wall_s"])

    from pipeline_lib.cli import main

    assert main(["report", "smoke-campaign", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    page = (tmp_path / "smoke-campaign.html").read_text()
    assert "Campaign: start vs final" in page
    lo, hi = final["paired"]["mean_score"]["ci_low"], final["paired"]["mean_score"]["ci_high"]
    assert f'data-metric="paired.mean_score.ci" data-value="{lo!r},{hi!r}"' in page
