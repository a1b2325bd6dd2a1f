"""Collect's progress with the real vLLM worker (the unit tests in tests/unit/test_stage_progress.py use a fake
worker for speed): the start line at 0/N, the last at N/N with the throughput the stage records in its manifest."""

from __future__ import annotations

import re

import pytest

from pipeline_lib.artifacts import read_manifest, read_table
from pipeline_lib.prompts.sources import BuiltinPrompts
from pipeline_lib.report.progress import fmt_duration
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.collect import run as collect
from pipeline_lib.stages.prompts import run as make_prompts


@pytest.mark.slow
def test_collect_progress_through_real_vllm(tiny_model, tmp_path, capsys):
    prompts = make_prompts(BuiltinPrompts(n_train=3, n_heldout=3), "train", 3, tmp_path)
    ref = collect(tiny_model, prompts, CollectConfig(k=2, max_tokens=8), tmp_path / "work")
    assert len(read_table(ref)) == 6
    out = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[collect]")]
    assert out[0] == "[collect] 0/6 samples (0%) | ? samples/s | ETA ?"
    m = read_manifest(ref.path)["metrics"]
    tok_s, load = f"{m['tokens_per_s']:.0f} tok/s", fmt_duration(m["engine_load_s"])
    assert re.fullmatch(r"\[collect\] 6/6 samples \(100%\) \| [0-9.]+ samples/s \| ETA 0s \| " + re.escape(
        f"{tok_s}, engine load {load}"), out[-1]), out[-1]
