"""The size of a vLLM engine's KV-cache blocks, and why CPU engines do not keep vLLM's default.

vLLM's prefix cache shares only *full* blocks. On CPU it pages the KV cache in blocks of 128 tokens, longer than
most prompts here (the chat template's system prompt plus an instruction: 47-75 tokens for the builtin prompts), so
with the default nothing is shared: each of the K samples of a prompt pre-fills the whole prompt again, and so does
every prompt that starts with the same system prompt. Blocks of 32 tokens (the smallest size for which vLLM keeps
prefix caching on CPU: it must be a multiple of 32) let them share every full block, within the same engine step:
vLLM registers a block in the cache when it is allocated, and each layer writes a step's keys and values before its
attention reads them.

Measured (2 cores of an AMD EPYC, 2026-12-06, 32 prompts x K = 4, <= 128 tokens, eager, after an untimed warm-up
run): the first engine step pre-fills 3,652 prompt rows instead of 7,944; tokens/s 613 against 548 with blocks of 128
(1.12x, bench.generation) and 424 against 389 (1.09x, bench.generation_vs_commit, three rotated rounds). A first
reading of 1.26x had the 128 side run first, in the slower first vLLM process of the run, and is not counted.
GPUs keep vLLM's own default (16 on CUDA), which shares already."""

from __future__ import annotations

CPU_BLOCK = 32
CPU_MULTIPLE = 32  # vLLM 0.32, platforms/cpu.py: any other size turns prefix caching and chunked prefill off


def engine_args(block_size: int | None, on_gpu: bool) -> dict:
    """vLLM engine arguments for a ``kv_block_size`` setting: None keeps vLLM's default on GPUs and uses CPU_BLOCK
    on CPU; a number is used as given, except on CPU where a size that is not a multiple of 32 would quietly turn
    prefix caching off, so it is refused."""
    if block_size is None:
        return {} if on_gpu else {"block_size": CPU_BLOCK}
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"kv_block_size={block_size!r}: expected a positive whole number of tokens, or null")
    if not on_gpu and block_size % CPU_MULTIPLE:
        raise ValueError(f"kv_block_size={block_size}: on CPU, vLLM keeps prefix caching only for block sizes that "
                         f"are multiples of {CPU_MULTIPLE} (it would silently turn it off); use e.g. {CPU_BLOCK}")
    return {"block_size": block_size}
