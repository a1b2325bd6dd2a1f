"""A decode step's matmuls alone: the tokens/s an engine would make on this machine if nothing else took time.

Why: the compute roofline (2 N FLOPs a token over the peak of one large square bf16 matmul) assumes every GEMM of a
step runs at that peak. A decode step's GEMMs are not that matmul: M is the batch (at most prompts x K rows), K is the
hidden size (576 for SmolLM2), and every weight is read from memory once a step. This replays exactly those GEMMs on
the CPU, each layer with its own weight (so weights stream from memory as in the engine, not from a warm cache), fused
as vLLM fuses them (q|k|v, gate|up), through vLLM's own CPU GEMM dispatch (``dispatch_cpu_unquantized_gemm``: oneDNN
here), and times whole steps. No attention, norm, sampling or scheduling runs, so ``batch / step time`` bounds what
any engine built on these kernels can generate: the gap between it and an engine's tokens/s is everything but the
matmuls.
``--in-engine`` also times the collect engine's own GEMMs where they run while it samples bench.generation's
workload (the rest of its wall time is everything else: attention, norms, sampling, scheduling).
Run: python -m bench.matmul_ceiling [--model embedded:smollm2-135m-instruct] [--batch 128 --batch 84] [--in-engine]
"""

from __future__ import annotations

import argparse
import time

from bench.common import machine, md_table, save

# checkpoint projection -> the one GEMM vLLM runs it in (QKVParallelLinear, MergedColumnParallelLinear)
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def gemm_shapes(model_path: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of every GEMM of one decode step, in checkpoint order, with vLLM's fusions applied.

    The input embedding is a lookup, except with tied embeddings, where the same matrix is the output head."""
    import json
    from pathlib import Path

    from pipeline_lib.cost.accounting import parameter_shapes

    tied = json.loads((Path(model_path) / "config.json").read_text()).get("tie_word_embeddings", False)
    gemms: dict[str, list[int]] = {}
    for name, shape in parameter_shapes(model_path).items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue  # norms and biases
        if name.endswith("embed_tokens.weight"):
            if not tied:
                continue
            name = "lm_head.weight"
        parent, _, leaf = name[: -len(".weight")].rpartition(".")
        key = f"{parent}.{FUSED.get(leaf, leaf)}" if parent else FUSED.get(leaf, leaf)
        n, k = shape
        if key in gemms:
            if gemms[key][1] != k:
                raise ValueError(f"{name}: K={k} cannot fuse into {key} with K={gemms[key][1]}")
            gemms[key][0] += n
        else:
            gemms[key] = [n, k]
    return [(key, n, k) for key, (n, k) in gemms.items()]


def cpu_gemm(n: int, k: int, seed: int):
    """A layer holding a random bf16 (N, K) weight, with the CPU GEMM vLLM would pick for it as ``cpu_linear``."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    g = torch.Generator().manual_seed(seed)
    layer.weight = torch.nn.Parameter((torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16),
                                      requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def replay(model_path: str, batches: list[int], reps: int = 5, warmup: int = 2) -> list[dict]:
    """Time ``reps`` whole steps of the model's GEMMs at each batch, after ``warmup`` untimed ones."""
    import torch

    shapes = gemm_shapes(model_path)
    layers = [(cpu_gemm(n, k, seed=i), k) for i, (_, n, k) in enumerate(shapes)]
    flops_per_row = 2 * sum(n * k for _, n, k in shapes)
    rows = []
    for b in batches:
        xs = {k: torch.randn(b, k).to(torch.bfloat16) for k in {k for _, k in layers}}

        def step():
            for layer, k in layers:
                layer.cpu_linear(xs[k], layer.weight, None)

        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        step_s = (time.perf_counter() - t0) / reps
        rows.append({"batch": b, "gemms_per_step": len(layers), "step_ms": step_s * 1e3,
                     "tflops": b * flops_per_row / step_s / 1e12, "ceiling_tok_s": b / step_s})
    return rows


def in_engine(model_path: str, prompt_ids: list[list[int]], k: int, max_tokens: int) -> dict:
    """The collect stage's engine (the worker's ``build_engine``, in this process) samples K completions of each prompt
    at T = 1 while every CPU GEMM it dispatched is timed where it runs: how much of the engine's wall time its matmuls
    take, prefill included, without a profiler's per-operator cost. Call under ``if __name__ == "__main__"``."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the timers are
    import vllm.model_executor.layers.utils as vllm_layer_utils
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline_lib.generation import vllm_worker

    vllm_worker._apply_engine_defaults({"kv_cache_gib": 2})
    spent = {"s": 0.0, "calls": 0}
    dispatch = vllm_layer_utils.dispatch_cpu_unquantized_gemm

    def timed_dispatch(layer, remove_weight):
        dispatch(layer, remove_weight)
        gemm = layer.cpu_linear

        def timed(x, weight, bias):
            t = time.perf_counter()
            out = gemm(x, weight, bias)
            spent["s"] += time.perf_counter() - t
            spent["calls"] += 1
            return out

        layer.cpu_linear = timed

    vllm_layer_utils.dispatch_cpu_unquantized_gemm = timed_dispatch  # read from the module at each weight load
    try:
        llm, _, _ = vllm_worker.build_engine({"model": model_path, "seed": 0})
    finally:
        vllm_layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    reqs = [TokensPrompt(prompt_token_ids=i) for i in prompt_ids]
    params = SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=max_tokens, logprobs=0)
    llm.generate(reqs[:2], params, use_tqdm=False)  # warm-up: one-off loads stay out
    spent.update(s=0.0, calls=0)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"generated_tokens": tokens, "prompt_tokens": sum(map(len, prompt_ids)), "wall_s": wall,
            "tokens_per_s": tokens / wall, "gemm_s": spent["s"], "gemm_calls": spent["calls"],
            "gemm_share": spent["s"] / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, action="append", help="rows a step (repeatable; default 128, 64, 32)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--in-engine", action="store_true",
                    help="also time the engine's own GEMMs while it samples bench.generation's workload")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args(argv)
    from pipeline_lib.models import resolve

    path = resolve(a.model).path
    # the replay first: after an engine has run in this process, the same replay measured 10-20% slower (2026-12-06)
    rows = replay(path, a.batch or [128, 64, 32], a.reps)
    engine = None
    if a.in_engine:
        from bench.generation import bench_prompt_ids

        engine = in_engine(path, bench_prompt_ids(a.model, a.prompts)[1], a.k, a.max_tokens)
    result = {"bench": "matmul_ceiling", "machine": machine(), "settings": vars(a), "rows": rows, "engine": engine}
    save("matmul_ceiling", result)
    print(md_table(rows, ["batch", "gemms_per_step", "step_ms", "tflops", "ceiling_tok_s"]))
    if engine:
        print(f"\nthe engine: {engine['generated_tokens']} tokens in {engine['wall_s']:.2f} s "
              f"({engine['tokens_per_s']:.0f} tok/s, {engine['prompt_tokens']} prompt tokens); its GEMMs "
              f"{engine['gemm_s']:.2f} s in {engine['gemm_calls']} calls ({engine['gemm_share']:.0%} of the wall time)")
    return result


if __name__ == "__main__":
    main()
