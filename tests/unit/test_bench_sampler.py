"""bench.sampler's draws sample from softmax(logits): over many rows, each with its own logits, every token's count
matches the sum of its probabilities within sampling error (4 standard errors per token)."""

import torch

from bench.sampler import draws, random_logits


def test_both_draws_sample_the_softmax():
    rows, vocab = 40000, 6
    logits = random_logits(rows, vocab)
    fns = draws(logits)
    torch.manual_seed(1)
    for name in ("gumbel_fused (vLLM CPU)", "inverse_cdf (shipped, two levels)", "inverse_cdf, one running sum"):
        ids = fns[name]()
        assert ids.shape == (rows,) and int(ids.min()) >= 0 and int(ids.max()) < vocab
        # each row has its own logits: the expected count of token j is the sum of its probabilities over the rows
        p = logits.float().softmax(-1)
        expected = p.sum(0)
        sd = (p * (1 - p)).sum(0).sqrt()
        counts = torch.bincount(ids, minlength=vocab).float()
        assert ((counts - expected).abs() <= 4 * sd + 1).all(), (name, counts.tolist(), expected.tolist())
    assert fns["log_softmax (logprobs=0)"]().exp().sum(-1).sub(1).abs().max() < 1e-4
