"""A compiled CPU engine loads its model from vLLM's compile cache on the next start (compile_cache.py), and samples
exactly what an engine compiled from scratch samples: token ids and log-probs, bit for bit. The cache is keyed by the
model's architecture, not its path: another checkpoint of the same architecture, asked for another length, loads the
first one's compiled model and samples what it samples when compiled from scratch, not what the first one samples
(which a graph with the first checkpoint's weights baked in would)."""

from __future__ import annotations

import pytest

from pipeline_lib.generation.sampling import SamplingSpec, sample
from pipeline_lib.models import resolve

IDS = [[5, 17, 33, 41, 9, 12, 88], [7, 7, 21, 64]]


def _compiled(model, max_tokens=10):
    df, st = sample(model.path, IDS, SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=1,
                                                  quiet=True, compile="on", reuse_worker="off"))
    df = df.sort_values(["prompt_index", "sample_index"])
    return [(list(t), lp) for t, lp in zip(df.response_token_ids, df.behavior_logp_seq)], st


@pytest.mark.slow
def test_a_compiled_model_loads_for_another_checkpoint_and_draws_what_a_fresh_compile_draws(tiny_model, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))  # empty: the first start must compile
    first, st1 = _compiled(tiny_model)
    assert (st1["compiled"], st1["compiled_from_cache"]) == (True, False)
    assert any(p.name == "model" for p in (tmp_path / "vllm-cache").rglob("*"))  # vLLM's saved compiled model

    # another checkpoint of the same architecture (tiny:1: the same configuration, other weights, another directory),
    # 12 new tokens instead of 10 (max_model_len 27 instead of 25: both in the bucket of 256) loads that model ...
    other = resolve("tiny:1")
    assert other.path != tiny_model.path
    loaded, st2 = _compiled(other, max_tokens=12)
    assert (st2["compiled"], st2["compiled_from_cache"]) == (True, True)
    # ... and draws, token ids and log-probs bit for bit, what it draws compiled from scratch (an empty cache again)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache-2"))
    fresh, st3 = _compiled(other, max_tokens=12)
    assert (st3["compiled"], st3["compiled_from_cache"]) == (True, False)
    assert loaded == fresh
    # and not what the first checkpoint draws with the same seed (its weights baked into the graph would)
    assert [t[:10] for t, _ in loaded] != [t for t, _ in first]
