"""Sampling with vLLM, run in a child process.

Why a child process: the vLLM engine holds its memory (KV cache, weights, worker threads) until the process ends,
spawns workers that need an importable ``__main__``, and can die on bad inputs; a child process gives every call a
clean engine, frees everything when it returns, and turns a crash into an ordinary, retryable error in the parent.

Protocol: ``python -m pipeline_lib.generation.vllm_worker SPEC.json OUT.parquet``. SPEC holds the model path, the
prompt token ids, and sampling/engine settings; OUT gets one row per (prompt, sample).
``python -m pipeline_lib.generation.vllm_worker --serve IDLE_S`` keeps the process (its imports) for one job after
another: see ``pipeline_lib/generation/warm.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from pipeline_lib.generation import compile_cache, cpu_kernels, cpu_ranks, cpu_sampler, kv_blocks


ENGINE_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM")


def _apply_engine_defaults(spec: dict) -> None:
    # CPU: vLLM's default KV-cache reservation fails on small machines; size it explicitly.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(spec.get("kv_cache_gib", 1))))))
    # The engine runs in this (already isolated) process: no second process layer, no spawn guard needed.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _follow_log_level() -> None:
    # vLLM sets its loggers' level once, at import: a served process (one import, many jobs) follows each job's
    # VLLM_LOGGING_LEVEL here, so a job logs what it would in a process of its own
    import logging

    level, logger = os.environ["VLLM_LOGGING_LEVEL"].upper(), logging.getLogger("vllm")
    for x in (logger, *logger.handlers):
        x.setLevel(level)


CAST_LOADER = "alignflow_cast"

# On CPU, vLLM's compiled model (torch.compile of the forward, enforce_eager=False) samples the same distribution
# (tests/integration/test_vllm_compiled_distribution.py) but pays only for some workloads, so it is not the CPU default.
# Measured on the 2-core Intel machine: bench.generation (32 prompts x 4 samples, <= 128 tokens, 2026-12-04) 1.44x /
# 1.63x eager's tokens/s, but an IFEval evaluation (541 prompts, greedy, <= 1,024 tokens, 2026-12-05) only 1.11x
# (724 vs 652 tokens/s: long sequences and batches that shrink as answers end; not profiled), and its engine start
# took 69 s against 4 s, so the whole evaluation took 506 s compiled against 489 s eager. Since compile_cache.py a
# model compiled once starts in about 10 s, also as another checkpoint of its architecture (2026-12-06: a directory
# never seen before loaded in 10.5 s against 5.4 s eager and generated 717 against 557-584 tokens/s; the same wall time
# for a job of 11,000 tokens). auto stays eager on CPU: the first compile of an architecture on a machine costs about a
# minute, which small jobs (tests, the demo) would pay, and a long greedy job gained nothing (160 IFEval prompts,
# <= 1,024 tokens, 2026-12-06: 348 tokens/s compiled against 343 eager).


def enforce_eager(compile_mode: str, on_gpu: bool) -> bool:
    """vLLM's ``enforce_eager`` for a ``compile`` setting: "on" compiles, "off" runs eager, "auto" keeps vLLM's
    default on a GPU (compiled, CUDA graphs) and runs eager on CPU (see the measurements above)."""
    modes = {"on": lambda: False, "off": lambda: True, "auto": lambda: not on_gpu}
    if compile_mode not in modes:
        raise ValueError(f"compile={compile_mode!r}: expected one of {sorted(modes)}")
    return modes[compile_mode]()


def register_cast_loader() -> str:
    """A weight loader that hands vLLM each floating-point tensor already in the model's dtype.

    Why: our checkpoints (the de-quantized embedded model, every trained checkpoint) are float32 safetensors, and
    vLLM runs them in bfloat16 (``dtype="auto"`` picks a 16-bit type for float32 checkpoints). Its default loader
    copies each float32 tensor into a bfloat16 parameter and logs one warning per tensor (``vllm/model_executor/
    models/utils.py``, ``AutoWeightsLoader._load_param``). ``tensor.to(bfloat16)`` and ``param.copy_(tensor)`` round
    the same way (round-to-nearest-even), so casting first gives bit-identical parameters without the warnings; the
    stored float32 weights (what training reads) are untouched. The cast applies only when every floating-point
    parameter of the built model has the model dtype, so no parameter vLLM keeps in float32 is ever narrowed.
    ``tests/integration/test_collect_progress_vllm.py`` checks identical token ids and log-probs with either loader."""
    import dataclasses

    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(CAST_LOADER)
    class _CastingLoader(DefaultModelLoader):
        def __init__(self, load_config):
            super().__init__(dataclasses.replace(load_config, load_format="auto"))  # file discovery as "auto"

        def get_all_weights(self, model_config, model):
            target = model_config.dtype
            dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
            cast = dtypes == {target}
            for name, tensor in super().get_all_weights(model_config, model):
                if cast and tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                yield name, tensor

    return CAST_LOADER


def build_engine(spec: dict):
    """The engine a job's spec asks for, built as every job builds it (bench.generation_profile builds it here too, so
    it profiles the engine the stage runs). Returns (llm, the engine arguments given to vLLM, whether the inverse-CDF
    sampler is on)."""
    import torch
    from vllm import LLM

    # One process, one engine: the loader is registered here (tensor-parallel workers in other processes would not
    # see it, so they keep vLLM's own loader).
    load_format = register_cast_loader() if spec.get("tensor_parallel_size", 1) == 1 and spec.get(
        "cast_loader", True) else "auto"
    on_gpu = torch.cuda.is_available()
    eager = enforce_eager(spec.get("compile", "auto"), on_gpu)
    sampler_on = cpu_sampler.configure(spec.get("cpu_sampler", "auto"), on_gpu)  # before the engine binds it
    cpu_ranks.configure(on_gpu)
    engine_args = {"enforce_eager": eager, "disable_log_stats": False,  # counters for prompt_cache_stats
                   **cpu_kernels.engine_args(spec.get("cpu_kernels", "auto"), on_gpu, eager),
                   **kv_blocks.engine_args(spec.get("kv_block_size"), on_gpu),
                   **spec.get("engine_args", {})}
    max_model_len = spec.get("max_model_len")
    if not engine_args["enforce_eager"]:
        compile_cache.install()  # a compiled model loads from vLLM's cache instead of compiling again
        if not on_gpu:  # ... also for another checkpoint of the same architecture and a similar length
            compile_cache.key_by_architecture()
            max_model_len = compile_cache.bucketed_max_model_len(max_model_len, spec["model"])
    llm = LLM(
        model=spec["model"],
        seed=spec["seed"],  # per-request seeds crash the CPU sampler ("CPU Generator does not use offset")
        dtype=spec.get("dtype", "auto"),
        max_model_len=max_model_len,
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.85),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        load_format=load_format,
        # vLLM engine arguments a caller sets explicitly (bench.generation's sweep: max_num_seqs, compilation, ...)
        **engine_args,
    )
    return llm, engine_args, sampler_on


def run(spec: dict):
    import logging

    import pandas as pd

    _apply_engine_defaults(spec)
    _follow_log_level()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0, calls_before = time.perf_counter(), cpu_kernels.calls  # a served process runs many jobs: count this one's
    loads_before, sampler_calls_before = compile_cache.loads(), cpu_sampler.calls
    ranks_before = dict(cpu_ranks.calls)
    llm, engine_args, sampler_on = build_engine(spec)
    t_load = time.perf_counter() - t0
    params = SamplingParams(
        n=spec["n"],
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        max_tokens=spec["max_tokens"],
        logprobs=0,  # the sampled token's log-prob: the behavior policy's log-likelihood of what it generated
    )
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompt_token_ids"]], params,
                        use_tqdm=False if spec.get("quiet", False) else _progress_bar())
    t_gen = time.perf_counter() - t1
    rows = []
    for pi, out in enumerate(outs):
        for si, c in enumerate(out.outputs):
            lps = [next(iter(d.values())).logprob if d else float("nan") for d in (c.logprobs or [])]
            rows.append({
                "prompt_index": pi,
                "sample_index": si,
                "response": c.text,
                "response_token_ids": list(c.token_ids),
                "n_tokens": len(c.token_ids),
                "behavior_logp_seq": float(sum(lps)),
                "finish_reason": c.finish_reason or "",
            })
    cache = llm.llm_engine.vllm_config.cache_config  # what the engine runs with, read back (vLLM may override)
    stats = {"load_s": t_load, "generate_s": t_gen, "generated_tokens": int(sum(r["n_tokens"] for r in rows)),
             "kv_block_size": cache.block_size, "prefix_caching": bool(cache.enable_prefix_caching),
             **prompt_cache_stats(llm),
             "compiled": not engine_args["enforce_eager"], "cpu_c_kernels": cpu_kernels.active(),
             "compiled_from_cache": compile_cache.loads() > loads_before,
             "cpu_c_kernel_calls": cpu_kernels.calls - calls_before,
             "cpu_sampler": sampler_on, "cpu_sampler_calls": cpu_sampler.calls - sampler_calls_before,
             **{f"cpu_{path}_rank_calls": n - ranks_before[path] for path, n in cpu_ranks.calls.items()},
             "engine_env": {k: os.environ.get(k) for k in ENGINE_ENV},
             "vllm_log_level": logging.getLevelName(logging.getLogger("vllm").getEffectiveLevel())}
    return pd.DataFrame(rows), stats


def prompt_cache_stats(llm) -> dict:
    """Prompt tokens the engine was asked to pre-fill (each of the n samples of a prompt counts its prompt) and how
    many of them it read from its prefix cache instead of computing (kv_blocks.py), from vLLM's own counters."""
    names = {"vllm:prompt_tokens": "prompt_tokens", "vllm:prompt_tokens_cached": "cached_prompt_tokens"}
    if not getattr(llm.llm_engine, "log_stats", False):  # turned off by a caller's engine_args: nothing counted
        return dict.fromkeys(names.values())
    got = {names[m.name]: int(m.value) for m in llm.get_metrics() if m.name in names}
    return {k: got.get(k) for k in names.values()}


def _progress_bar():
    """vLLM's progress bar, guarded: vLLM divides by the bar's elapsed time when a request finishes, which is 0.0
    when the first requests finish within the bar's first clock tick (tiny models) -> ZeroDivisionError."""
    from tqdm import tqdm

    class _Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            d["elapsed"] = max(d.get("elapsed") or 0.0, 1e-6)
            return d

    return _Bar


def job(spec_path: str, out_path: str) -> None:
    df, stats = run(json.loads(open(spec_path).read()))
    df.to_parquet(out_path + ".tmp", index=False)
    os.replace(out_path + ".tmp", out_path)
    with open(out_path + ".stats.json", "w") as f:
        json.dump(stats, f)


JOB_END = b"\x1e@alignflow-job-end "  # the line that closes a served job's output: JOB_END + JSON + newline


def serve(idle_s: float) -> int:
    """Run jobs read from stdin (one JSON line each: ``{"spec": ..., "out": ...}``) in this process, one engine per
    job, closing each job's output with a JOB_END line. What is reused is the process: Python, torch and vLLM
    imported once (about as long as the engine's own start on CPU). Each job still gets its own engine, built from
    its spec and freed when it ends, so training between jobs gets the memory back and a job's samples are the ones
    a fresh process draws (same engine seed, same tokens: tests/integration/test_warm_worker.py).
    Exits on EOF, after ``idle_s`` without a job, and after a failed job (the next one starts from a clean process)."""
    import gc
    import select
    import traceback

    import threading

    import vllm  # noqa: F401  (the point of a served process: pay the import before the first job arrives)

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    # what the parent set at the start: the fallback for a request that carries no settings of its own
    base = {k: os.environ.get(k) for k in ENGINE_ENV}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], idle_s)
        line = sys.stdin.readline() if ready else ""
        if not line:
            return 0
        request, result = json.loads(line), {"ok": True}
        # each job gets the engine settings its caller has now (a fresh process would inherit those), not what the
        # last job set or defaulted
        for k, v in {**base, **request.get("env", {})}.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        import vllm.envs

        # the last engine cached the environment (vLLM >= 0.11); this job's settings must apply
        getattr(vllm.envs, "disable_envs_cache", lambda: None)()
        try:
            job(request["spec"], request["out"])
        except BaseException as e:  # noqa: BLE001  (reported to the parent, then this process ends)
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        gc.collect()  # the engine (KV cache, weights) goes now, not at some later collection
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(sys.stdout.fileno(), b"\n" + JOB_END + json.dumps(result).encode() + b"\n")
        if not result["ok"]:
            return 1


def _exit_with_parent(ppid: int) -> None:
    """End this process soon after its parent ends, mid-job included (kill -9 of a round must not leave an engine
    running). Not PR_SET_PDEATHSIG: that fires when the *thread* that started the child ends, and the kept worker
    outlives the task thread that happened to start it."""
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(1)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return serve(float(argv[1]))
    job(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
