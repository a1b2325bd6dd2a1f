"""The collect stage: K samples per prompt from the current policy with vLLM, with the behavior log-probs.

Each row keeps the rendered prompt (chat template applied), the response, its token ids and the behavior
policy's per-sequence log-prob ``behavior_logp_seq`` = sum_t log pi_behavior(y_t | x, y_<t) at temperature 1
(vLLM reports raw model log-probs, before temperature/top-p). No training path reads it: BPO's reference log-probs
come from the train stage's own no-grad pass over the same policy (``pipeline_lib/trainer.py``), since vLLM's values
differ from the trainer's by rounding and re-tokenisation (``bench/reference_gap.py`` measures the gap); the column
is kept for that diagnostic and carried into the pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.errors import ConfigError
from pipeline_lib.generation import kv_blocks
from pipeline_lib.generation.sampling import SamplingSpec, render_chat, sample
from pipeline_lib.models import ResolvedModel
from pipeline_lib.report.progress import Progress
from pipeline_lib.sections import Section
from pipeline_lib.stage import done, output_dir


class CollectConfig(Section):
    k: int = Field(4, ge=2, le=256, description="samples per prompt (at most 256: k=10000 was accepted and sat at "
                                                "0/160000 samples with a 3 GB worker)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="vLLM's compiled model (enforce_eager=false): auto = compiled on GPUs, eager on CPU; on "
                            "CPU, `on` generated 1.07-1.63x faster on short batched samples; the first start of an "
                            "architecture compiles it (~1 min), later starts of any checkpoint of it load it from "
                            "vLLM's cache (~10 s against ~5 s eager; generation/compile_cache.py, README Performance). "
                            "Same sampling distribution either way")
    kv_block_size: int | None = Field(
        None, ge=1, description="tokens per vLLM KV-cache block: null = 32 on CPU (the K samples of a prompt share "
                                "its full blocks: 1.09-1.12x tokens/s against vLLM's CPU default of 128) and vLLM's "
                                "own default on GPUs; on CPU a multiple of 32 (generation/kv_blocks.py)")
    cpu_sampler: Literal["auto", "native"] = Field(
        "auto", description="how a CPU engine draws a token: auto = by inverse CDF, one random number a row "
                            "(generation/cpu_sampler.py); native = vLLM's Gumbel-max kernel, one a vocabulary entry. "
                            "The same distribution; a seed gives different samples under each. GPUs keep vLLM's")


def run(policy: ResolvedModel, prompts: ArtifactRef, cfg: CollectConfig, work_dir: str | Path,
        quiet: bool = False) -> ArtifactRef:
    """K samples per prompt of ``prompts`` from ``policy`` (vLLM in a child process), with the behavior log-probs."""
    import torch
    from transformers import AutoTokenizer

    try:  # a block size this machine's vLLM cannot share prompts with is a config error, before any work
        kv_blocks.engine_args(cfg.kv_block_size, torch.cuda.is_available())
    except ValueError as e:
        raise ConfigError(f"collect.{e}") from None

    config = cfg.model_dump()
    inputs = {"policy": policy.sha256, "prompts": prompts.sha256}
    out = output_dir(work_dir, "collect", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df = read_table(prompts)
    tok = AutoTokenizer.from_pretrained(policy.path)
    texts, ids = render_chat(tok, [[{"role": "user", "content": p}] for p in df["prompt"]])
    spec = SamplingSpec(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                        seed=cfg.seed, kv_cache_gib=cfg.kv_cache_gib, quiet=quiet,
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        tensor_parallel_size=cfg.tensor_parallel_size, compile=cfg.compile,
                        kv_block_size=cfg.kv_block_size, cpu_sampler=cfg.cpu_sampler)
    with Progress(len(ids) * cfg.k, "collect", "samples", quiet=quiet) as progress:
        gen, stats = sample(policy.path, ids, spec, progress)
    meta = df.reset_index(drop=True)
    rows = gen.merge(meta.assign(prompt_index=range(len(meta)), prompt_text=texts), on="prompt_index")
    rows = rows.sort_values(["prompt_index", "sample_index"]).reset_index(drop=True)
    rows["response_source"] = "on_policy"
    rows["policy_sha256"] = policy.sha256
    metrics = {
        "n_prompts": len(df),
        "n_samples": len(rows),
        "generated_tokens": stats["generated_tokens"],
        "generate_s": stats["generate_s"],
        "engine_load_s": stats["load_s"],
        "engine_compiled": bool(stats.get("compiled", False)),
        "engine_cpu_sampler": bool(stats.get("cpu_sampler", False)),
        "tokens_per_s": stats["generated_tokens"] / max(stats["generate_s"], 1e-9),
        "mean_response_tokens": float(rows["n_tokens"].mean()),
        "truncated_share": float((rows["finish_reason"] == "length").mean()),
    }
    return write_table(rows, out, name="generations", producer="collect", inputs=inputs, config=config,
                       extra={"metrics": metrics, "policy": {"ref": policy.ref, "path": policy.path}})
