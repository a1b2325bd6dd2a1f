"""Inverse-CDF sampling for vLLM's CPU sampler: one uniform number a row instead of one per vocabulary entry.

Why: vLLM 0.32 samples on CPU by Gumbel-max (``TopKTopPSampler.forward_cpu`` -> ``_C::fused_gumbel_argmax``): a
SplitMix64 draw and two logarithms for every one of the 49,152 vocabulary entries of every row, every step. In a
torch.profiler run of the collect engine (2026-12-06, 2 cores of an AMD EPYC, 32 prompts x 4 samples, 64 tokens,
eager; docs/bench-results/generation_profile_cpu_2026-12-06.json) that kernel took 9% of the step (13 ms a step for
128 rows); on the 2-core Intel machine 13% (cpu_kernels.py). Sampling a categorical by its inverse CDF needs the
unnormalised probabilities exp(l - max l), their running sum, one uniform u a row and a binary search for the first
entry whose running sum exceeds u times the total: a few vectorised passes and no per-entry random numbers.
Both methods draw exactly from softmax(l); they only consume random numbers differently, so the same seed gives
different (equally distributed) samples than vLLM's kernel.

Numerics: the running sums are float32, so each entry's effective probability (the difference of two rounded running
sums) is off by about one float32 ulp of the total (6e-8 of it), far below what bfloat16 logits already carry
(a logit of 10 is rounded by up to 0.03, which moves its probability by 3%). tests/unit/test_cpu_sampler.py checks
draws worked out by hand and that masked (-inf) entries are never drawn, even at u = 0 and at u just under 1;
tests/integration/test_vllm_compiled_distribution.py checks the engine's first-token distribution against the
model's.

Applies to CPU engines only (a GPU engine never binds ``forward_cpu``), to rows without their own generator (seeded
requests crash the CPU sampler anyway: vllm_worker.py), and not where vLLM must return processed logits or logprobs,
or draws float64 Gumbel noise on request: those keep vLLM's path. Top-k / top-p masks are applied first by vLLM's own
function, as in its path. ``cpu_sampler: native`` keeps vLLM's kernel for a job.
"""

from __future__ import annotations

calls = 0  # sampler calls (engine steps) served here in this process: the worker reports it, so a fallback shows
_enabled = False  # this job's setting: a kept worker (warm.py) serves jobs with either setting in one process
_vllm_forward_cpu = None  # vLLM's own method, kept for what this does not take
_vllm_helpers = None  # (PROCESSED_LOGPROBS_MODES, apply_top_k_top_p), bound by configure, not at each engine step
CHUNK = 256  # entries a chunk of the two-level search (49,152 = 192 x 256 for SmolLM2's vocabulary)


def inverse_cdf(logits, u=None, chunk: int = CHUNK):
    """One draw a row from softmax(``logits``) (rows of any float dtype; modified in place when float32).

    ``u``: uniform numbers in [0, 1), one a row (shape (rows, 1)); drawn from torch's global generator when None,
    which vLLM seeds with the engine's seed, so the same seed gives the same draws. The search is in two levels: the
    running mass at the end of each ``chunk`` of entries finds the chunk, a running sum inside that one chunk finds
    the entry (a running sum over the whole vocabulary is a chain of 49,152 dependent additions a row: 15-20 ms for
    128 rows here, against 4.2-4.5 ms in two levels and 20-23 ms for vLLM's Gumbel kernel; bench.sampler, two runs,
    2026-12-06)."""
    import torch

    w = logits.to(torch.float32)
    w.sub_(w.amax(dim=-1, keepdim=True)).exp_()  # unnormalised probabilities, the row's largest entry exactly 1
    rows, vocab = w.shape
    if vocab % chunk:
        w = torch.nn.functional.pad(w, (0, chunk - vocab % chunk))  # entries of no mass: never drawn
    blocks = w.view(rows, -1, chunk)
    ends = blocks.sum(dim=-1).cumsum_(dim=-1)  # the running mass at each chunk's end
    total = ends[:, -1:].contiguous()
    if u is None:
        u = torch.rand(total.shape, dtype=torch.float32)
    target = u * total
    # the first chunk / entry whose running sum exceeds the target: one of no mass adds nothing to the sum, so it is
    # never the first to exceed anything
    c = _first_above(ends, target)
    before = torch.where(c > 0, ends.gather(1, (c - 1).clamp(min=0)), 0.0)
    inner = blocks[torch.arange(rows), c.view(-1)].cumsum(dim=-1)
    return c.view(-1) * chunk + _first_above(inner, target - before).view(-1)


def _first_above(sums, x):
    """Per row, the first index whose running sum exceeds x. Where rounding puts x at or past the row's last sum (u
    just under 1, or a chunk's inner sum a rounding short of its mass in ``ends``), the last index with mass: the
    first one whose running sum reaches the row's total."""
    import torch

    idx = torch.searchsorted(sums, x, right=True)
    over = idx >= sums.shape[-1]
    if bool(over.any()):
        idx = torch.where(over, torch.searchsorted(sums, sums[:, -1:].contiguous(), right=False), idx)
    return idx


def _forward_cpu(self, logits, generators, k, p):
    processed_modes, apply_top_k_top_p = _vllm_helpers
    if not _enabled or generators or self.use_fp64_gumbel or self.logprobs_mode in processed_modes:
        return _vllm_forward_cpu(self, logits, generators, k, p)
    global calls
    calls += 1
    return inverse_cdf(apply_top_k_top_p(logits, k, p)), None


def configure(mode: str, on_gpu: bool) -> bool:
    """Set this job's sampler before its engine is built: "auto" samples by inverse CDF on CPU, "native" keeps vLLM's
    Gumbel kernel. Returns whether the inverse-CDF sampler is on."""
    global _enabled, _vllm_forward_cpu, _vllm_helpers
    modes = {"auto": lambda: not on_gpu, "native": lambda: False}
    if mode not in modes:
        raise ValueError(f"cpu_sampler={mode!r}: expected one of {sorted(modes)}")
    _enabled = modes[mode]()
    if _enabled and _vllm_forward_cpu is None:
        from vllm.v1.sample.ops.topk_topp_sampler import (PROCESSED_LOGPROBS_MODES, TopKTopPSampler,
                                                          apply_top_k_top_p)

        # the engine binds forward_cpu to its sampler when it builds it: patch the class before that
        _vllm_helpers = (PROCESSED_LOGPROBS_MODES, apply_top_k_top_p)
        _vllm_forward_cpu = TopKTopPSampler.forward_cpu
        TopKTopPSampler.forward_cpu = _forward_cpu
    return _enabled
