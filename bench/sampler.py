"""How long one decode step's random draw takes on this machine: vLLM's CPU sampler (Gumbel-max with a SplitMix64
draw per vocabulary entry, one fused C++ op) against the inverse-CDF draw CPU engines use since 2026-12-06
(pipeline_lib/generation/cpu_sampler.py: one uniform per row, a two-level search over chunks of 256 entries) and the
same draw with one running sum over the whole vocabulary, on the same float32 logits, plus the log-softmax the collect
stage pays for ``logprobs=0``. All draws sample exactly from softmax(logits); they consume randomness differently, so
the same seed gives other tokens.

Run: python -m bench.sampler [--rows 128] [--vocab 49152] [--threads 2] [--repeats 30]
Writes bench/results/sampler[_TAG].json. Compare a draw's time with a decode step's (bench.generation's tokens/s at
the same batch); bench.generation's ``cpu_sampler`` variant measures the whole engine with either draw.
"""

from __future__ import annotations

import argparse
import time


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: first calls allocate and load
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def random_logits(rows: int, vocab: int):
    """A fixed bf16 logits matrix (seed 0), spread like a model's (standard deviation 3)."""
    import torch

    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)


def draws(logits):
    """The contenders on one bf16 logits matrix, each taking it as vLLM does (to float32 first)."""
    import torch
    import vllm._custom_ops  # noqa: F401  registers torch.ops._C, vLLM's CPU kernels

    from pipeline_lib.generation import cpu_sampler

    rows, vocab = logits.shape

    def gumbel_fused():
        seeds = torch.randint(0, 2**31, (rows,), dtype=torch.long)
        return torch.ops._C.fused_gumbel_argmax(logits.to(torch.float32), seeds)

    def inverse_cdf():
        return cpu_sampler.inverse_cdf(logits.to(torch.float32))  # a float32 copy: the draw works in place

    def inverse_cdf_one_level():
        return cpu_sampler.inverse_cdf(logits.to(torch.float32), chunk=vocab)

    def log_softmax():
        return logits.log_softmax(-1, dtype=torch.float32)

    return {"gumbel_fused (vLLM CPU)": gumbel_fused, "inverse_cdf (shipped, two levels)": inverse_cdf,
            "inverse_cdf, one running sum": inverse_cdf_one_level, "log_softmax (logprobs=0)": log_softmax}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128, help="sequences in the decode batch (32 prompts x K=4)")
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    import torch

    from bench.common import machine, md_table, save

    torch.set_num_threads(a.threads)
    rows = [{"draw": name, "median ms": round(_median_ms(fn, a.repeats), 2)}
            for name, fn in draws(random_logits(a.rows, a.vocab)).items()]
    print(md_table(rows, ["draw", "median ms"]))
    path = save("sampler" + (f"_{a.tag}" if a.tag else ""),
                {"machine": machine(), "rows": a.rows, "vocab": a.vocab, "threads": a.threads, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
