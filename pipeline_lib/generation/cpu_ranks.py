"""The rank of each sampled token on CPU, without a compile for jobs that do not need one.

Asked for ``logprobs=0`` (every job here: the behavior log-probs), vLLM also ranks each sampled token among the
vocabulary, the count of entries whose log-prob is at least the token's, with ``batched_count_greater_than``, a
``torch.compile``d one-liner. Its first call in a process traces and compiles it inside the job's generation: 1.9 s
with a warm Inductor cache and about 10 s with an empty one (2 cores of an AMD EPYC, 2026-12-06), for a job that may
take 30 ms (a test's tiny model) or the first collect on a fresh machine. The same count as a plain tensor op is the
same integers and costs 2.5-3.6 ms a call at 128 rows of 49,152 entries, against 0.8 ms compiled. So a process ranks
with the plain op for its first ``EAGER_CALLS`` calls (at most about 2 s of plain counting at that size); a process
that makes more is serving long jobs and switches to vLLM's compiled op, paying its compile once, as vLLM does.
GPUs keep vLLM's op throughout.
"""

from __future__ import annotations

EAGER_CALLS = 512  # engine steps ranked with the plain op before a process moves to vLLM's compiled op
calls = {"eager": 0, "compiled": 0}  # this process's calls by path; the worker reports each job's share of both
_vllm_count = None  # vLLM's compiled op, once patched


def count_at_least(x, values):
    """Per row of ``x`` (rows, vocab), how many entries are >= that row's entry of ``values`` (rows, 1), as int64,
    which is what vLLM's op returns (NaN compares false on both paths)."""
    if calls["eager"] < EAGER_CALLS:
        import torch

        calls["eager"] += 1
        # an int32 sum: the default bool -> int64 reduction is 5x slower here (19 ms against 3.6 ms at 128 rows)
        return torch.ge(x, values).sum(-1, dtype=torch.int32).to(torch.int64)
    calls["compiled"] += 1
    return _vllm_count(x, values)


def configure(on_gpu: bool) -> bool:
    """Rank with ``count_at_least`` in this process's CPU engines; returns whether it is installed."""
    global _vllm_count
    if on_gpu:
        return False
    if _vllm_count is None:
        import vllm.v1.sample.sampler as vllm_sampler

        # the sampler module imported the op by name at its import: replace that name
        _vllm_count = vllm_sampler.batched_count_greater_than
        vllm_sampler.batched_count_greater_than = count_at_least
    return True
