"""Stages report progress: collect and held-out evaluation (vLLM worker replaced by a fake child process that writes
the worker's output files), annotate with the rules judge, and the slicing of judge calls behind the per-slice counts.
Quiet mode prints nothing. No vLLM, no training."""

from __future__ import annotations

import re
import sys
import textwrap

import numpy as np
import pytest

from pipeline_lib.artifacts import read_table
from pipeline_lib.judges.batching import judge_in_chunks
from pipeline_lib.prompts.sources import BuiltinPrompts
from pipeline_lib.report.progress import Progress
from pipeline_lib.stages.annotate import run as annotate
from pipeline_lib.stages.collect import CollectConfig
from pipeline_lib.stages.collect import run as collect
from pipeline_lib.stages.evaluate import EvaluateConfig
from pipeline_lib.stages.evaluate import run as evaluate_heldout
from pipeline_lib.stages.prompts import run as make_prompts

RULES = {"kind": "rules"}
# What a line of Progress ends with once all is done: count, 100 %, a rate, ETA 0s, then the stage's extra.
DONE = r"\(100%\) \| [0-9.]+ {unit}/s \| ETA 0s"


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """Run as ``python -m pipeline_lib.generation.vllm_worker SPEC OUT``: writes ``n`` short responses per prompt
    and the stats file, as the real worker does, in a child process of its own."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, sys
        import pandas as pd
        spec_path, out_path = sys.argv[-2:]
        spec = json.load(open(spec_path))
        rows = [{"prompt_index": p, "sample_index": s, "response": f"sample {s} of prompt {p}.",
                 "response_token_ids": [1, 2, 3], "n_tokens": 3, "behavior_logp_seq": -1.0, "finish_reason": "stop"}
                for p in range(len(spec["prompt_token_ids"])) for s in range(spec["n"])]
        pd.DataFrame(rows).to_parquet(out_path, index=False)
        json.dump({"load_s": 2.0, "generate_s": 0.5, "generated_tokens": 3 * len(rows)},
                  open(out_path + ".stats.json", "w"))
    """))
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    monkeypatch.setenv("ALIGNFLOW_REUSE_WORKER", "off")  # one fake process per call, not the kept-worker protocol


@pytest.fixture
def prompts(tmp_path):
    return make_prompts(BuiltinPrompts(n_train=3, n_heldout=3), "train", 3, tmp_path)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("[")]


def test_collect_counts_prompts_times_k(tiny_model, prompts, fake_worker, tmp_path, capsys):
    """3 prompts x K=2: a start line at 0/6 when the worker starts, the last at 6/6 when it returns, with the
    worker's throughput: 18 tokens / 0.5 s = 36 tok/s, engine load 2 s."""
    collect(tiny_model, prompts, CollectConfig(k=2), tmp_path / "work")
    out = lines(capsys.readouterr().err)
    assert out[0] == "[collect] 0/6 samples (0%) | ? samples/s | ETA ?"
    assert out[-1].startswith("[collect] 6/6 samples (100%) |")
    assert out[-1].endswith("| ETA 0s | 36 tok/s, engine load 2s")


def test_annotate_counts_every_response(tiny_model, prompts, fake_worker, tmp_path, capsys):
    """6 responses judged by the rules judge: a start line at 0/6, then 6/6 with the mean score of the verdicts."""
    gens = collect(tiny_model, prompts, CollectConfig(k=2), tmp_path / "work", quiet=True)
    capsys.readouterr()
    ref = annotate(gens, RULES, tmp_path / "work")
    first, last = lines(capsys.readouterr().err)
    assert first == "[annotate] 0/6 responses (0%) | ? responses/s | ETA ?"
    mean = read_table(ref)["score"].mean()
    assert re.fullmatch(r"\[annotate\] 6/6 responses " + DONE.format(unit="responses") + f" \\| mean {mean:.3f}",
                        last), last


def test_quiet_stages_print_nothing(tiny_model, prompts, fake_worker, tmp_path, capsys):
    gens = collect(tiny_model, prompts, CollectConfig(k=2), tmp_path / "work", quiet=True)
    annotate(gens, RULES, tmp_path / "work", quiet=True)
    heldout = make_prompts(BuiltinPrompts(n_train=3, n_heldout=3), "heldout", 3, tmp_path)
    evaluate_heldout(tiny_model, heldout, RULES, EvaluateConfig(), tmp_path / "work", quiet=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_heldout_counts_generation_then_judging(tiny_model, fake_worker, tmp_path, capsys):
    heldout = make_prompts(BuiltinPrompts(n_train=3, n_heldout=3), "heldout", 3, tmp_path)
    evaluate_heldout(tiny_model, heldout, RULES, EvaluateConfig(), tmp_path / "work")
    out = lines(capsys.readouterr().err)
    assert out[0] == "[evaluate (generate)] 0/3 responses (0%) | ? responses/s | ETA ?"
    assert out[1].startswith("[evaluate (generate)] 3/3 responses (100%)")
    assert out[-1].startswith("[evaluate (judge)] 3/3 responses (100%)") and " | mean " in out[-1]


def test_judge_in_chunks_keeps_prompts_together_and_counts_slices():
    """7 items over prompts a (3), b (1), c (2), d (1), interleaved; slices of >= ceil(7 / 3) = 3 items of whole
    prompts: {a} (3), then {b, c} (3), then {d} (1). Verdicts come back in the items' own order, and the counts
    go 0 (the start), 3, 6, 7 with the running mean of the verdicts (item i's verdict is i)."""
    items = [("a", 0), ("b", 1), ("a", 2), ("c", 3), ("a", 4), ("c", 5), ("d", 6)]
    calls = []

    def fn(batch):
        calls.append([i for _, i in batch])
        return [float(i) for _, i in batch]

    seen = []
    p = Progress(len(items), "annotate", "responses", quiet=True)
    set_count = p.set
    p.set = lambda done, extra=None: (seen.append((done, extra)), set_count(done, extra))  # every update
    out = judge_in_chunks(fn, items, p, group=lambda it: it[0], chunks=3, min_chunk=1)
    assert calls == [[0, 2, 4], [1, 3, 5], [6]]
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # running means: (0+2+4)/3 = 2, (0+..+5)/6 = 2.5, (0+..+6)/7 = 3
    assert seen == [(0, None), (3, "mean 2.000"), (6, "mean 2.500"), (7, "mean 3.000")]


def test_judge_in_chunks_same_verdicts_as_one_call_and_nan_left_out_of_the_mean():
    """A pairwise-style verdict that depends on the other responses to the same prompt (rank within the prompt)
    gives the same numbers sliced as in one call, because a prompt never spans slices; NaN verdicts are kept
    in the output and left out of the mean."""
    rng = np.random.default_rng(0)
    items = [(f"p{rng.integers(5)}", float(rng.normal())) for _ in range(40)]

    def rank_within_prompt(batch):
        return [np.nan if x > 1.5 else float(sum(y < x for q, y in batch if q == p)) for p, x in batch]

    p = Progress(len(items), "annotate", "responses", quiet=True)
    sliced = judge_in_chunks(rank_within_prompt, items, p, group=lambda it: it[0], chunks=4, min_chunk=1)
    whole = np.asarray(rank_within_prompt(items), dtype=float)
    np.testing.assert_array_equal(sliced, whole)
    assert p.done == 40 and p.extra == f"mean {np.nanmean(whole):.3f}"


def test_defaults_make_few_large_slices():
    """Defaults: >= 256 items per slice, ~20 slices for large stages (each slice drains the judge's batch)."""
    sizes = []
    for n in (10, 300, 10_000):
        calls = []
        judge_in_chunks(lambda b: calls.append(len(b)) or [0.0] * len(b), list(range(n)),
                        Progress(n, "x", quiet=True))
        sizes.append(calls)
    assert sizes[0] == [10] and sizes[1] == [256, 44]
    assert len(sizes[2]) == 20 and set(sizes[2]) == {500}


def test_worker_failure_leaves_the_count_at_its_start(tiny_model, prompts, tmp_path, monkeypatch, capsys):
    """A worker that dies raises GenerationError; the progress never claims samples that were not made."""
    from pipeline_lib.generation.sampling import GenerationError

    script = tmp_path / "dying_python"
    script.write_text("#!/bin/sh\necho engine died >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    monkeypatch.setenv("ALIGNFLOW_REUSE_WORKER", "off")  # one fake process per call, not the kept-worker protocol
    with pytest.raises(GenerationError, match="exited with 3"):
        collect(tiny_model, prompts, CollectConfig(k=2), tmp_path / "work")
    out = lines(capsys.readouterr().err)
    assert out == ["[collect] 0/6 samples (0%) | ? samples/s | ETA ?"]
