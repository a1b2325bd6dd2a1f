"""A compiled CPU engine loads its model from vLLM's compile cache on the next start (compile_cache.py), and samples
exactly what an engine compiled from scratch samples: token ids and log-probs, bit for bit."""

from __future__ import annotations

import pytest

from pipeline_lib.generation.sampling import SamplingSpec, sample

IDS = [[5, 17, 33, 41, 9, 12, 88], [7, 7, 21, 64]]


def _compiled(model):
    df, st = sample(model.path, IDS, SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=10, seed=1, quiet=True,
                                                  compile="on", reuse_worker="off"))
    df = df.sort_values(["prompt_index", "sample_index"])
    return [(list(t), lp) for t, lp in zip(df.response_token_ids, df.behavior_logp_seq)], st


@pytest.mark.slow
def test_second_compiled_start_loads_from_the_cache_and_draws_the_same(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))  # empty: the first start must compile
    first, st1 = _compiled(tiny_model)
    second, st2 = _compiled(tiny_model)
    assert (st1["compiled"], st1["compiled_from_cache"]) == (True, False)
    assert (st2["compiled"], st2["compiled_from_cache"]) == (True, True)
    assert second == first
    assert any(p.name == "model" for p in (tmp_path / "vllm-cache").rglob("*"))  # vLLM's saved compiled model
