"""Inverse-CDF sampling for vLLM's CPU sampler (pipeline_lib/generation/cpu_sampler.py): draws worked out by hand,
masked entries never drawn, the empirical distribution of many draws, and the setting's modes."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline_lib.generation import cpu_sampler


def _logits(probs):
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in row] for row in probs], dtype=torch.float32)


def test_draws_worked_out_by_hand():
    # running sums of (0.1, 0.2, 0.3, 0.4): 0.1, 0.3, 0.6, 1.0 (of a total 1.0 after scaling by the largest entry);
    # the draw is the first entry whose running sum exceeds u
    probs = [[0.1, 0.2, 0.3, 0.4]] * 6
    u = torch.tensor([[0.0], [0.05], [0.1], [0.29], [0.61], [0.999999]])
    assert cpu_sampler.inverse_cdf(_logits(probs), u).tolist() == [0, 0, 1, 1, 3, 3]
    # u = 0.1 lands exactly on the first running sum: it belongs to the next entry (sums are exclusive on the right)


def test_two_level_search_by_hand():
    # chunks of 2 entries: (0.1, 0.2 | 0.3, 0.4) end at running masses 0.3 and 1.0; 5 entries are padded to 6 with an
    # entry of no mass, which is never drawn, even when u * total rounds up to the total (u = 1.0 here)
    probs = [[0.1, 0.2, 0.3, 0.4]] * 5
    u = torch.tensor([[0.05], [0.15], [0.3], [0.65], [0.999999]])
    assert cpu_sampler.inverse_cdf(_logits(probs), u, chunk=2).tolist() == [0, 1, 2, 3, 3]
    probs = [[0.2, 0.2, 0.2, 0.2, 0.2]] * 4
    u = torch.tensor([[0.0], [0.39], [0.81], [1.0]])
    assert cpu_sampler.inverse_cdf(_logits(probs), u, chunk=2).tolist() == [0, 1, 4, 4]
    # a chunk with no mass at all is skipped: (0.5, 0 | 0, 0 | 0, 0.5)
    probs = [[0.5, 0.0, 0.0, 0.0, 0.0, 0.5]] * 3
    u = torch.tensor([[0.49], [0.5], [1.0]])
    assert cpu_sampler.inverse_cdf(_logits(probs), u, chunk=2).tolist() == [0, 5, 5]


def test_rows_are_independent_and_scale_free():
    # a row's logits shifted by a constant are the same distribution; rows do not see each other
    probs = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    x = _logits(probs) + torch.tensor([[30.0], [-7.0]])
    assert cpu_sampler.inverse_cdf(x, torch.tensor([[0.6], [0.3]])).tolist() == [1, 1]
    assert cpu_sampler.inverse_cdf(_logits(probs), torch.tensor([[0.8], [0.41]])).tolist() == [2, 2]


def test_masked_entries_are_never_drawn():
    # -inf (top-k / top-p masks) at both ends and in the middle; u at 0, on the boundaries and just under 1
    probs = [[0.0, 0.5, 0.0, 0.5, 0.0]] * 5
    u = torch.tensor([[0.0], [0.5], [0.4999999], [1 - 2 ** -24], [1.0]])  # 1.0: u * total equals the total
    assert cpu_sampler.inverse_cdf(_logits(probs), u).tolist() == [1, 3, 1, 3, 3]


def test_many_draws_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    p = torch.softmax(logits, -1)[0].double()
    n = 200_000
    for chunk in (256, 10, 7):  # one (padded) chunk for all 50 entries; two levels; two levels with padding
        draws = cpu_sampler.inverse_cdf(logits.repeat(n, 1), chunk=chunk)
        _fits(torch.bincount(draws, minlength=50).double(), p, n)
    # the same generator state gives the same draws
    torch.manual_seed(1)
    a = cpu_sampler.inverse_cdf(logits.repeat(64, 1))
    torch.manual_seed(1)
    assert torch.equal(a, cpu_sampler.inverse_cdf(logits.repeat(64, 1)))


def _fits(counts, p, n):
    from scipy.stats import chisquare

    keep = p * n >= 20  # chi-square needs enough expected counts: pool the rare tail into one cell
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    exp = torch.cat([p[keep] * n, (p[~keep] * n).sum().view(1)])
    assert chisquare(obs.numpy(), (exp * n / exp.sum()).numpy()).pvalue > 1e-3


def test_modes():
    assert cpu_sampler.configure("native", on_gpu=False) is False
    assert cpu_sampler.configure("auto", on_gpu=True) is False  # GPUs keep vLLM's own samplers
    assert cpu_sampler.configure("auto", on_gpu=False) is True
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    assert TopKTopPSampler.forward_cpu is cpu_sampler._forward_cpu
    cpu_sampler.configure("native", on_gpu=False)  # leave the process as vLLM ships it for other tests
    with pytest.raises(ValueError, match="cpu_sampler='fast'"):
        cpu_sampler.configure("fast", on_gpu=False)
