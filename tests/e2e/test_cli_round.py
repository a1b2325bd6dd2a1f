"""The smoke round through the command line, as a person runs it: a quiet terminal (only lines of the allowed
shapes), the libraries' output in the run's log, a cost table whose totals are the sums of the stage records, and a
``--dry-run`` that predicts the cache before and after."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STAGES = ["prompts-heldout", "prompts-train", "collect", "annotate", "pair", "train", "evaluate-champion",
          "evaluate-candidate"]

# Every line a person sees by default has one of these shapes (a list of patterns, not a count).
ALLOWED = [re.compile(p) for p in [
    r"^\[[a-z][a-z ()-]*\] \d+/\d+ \w+ \(\d+%\) \| (\?|[\d.]+) \w+/s \| ETA \S+( \| .*)?$",  # progress
    r"^\[[a-z-]+\] done in [\d.]+ s \(cpu \d+ s, peak [\d.]+ GiB\)$",  # a stage ran
    r"^\[[a-z-]+\] cached$",  # a stage was a cache hit
    r"^\|.*\|$",  # the metrics and cost tables
    r"^pairs: \d+ from \d+ prompts .*; MLflow run [0-9a-f]{32}$",
    r"^paired on the same prompts \(after - before, \d+% CI from [\d,]+ bootstrap resamples of the prompts\):$",
    r"^  [a-z_.]+ +n=\d+ +[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]( \(\d+ gained, \d+ lost; McNemar p = "
    r"[\d.e+-]+\))?(  \(CI excludes 0\))?$",  # one paired comparison
    r"^log: \S+\.log$",
    r"^(warning|error): \[[^\]]+\] .*$",  # a run's warning, one line (a retried stage on a loaded machine)
    r"^$",
]]


def _cli(tmp: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline_lib.cli", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
           f"run.work_dir={tmp / 'work'}", f"run.mlflow_tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # the command's own temporary server, as for a person
    env.pop("TQDM_DISABLE", None)  # set for the in-process unit tests (tests/unit/_tiny.py); a person has bars on
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp, env=env)


def _stage_lines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([a-z-]+)\] (done in .*|cached)$", text, flags=re.M))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-round")
    plan_before = _cli(tmp, "--dry-run", timeout=120)
    first = _cli(tmp)
    plan_after = _cli(tmp, "--dry-run", timeout=120)
    again = _cli(tmp, "--json", timeout=300)
    return tmp, plan_before, first, plan_after, again


def test_default_output_is_quiet_and_complete(runs):
    tmp, _, first, _, _ = runs
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (first.stdout + first.stderr).splitlines()
    stray = [l for l in lines if not any(p.match(l) for p in ALLOWED)]
    assert not stray, stray[:20]
    done = _stage_lines(first.stderr)
    assert set(done) == set(STAGES) and all(v.startswith("done in") for v in done.values()), done
    for stage in ("collect", "annotate", "train", "evaluate (generate)", "evaluate (judge)"):
        assert re.search(rf"^\[{re.escape(stage)}\] \d+/\d+ .*\(100%\)", first.stderr, flags=re.M), stage
    assert "| pass_rate_strict " in first.stdout and first.stdout.count("| total ") == 1
    log = Path(re.search(r"^log: (\S+)$", first.stderr, flags=re.M).group(1))
    text = log.read_text(errors="replace")
    # the libraries' output went to the log: vLLM's bar, Prefect's server, and torch/vLLM notices
    assert "Processed prompts" in text and "Starting temporary server" in text and "Stopping temporary server" in text
    # the float32 checkpoints load into vLLM's bfloat16 without one warning per tensor (vllm_worker's cast loader)
    assert "Attempted to load weight" not in text


def test_cost_totals_are_the_sums_of_the_stage_records(runs):
    from mlflow.tracking import MlflowClient

    tmp, _, first, _, _ = runs
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", first.stdout).group(1)
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = c.get_run(run_id)
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert {r.info.run_name for r in children} == set(STAGES)
    kids = [r.data.metrics for r in children]
    total = parent.data.metrics
    for key in ("wall_s", "cpu_s", "generated_tokens", "trained_tokens", "generate_s", "train_s"):
        assert total[f"cost.{key}"] == pytest.approx(sum(k.get(f"cost.{key}", 0.0) for k in kids)), key
    assert total["cost.peak_rss_gib"] == max(k["cost.peak_rss_gib"] for k in kids)
    assert total["cost.generation_tokens_per_s"] == pytest.approx(total["cost.generated_tokens"] /
                                                                  total["cost.generate_s"])
    # the collect stage's tokens are the ones its artifact recorded; every stage's wall time is within the round's
    collect = next(r for r in children if r.info.run_name == "collect").data.metrics
    assert collect["cost.generated_tokens"] == collect["generated_tokens"] > 0
    round_wall = float(re.search(r"wall time (\d+) s", first.stdout).group(1))  # (the cached re-run logs its own)
    assert 0 < total["cost.wall_s"] <= round_wall + 1
    assert 0 < total["cost.mfu"] < 1
    # the printed total row shows the same tokens
    total_row = next(l for l in first.stdout.splitlines() if l.startswith("| total "))
    assert f"{total['cost.generated_tokens']:,.0f}" in total_row


def test_dry_run_predicts_the_cache(runs):
    _, before, first, after, again = runs
    assert before.returncode == 0 and after.returncode == 0, (before.stderr[-2000:], after.stderr[-2000:])
    assert "8 to run, 0 cache hit(s)" in before.stdout
    assert "0 to run, 8 cache hit(s)" in after.stdout, after.stdout
    # ... and the run agrees: the same command again is all cache hits, with clean JSON on stdout
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert all(r["cached"] for r in summary["cost"]["stages"]) and len(summary["cost"]["stages"]) == 8
    assert set(_stage_lines(again.stderr).values()) == {"cached"}
    # bench.efficacy's record of what a round skipped reads the same summary: every stage the log calls cached
    from bench.efficacy import cached_in

    assert sorted(cached_in(summary)) == sorted(_stage_lines(again.stderr))


def test_html_report_shows_the_same_cost(runs):
    from mlflow.tracking import MlflowClient

    tmp, _, first, _, _ = runs
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", first.stdout).group(1)
    p = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "report", run_id, "--out", str(tmp / "report"),
                        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    page = next((tmp / "report").rglob("*.html")).read_text()
    section = page.split("<h2>Cost</h2>")[1].split("<h2>")[0]
    total = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id).data.metrics
    for key in ("wall_s", "generated_tokens", "trained_tokens"):
        shown = re.search(rf'data-metric="cost\.{key}" data-value="([^"]+)"', section).group(1)
        assert float(shown) == total[f"cost.{key}"], key  # the round row: the parent run's totals, as stored
    assert section.count("<details>") == 1 and ">collect<" in section  # the round's stages
