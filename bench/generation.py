"""Generation: the collect stage's vLLM path vs batched Hugging Face ``generate``, same model, prompts, sampling,
and both against the machine's limits.

Both sample K completions per prompt at temperature 1 / top-p 1 with the same max_new_tokens and stop at EOS;
throughput is generated tokens per second of generation (engine/model load reported separately).

Rooflines, measured in the same run: a generated token costs about 2 N FLOPs (N the parameters of the matmuls, the
tied head included), so the compute roofline is ``peak / 2N`` tokens/s with ``peak`` the measured bf16 matmul rate;
a decode step reads every weight once for the whole running batch, so the memory roofline is ``B * bandwidth /
weight bytes`` for a batch of B sequences (B = prompts x K at the start of the batch, fewer as sequences finish;
KV-cache reads are left out, so it is an upper bound). The fraction reported is of the lower of the two. A tighter
bound on CPUs: the step's own GEMMs replayed alone at the run's rows a step (``bench.matmul_ceiling``), the tokens/s
of an engine whose attention, norms, sampling and scheduling took no time.

``--variant NAME=JSON`` runs the vLLM side again with those engine arguments (e.g. ``compiled={"enforce_eager":
false}``) or the worker's own settings (``{"cpu_kernels": "native"}``, ``{"compile": "on"}``), each in its own engine
process, so settings are compared in one run. ``--warmup`` (default 1) untimed vLLM runs go first: the first vLLM
process of a run generated 10-30% slower than the ones after it (2026-12-06, 2 cores of an AMD EPYC), which counted
against whichever side ran first. The cause, found that evening: with ``logprobs=0`` vLLM ranks each sampled token with
``batched_count_greater_than``, a ``torch.compile``d helper; with an empty Inductor cache its first call compiles for
about 10 s (1.9 s in a process after it, from the cache), inside the first generation (a fresh
``TORCHINDUCTOR_CACHE_DIR``, three processes in turn: 420, 583, 551 tokens/s).
Run: python -m bench.generation [--model REF] [--prompts N] [--k K] [--max-tokens T] [--variant NAME=JSON ...]
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import machine, matmul_peak_tflops, md_table, save


def hf_generate(model_path: str, prompt_ids: list[list[int]], k: int, max_tokens: int, batch_prompts: int,
                dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_tokens, t1 = 0, time.perf_counter()
    torch.manual_seed(0)
    for i in range(0, len(prompt_ids), batch_prompts):
        chunk = prompt_ids[i:i + batch_prompts]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding for decoder-only
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_tokens, num_return_sequences=k, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
        gen = out[:, width:]
        # count tokens up to and including the first EOS (what vLLM counts)
        for row in gen.tolist():
            n = len(row)
            if tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1
            n_tokens += n
    gen_s = time.perf_counter() - t1
    return {"backend": "hf_generate", "load_s": load_s, "generate_s": gen_s, "generated_tokens": n_tokens,
            "tokens_per_s": n_tokens / gen_s}


SPEC_KEYS = ("compile", "cpu_kernels", "cpu_sampler", "kv_block_size")


def vllm_collect(model_path: str, prompt_ids: list[list[int]], k: int, max_tokens: int, name: str = "",
                 engine_args: dict | None = None) -> dict:
    from pipeline_lib.generation.sampling import SamplingSpec, sample

    # the worker's own settings (SPEC_KEYS) travel beside vLLM's engine arguments
    args = dict(engine_args or {})
    own = {key: args.pop(key) for key in SPEC_KEYS if key in args}
    t0 = time.perf_counter()
    _, stats = sample(model_path, prompt_ids, SamplingSpec(n=k, temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                                           seed=0, quiet=True,
                                                           extra={"engine_args": args, **own}))
    total = time.perf_counter() - t0
    label = "alignflow collect (vLLM)" + (f" [{name}: {json.dumps(engine_args)}]" if name else "")
    return {"backend": label, "load_s": stats["load_s"], "generate_s": stats["generate_s"],
            "generated_tokens": stats["generated_tokens"], "tokens_per_s": stats["generated_tokens"] /
            stats["generate_s"], "wall_s_incl_start": total,
            **{key: stats.get(key)
               for key in ("kv_block_size", "prompt_tokens", "cached_prompt_tokens", "cpu_sampler")}}


def matmul_params(model_path: str) -> int:
    """Parameters that take part in a matmul per generated token: every GEMM weight of a step (bench.matmul_ceiling's
    shapes), so not the norms, nor the input embedding, which is a lookup; with tied embeddings that same matrix is
    the output head and does count."""
    from bench.matmul_ceiling import gemm_shapes

    return sum(n * k for _, n, k in gemm_shapes(model_path))


def memory_gbps(mib: int = 512, reps: int = 5) -> float:
    """Copy bandwidth (GB/s, bytes read + written) of a tensor much larger than the caches."""
    import torch

    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    return 2 * a.numel() * 4 * reps / (time.perf_counter() - t) / 1e9


def rooflines(n_params: int, batch: int, peak_tflops: float, gbps: float, bytes_per_param: int = 2) -> dict:
    compute = peak_tflops * 1e12 / (2 * n_params)
    memory = batch * gbps * 1e9 / (n_params * bytes_per_param)
    return {"params": n_params, "peak_bf16_tflops": peak_tflops, "memory_gbps": gbps, "batch": batch,
            "compute_roofline_tok_s": compute, "memory_roofline_tok_s": memory, "roofline_tok_s": min(compute, memory)}


def matmul_ceilings(model_path: str, batch: int, mean_rows: float) -> list[dict]:
    """The step's GEMMs alone (bench.matmul_ceiling) at the full batch and at the run's mean rows a step (generated
    tokens over max_tokens steps: sequences end early, so most steps run fewer rows than the batch); the fractions are
    taken of the second, the last entry. CPU only: on a GPU the replay would time vLLM's CPU kernels, not the
    engine's."""
    import torch

    if torch.cuda.is_available():
        return []
    from bench.matmul_ceiling import replay

    return replay(model_path, sorted({batch, max(1, round(mean_rows))}, reverse=True))


def bench_prompt_ids(model: str, n: int):
    """The resolved model and the token ids of the generation benches' prompts: the builtin generator's first n training
    prompts (seed 0) under the model's chat template, so every generation bench measures the same inputs."""
    from transformers import AutoTokenizer

    from pipeline_lib.generation.sampling import render_chat
    from pipeline_lib.models import resolve
    from pipeline_lib.prompts.builtin import generate_prompts

    m = resolve(model)
    tok = AutoTokenizer.from_pretrained(m.path)
    prompts = generate_prompts(n, 0, "train")["prompt"].tolist()
    _, ids = render_chat(tok, [[{"role": "user", "content": p}] for p in prompts])
    return m, ids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--hf-batch-prompts", type=int, default=8)
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON vLLM engine arguments, repeatable")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed vLLM runs before the timed sides")
    a = ap.parse_args(argv)
    variants = [(v.split("=", 1)[0], json.loads(v.split("=", 1)[1])) for v in a.variant]
    m, ids = bench_prompt_ids(a.model, a.prompts)
    for i in range(a.warmup):
        print(f"warm-up #{i} (not counted): {vllm_collect(m.path, ids, a.k, a.max_tokens)['tokens_per_s']:.1f} "
              f"tokens/s", flush=True)
    rows = [vllm_collect(m.path, ids, a.k, a.max_tokens)]
    rows += [vllm_collect(m.path, ids, a.k, a.max_tokens, name, args) for name, args in variants]
    if not a.no_hf:
        rows.append(hf_generate(m.path, ids, a.k, a.max_tokens, a.hf_batch_prompts, a.hf_dtype))
    roof = rooflines(matmul_params(m.path), a.prompts * a.k, matmul_peak_tflops("bfloat16"), memory_gbps())
    ceiling = matmul_ceilings(m.path, a.prompts * a.k, rows[0]["generated_tokens"] / a.max_tokens)
    for r in rows:
        r["roofline_fraction"] = r["tokens_per_s"] / roof["roofline_tok_s"]
        if ceiling:
            r["matmul_ceiling_fraction"] = r["tokens_per_s"] / ceiling[-1]["ceiling_tok_s"]
    hf = next((r for r in rows if r["backend"] == "hf_generate"), None)
    ratio = rows[0]["tokens_per_s"] / hf["tokens_per_s"] if hf else None
    result = {"bench": "generation", "machine": machine(), "settings": vars(a), "rows": rows, "roofline": roof,
              "matmul_ceiling": ceiling, "ratio_vllm_over_hf": ratio, "target": 1.5}
    save("generation", result)
    print(md_table(rows, ["backend", "generated_tokens", "generate_s", "tokens_per_s", "roofline_fraction",
                          "matmul_ceiling_fraction", "load_s"]))
    print(f"\nrooflines ({roof['params'] / 1e6:.1f}M matmul params, bf16 peak {roof['peak_bf16_tflops']:.2f} TFLOP/s, "
          f"copy bandwidth {roof['memory_gbps']:.1f} GB/s, batch {roof['batch']}): compute "
          f"{roof['compute_roofline_tok_s']:.0f} tok/s, memory {roof['memory_roofline_tok_s']:.0f} tok/s")
    for c in ceiling:
        print(f"matmul ceiling at {c['batch']} rows a step ({c['gemms_per_step']} GEMMs, {c['tflops']:.3f} TFLOP/s): "
              f"{c['ceiling_tok_s']:.0f} tok/s")
    if ratio:
        print(f"vLLM / HF generate tokens/s: {ratio:.2f}x (target >= 1.5x)")
    return result


if __name__ == "__main__":
    main()
