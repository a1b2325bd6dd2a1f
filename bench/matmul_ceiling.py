"""A decode step's matmuls alone: the tokens/s an engine would make on this machine if nothing else took time.

Why: the compute roofline (2 N FLOPs a token over the peak of one large square bf16 matmul) assumes every GEMM of a
step runs at that peak. A decode step's GEMMs are not that matmul: M is the batch (at most prompts x K rows), K is the
hidden size (576 for SmolLM2), and every weight is read from memory once a step. This replays exactly those GEMMs on
the CPU, each layer with its own weight (so weights stream from memory as in the engine, not from a warm cache), fused
as vLLM fuses them (q|k|v, gate|up), through vLLM's own CPU GEMM dispatch (``dispatch_cpu_unquantized_gemm``: oneDNN
here), and times whole steps. No attention, norm, sampling or scheduling runs, so ``batch / step time`` bounds what
any engine built on these kernels can generate: the gap between it and an engine's tokens/s is everything but the
matmuls.
Run: python -m bench.matmul_ceiling [--model embedded:smollm2-135m-instruct] [--batch 128 --batch 84]
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, action="append", help="rows a step (repeatable; default 128, 64, 32)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    from pipeline_lib.models import resolve

    rows = replay(resolve(a.model).path, a.batch or [128, 64, 32], a.reps)
    result = {"bench": "matmul_ceiling", "machine": machine(), "settings": vars(a), "rows": rows}
    save("matmul_ceiling", result)
    print(md_table(rows, ["batch", "gemms_per_step", "step_ms", "tflops", "ceiling_tok_s"]))
    return result


if __name__ == "__main__":
    main()
