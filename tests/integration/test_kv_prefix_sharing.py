"""K samples of a prompt share its KV blocks on CPU (pipeline_lib/generation/kv_blocks.py): the counts of prompt
tokens the engine read from its prefix cache, worked out by hand, and the same draws for the same seed.

Two prompts of 70 tokens whose first 40 tokens agree, n = 4 samples each, so the engine is asked to pre-fill
2 x 4 x 70 = 560 prompt tokens. Only full blocks are shared, and a block counts as cached as soon as an earlier
request of the same step has it allocated.
- Blocks of 32: prompt A has full blocks [0, 32) and [32, 64). Its first sample finds nothing; the other three find
  both blocks (3 x 64 = 192). Prompt B's first sample finds block [0, 32) (the shared 40 tokens cover it; its
  [32, 64) differs from A's): 32; its other three find both of its own blocks: 192. Total 416.
- Blocks of 64: A's [0, 64) is found by its three later samples (192); B's [0, 64) differs from A's (they part at
  token 40), so only B's own later samples find it (192). Total 384.
- Blocks of 128 (vLLM's CPU default): no prompt fills a block, nothing is shared: 0."""

from __future__ import annotations

import pytest

from pipeline_lib.generation.sampling import SamplingSpec, sample

A = list(range(10, 80))
B = A[:40] + list(range(200, 230))


def _run(model, block):
    return sample(model.path, [A, B], SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=6, seed=0, quiet=True,
                                                   kv_block_size=block, reuse_worker="off"))


@pytest.fixture(scope="module")
def default_run(tiny_model):
    """One run at the default block size, read by both tests (an engine start is most of a run's time)."""
    return _run(tiny_model, None)


@pytest.mark.slow
def test_samples_of_a_prompt_share_its_full_blocks(tiny_model, default_run):
    counts = {}
    for block in (None, 64, 128):
        _, st = default_run if block is None else _run(tiny_model, block)
        counts[block] = (st["kv_block_size"], st["prefix_caching"], st["prompt_tokens"], st["cached_prompt_tokens"])
    assert counts == {None: (32, True, 560, 416), 64: (64, True, 560, 384), 128: (128, True, 560, 0)}


@pytest.mark.slow
def test_shared_blocks_draw_the_same_samples_for_the_same_seed(tiny_model, default_run):
    first, _ = default_run
    again, _ = _run(tiny_model, None)
    draws = [df.sort_values(["prompt_index", "sample_index"])[["response_token_ids", "behavior_logp_seq"]]
             for df in (first, again)]
    assert [list(t) for t in draws[0].response_token_ids] == [list(t) for t in draws[1].response_token_ids]
    assert draws[0].behavior_logp_seq.tolist() == draws[1].behavior_logp_seq.tolist()
    assert len({tuple(t) for t in draws[0].response_token_ids}) > 1  # samples, not one answer repeated
