"""Where a vLLM decode step's time goes on this machine: the collect stage's engine (built by the vLLM worker's own
``build_engine``, in this process, with the stage's defaults unless ``--spec`` overrides them) samples K completions of
the builtin prompts under torch.profiler; prints the top operators by self CPU time and writes them to
bench/results/generation_profile[_TAG].json.

Run: python -m bench.generation_profile [--prompts 32] [--k 4] [--max-tokens 64] [--spec '{"cpu_sampler": "native"}']
The profiler's own overhead lowers tokens/s (compare shares, not speeds, with bench.generation); a warm-up request
with the same sampling settings runs first, so one-off loads (vLLM's compiled sampler helpers) stay out.
"""

from __future__ import annotations

import argparse
import json
import time


def profile(model_ref: str, prompts: int, k: int, max_tokens: int, spec: dict, top: int) -> dict:
    from pipeline_lib.generation import vllm_worker

    vllm_worker._apply_engine_defaults({"kv_cache_gib": 2})
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline_lib.generation import cpu_kernels as ck
    from pipeline_lib.generation import cpu_sampler
    from pipeline_lib.generation.sampling import render_chat
    from pipeline_lib.models import resolve
    from pipeline_lib.prompts.builtin import generate_prompts

    m = resolve(model_ref)
    tok = AutoTokenizer.from_pretrained(m.path)
    _, ids = render_chat(tok, [[{"role": "user", "content": p}]
                               for p in generate_prompts(prompts, 0, "train")["prompt"].tolist()])
    llm, engine_args, _ = vllm_worker.build_engine({"model": m.path, "seed": 0, **spec})
    reqs = [TokensPrompt(prompt_token_ids=i) for i in ids]
    params = SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=max_tokens, logprobs=0)
    llm.generate(reqs[:2], params, use_tqdm=False)  # warm-up: vLLM loads its compiled sampler helpers once
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        outs = llm.generate(reqs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s_under_profiler": tokens / seconds,
            "engine_args": {key: str(v) for key, v in engine_args.items()}, "cpu_c_kernel_calls": ck.calls,
            "cpu_sampler_calls": cpu_sampler.calls, "top_ops": rows}


def main(argv=None) -> dict:
    from bench.common import machine, md_table, save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--spec", default="{}", help="the worker's settings as JSON (compile, cpu_kernels, cpu_sampler, "
                                               "kv_block_size, engine_args), the stage's defaults otherwise")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    res = profile(a.model, a.prompts, a.k, a.max_tokens, json.loads(a.spec), a.top)
    res.update(bench="generation_profile", machine=machine(), settings=vars(a))
    save("generation_profile" + (f"_{a.tag}" if a.tag else ""), res)
    print(f"{res['tokens']} tokens in {res['seconds']:.1f} s under the profiler "
          f"({res['tokens_per_s_under_profiler']:.0f} tokens/s); C kernel calls {res['cpu_c_kernel_calls']}, "
          f"inverse-CDF draws {res['cpu_sampler_calls']}")
    print(md_table(res["top_ops"], ["op", "self_s", "share", "calls"]))
    return res


if __name__ == "__main__":
    main()
