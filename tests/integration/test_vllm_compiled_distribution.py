"""vLLM's compiled model (``compile: on``), the eager engine with the C++ RMSNorm kernels (``cpu_kernels: auto``,
pipeline_lib/generation/cpu_kernels.py) and an engine whose samples do not share the prompt's KV blocks (vLLM's CPU
block of 128 instead of kv_blocks.py's 32), all drawing by inverse CDF (``cpu_sampler: auto``,
pipeline_lib/generation/cpu_sampler.py), sample from the same distribution as the eager engine as vLLM ships it
(native norm, Gumbel-max kernel) and as the model itself.

The reference is the model's own next-token distribution computed by transformers (weights in bfloat16, as vLLM
runs them, softmax at the sampling temperature). Each engine draws 4,000 first tokens of one chat prompt; tokens are
grouped into bins of about equal reference mass (a token holding more than one bin's mass is a bin of its own), so
every bin expects >= 250 draws and Pearson's chi-square is well approximated. A wrong temperature, a wrong logit
(e.g. a missing layer norm under compilation, a wrong key or value read from a shared block) or a biased sampler
moves a bin's mass by far more than its standard error (under 0.008)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_lib.generation.sampling import SamplingSpec, render_chat, sample

T, N, BINS = 0.3, 4000, 8


def _reference(tiny_model, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model.path, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.softmax(logits / T, -1).double().numpy()


def _mass_bins(p: np.ndarray) -> np.ndarray:
    """Each token's bin: tokens by descending probability, cut at multiples of 1/BINS of cumulative mass (a token
    straddling a cut goes to the bin where it starts; empty bins are dropped)."""
    order = np.argsort(-p)
    start = np.cumsum(p[order]) - p[order]
    bins = np.minimum((start * BINS).astype(int), BINS - 1)
    bins = np.unique(bins, return_inverse=True)[1]
    out = np.empty_like(bins)
    out[order] = bins
    return out


@pytest.mark.slow
def test_compiled_eager_and_c_kernel_engines_sample_the_models_distribution(tiny_model):
    from scipy.stats import chi2_contingency, chisquare
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    # 55 tokens: one full block of 32 that the 4,000 samples share on CPU (and 23 each computes on top of it)
    _, (ids,) = render_chat(tok, [[{"role": "user", "content": "Name a color that you would paint a small wooden boat "
                                                               "with, and say in one short sentence why it suits the "
                                                               "sea."}]])
    assert 32 < len(ids) < 64, len(ids)
    p = _reference(tiny_model, ids)
    bin_of = _mass_bins(p)
    expected = np.bincount(bin_of, weights=p)
    # every engine but the last shares the prompt's KV blocks among its 4,000 samples (blocks of 32 on CPU,
    # kv_blocks.py); the last keeps vLLM's CPU block of 128, which the prompt does not fill: nothing shared
    engines = {"eager": dict(compile="off", cpu_kernels="native", cpu_sampler="native"), "compiled": dict(compile="on"),
               "eager, C kernels": dict(compile="off"), "eager, C kernels, blocks of 128": dict(kv_block_size=128)}
    counts, flags = {}, {}
    for name, kw in engines.items():
        df, stats = sample(tiny_model.path, [ids], SamplingSpec(n=N, temperature=T, top_p=1.0, max_tokens=1, seed=0,
                                                                quiet=True, **kw))
        flags[name] = (stats["compiled"], stats["cpu_c_kernels"], stats["cpu_c_kernel_calls"] > 0,
                       stats["kv_block_size"], stats["cached_prompt_tokens"] > 0,
                       stats["cpu_sampler"], stats["cpu_sampler_calls"] > 0)
        first = np.array([t[0] for t in df["response_token_ids"]])
        counts[name] = np.bincount(bin_of[first], minlength=len(expected))
        fit = chisquare(counts[name], expected / expected.sum() * N)
        assert fit.pvalue > 1e-3, (name, counts[name], (expected * N).round(), fit)
    assert flags == {"eager": (False, False, False, 32, True, False, False),
                     "compiled": (True, False, False, 32, True, True, True),
                     "eager, C kernels": (False, True, True, 32, True, True, True),
                     "eager, C kernels, blocks of 128": (False, True, True, 128, False, True, True)}
    same = chi2_contingency(np.stack(list(counts.values())))
    assert same.pvalue > 1e-3, (counts, same)
