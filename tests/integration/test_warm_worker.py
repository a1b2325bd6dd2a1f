"""The kept vLLM worker (pipeline_lib/generation/warm.py): calls after the first run in the same process, and draw
what a fresh worker draws; a failed call ends the worker and the next call gets a new one; it ends when idle."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from pipeline_lib.generation import warm
from pipeline_lib.generation.sampling import GenerationError, SamplingSpec, sample
from pipeline_lib.models import resolve

IDS = [[5, 17, 33, 41, 9], [7, 7, 21], [100, 3, 64, 12, 8, 30]]


def _spec(**kw) -> SamplingSpec:
    return SamplingSpec(**{"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 3, "quiet": True,
                           **kw})


def _draws(df) -> list:
    df = df.sort_values(["prompt_index", "sample_index"])
    return [(list(t), lp) for t, lp in zip(df.response_token_ids, df.behavior_logp_seq)]


@pytest.fixture
def no_kept_worker():
    warm.shutdown()
    yield
    warm.shutdown()


@pytest.mark.slow
def test_kept_worker_draws_what_fresh_workers_draw(tiny_model, no_kept_worker):
    other = resolve("tiny:1")
    fresh = [sample(m.path, IDS, _spec(seed=s, reuse_worker="off"))[0] for m, s in ((tiny_model, 3), (other, 5))]
    assert warm.kept_pid() is None  # "off" never starts one
    first, st1 = sample(tiny_model.path, IDS, _spec(seed=3, reuse_worker="on"))
    pid = warm.kept_pid()
    # another model, seed and length in the same process: its own engine, built from its own spec
    second, st2 = sample(other.path, IDS, _spec(seed=5, reuse_worker="on"))
    third, _ = sample(tiny_model.path, IDS, _spec(seed=3, reuse_worker="on"))
    assert pid is not None and warm.kept_pid() == pid and st1["kept_worker"] and st2["kept_worker"]
    # each job counts its own steps' ranks, all by the plain op (cpu_ranks.py): no compile in these short jobs
    assert st1["cpu_eager_rank_calls"] > 0 and st2["cpu_eager_rank_calls"] > 0
    assert st1["cpu_compiled_rank_calls"] == st2["cpu_compiled_rank_calls"] == 0
    assert _draws(first) == _draws(fresh[0]) == _draws(third)  # token ids and log-probs, exactly
    assert _draws(second) == _draws(fresh[1])
    assert _draws(first) != _draws(second)


@pytest.mark.slow
def test_failed_call_ends_the_worker_and_the_next_call_starts_another(tiny_model, tmp_path, no_kept_worker):
    sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    pid = warm.kept_pid()
    with pytest.raises(GenerationError, match=r"vLLM worker for .*no-such-model failed"):
        sample(str(tmp_path / "no-such-model"), IDS, _spec(reuse_worker="on"))
    assert warm.kept_pid() is None
    df, st = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    assert st["kept_worker"] and warm.kept_pid() not in (None, pid) and len(df) == 9
    # killed between calls (OOM killer, an operator): the next call notices and starts a new one
    os.kill(warm.kept_pid(), signal.SIGKILL)
    time.sleep(0.5)
    again, _ = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    assert _draws(again) == _draws(df)


@pytest.mark.slow
def test_engine_settings_travel_with_each_call_and_other_changes_start_a_new_worker(tiny_model, no_kept_worker,
                                                                                      monkeypatch):
    """A round's parent changes engine settings between calls (importing TRL sets VLLM_LOGGING_LEVEL=ERROR when it is
    unset): the kept worker serves on with each call's own settings, as a fresh process would inherit them. A change
    to the rest of the environment (thread counts, HF_HOME) needs a new worker: those are read at import."""
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    _, st1 = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    pid = warm.kept_pid()
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    _, st2 = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    assert st2["kept_worker"] and warm.kept_pid() == pid
    assert st1["engine_env"]["VLLM_LOGGING_LEVEL"] == "WARNING"  # the worker's default when the caller sets none
    assert st1["engine_env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert st2["engine_env"]["VLLM_LOGGING_LEVEL"] == "ERROR" and st2["engine_env"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert st2["vllm_log_level"] == "ERROR" and st1["vllm_log_level"] == "WARNING"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")  # back to unset: the call gets the default again, not the last value
    _, st3 = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    assert warm.kept_pid() == pid and st3["engine_env"]["VLLM_LOGGING_LEVEL"] == "WARNING"
    # any other variable is read by the worker's imports or its engine for all it knows: a value no earlier test set
    monkeypatch.setenv("ALIGNFLOW_TEST_ENV_MARK", uuid.uuid4().hex)
    _, st4 = sample(tiny_model.path, IDS, _spec(reuse_worker="on"))
    assert st4["kept_worker"] and warm.kept_pid() not in (None, pid)


@pytest.mark.slow
def test_kept_worker_ends_after_its_idle_time():
    w = warm.KeptWorker(idle_s=2.0)
    try:
        assert w.proc.wait(timeout=300) == 0  # imports vLLM, waits 2 s for a call, leaves
    finally:
        w.close()


def test_reuse_modes(monkeypatch):
    monkeypatch.delenv("ALIGNFLOW_REUSE_WORKER", raising=False)
    assert warm.wanted("on", 1) and not warm.wanted("off", 1) and not warm.wanted("on", 2)
    assert warm.wanted("auto", 1) and not warm.wanted("auto", 2)  # this machine has no CUDA
    monkeypatch.setenv("ALIGNFLOW_REUSE_WORKER", "off")
    assert not warm.wanted("auto", 1) and warm.wanted("on", 1)  # the variable speaks only for "auto"
    monkeypatch.setenv("ALIGNFLOW_REUSE_WORKER", "yes")
    with pytest.raises(ValueError, match="ALIGNFLOW_REUSE_WORKER='yes'"):
        warm.wanted("auto", 1)
    with pytest.raises(ValueError, match="reuse_worker='sometimes'"):
        warm.wanted("sometimes", 1)


PARENT = """
import sys
from pipeline_lib.generation.sampling import SamplingSpec, sample
sample(sys.argv[1], [[5, 17, 33]] * 128, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_tokens=256, seed=0,
                                                     quiet=True, reuse_worker="on"))
"""


@pytest.mark.slow
def test_kept_worker_ends_with_its_parent_mid_call(tiny_model):
    """kill -9 of the process that owns the kept worker, while the worker is generating: the worker ends too (it
    watches its parent; PR_SET_PDEATHSIG would follow the spawning thread, not the process)."""
    import subprocess
    import sys

    import psutil

    from pipeline_lib.child_process import child_env

    parent = subprocess.Popen([sys.executable, "-c", PARENT, tiny_model.path], env=child_env())
    try:
        deadline, worker = time.monotonic() + 300, None
        while worker is None and time.monotonic() < deadline and parent.poll() is None:
            worker = next((p for p in psutil.Process(parent.pid).children() if "--serve" in p.cmdline()), None)
            time.sleep(0.5)
        assert worker is not None, "no kept worker started"
        # past vLLM's import (about 8 s of CPU) and into the engine's work on the call
        while time.monotonic() < deadline and worker.cpu_times().user < 20:
            time.sleep(0.5)
        assert parent.poll() is None, "the call ended before the kill: make it longer"
        parent.kill()
        parent.wait()
        worker.wait(timeout=30)  # raises psutil.TimeoutExpired if it outlives its parent
    finally:
        if parent.poll() is None:
            parent.kill()
