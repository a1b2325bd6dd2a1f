"""cpu_ranks: the sampled token's rank counted by hand, equal to vLLM's compiled op, and the switch to that op."""

import math

import pytest
import torch

from pipeline_lib.generation import cpu_ranks


@pytest.fixture
def fresh_counts(monkeypatch):
    monkeypatch.setattr(cpu_ranks, "calls", {"eager": 0, "compiled": 0})


def test_counts_by_hand(fresh_counts):
    nan, inf = math.nan, math.inf
    x = torch.tensor([[0.0, -1.0, -inf, 0.0, 2.0],
                      [nan, 1.0, 1.0, -inf, 0.5],
                      [-inf, -inf, -3.0, nan, 7.0]])
    # row 0: 0, 0 and 2 are >= 0 (ties count); row 1: the two 1s (NaN compares false); row 2: every non-NaN entry
    values = torch.tensor([[0.0], [1.0], [-inf]])
    got = cpu_ranks.count_at_least(x, values)
    assert got.dtype == torch.int64 and got.tolist() == [3, 2, 4]
    assert cpu_ranks.calls == {"eager": 1, "compiled": 0}


def test_equals_vllms_compiled_op_and_switches_to_it_after_eager_calls(fresh_counts, monkeypatch):
    import vllm.v1.sample.sampler as vllm_sampler
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    monkeypatch.setattr(cpu_ranks, "EAGER_CALLS", 1)
    monkeypatch.setattr(cpu_ranks, "_vllm_count", None)
    monkeypatch.setattr(vllm_sampler, "batched_count_greater_than", batched_count_greater_than)
    assert cpu_ranks.configure(on_gpu=True) is False  # GPUs keep vLLM's op
    assert vllm_sampler.batched_count_greater_than is batched_count_greater_than
    assert cpu_ranks.configure(on_gpu=False) is True
    assert vllm_sampler.batched_count_greater_than is cpu_ranks.count_at_least
    assert cpu_ranks._vllm_count is batched_count_greater_than

    g = torch.Generator().manual_seed(0)
    # log-probs as the sampler sees them, with ties (rounded logits) and masked entries
    logits = (torch.randn(6, 300, generator=g) * 4).round()
    logits[:, ::7] = -math.inf
    lp = logits.log_softmax(-1)
    tokens = torch.randint(0, 300, (6, 1), generator=g)
    tokens[0] = 7  # a masked token: every unmasked entry is above it
    sampled = lp.gather(-1, tokens)
    want = batched_count_greater_than(lp, sampled)
    first = cpu_ranks.count_at_least(lp, sampled)  # the plain op
    second = cpu_ranks.count_at_least(lp, sampled)  # past EAGER_CALLS: vLLM's compiled op
    assert cpu_ranks.calls == {"eager": 1, "compiled": 1}
    assert first.dtype == want.dtype and torch.equal(first, want) and torch.equal(second, want)
    assert first[0].item() == 300  # all entries, the masked ones included (-inf >= -inf)
    by_hand = [sum(e >= v for e in row) for row, v in zip(lp.tolist(), sampled.view(-1).tolist())]
    assert want.tolist() == by_hand
