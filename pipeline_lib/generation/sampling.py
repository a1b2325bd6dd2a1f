"""Parent side of generation: render chat prompts, run the vLLM worker in a child process, read its rows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline_lib.child_process import child_env, die_with_parent
from pipeline_lib.generation import warm
from pipeline_lib.report.progress import Progress, fmt_duration


TMP_PREFIX = "alignflow-gen-"


class GenerationError(RuntimeError):
    """The vLLM worker failed (transient: an engine that dies is retried by the task's policy)."""


@dataclass
class SamplingSpec:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    quiet: bool = False
    compile: str = "auto"  # "auto" | "on" | "off": see vllm_worker.enforce_eager
    cpu_kernels: str = "auto"  # "auto" | "native": vLLM's C++ RMSNorm in eager CPU engines (generation/cpu_kernels.py)
    cpu_sampler: str = "auto"  # "auto" | "native": inverse-CDF draws on CPU, or vLLM's Gumbel kernel (cpu_sampler.py)
    kv_block_size: int | None = None  # None: 32 on CPU so samples of one prompt share its blocks (kv_blocks.py)
    reuse_worker: str = "auto"  # "auto" | "on" | "off": run in the kept worker process (generation/warm.py)
    extra: dict = field(default_factory=dict)


def render_chat(tokenizer, messages_list: list[list[dict]]) -> tuple[list[str], list[list[int]]]:
    """Apply the model's chat template with the generation prompt; the template carries its own special tokens,
    so the text is tokenized without adding more."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return texts, ids


def sample(model_path: str, prompt_token_ids: list[list[int]], spec: SamplingSpec,
           progress: Progress | None = None) -> tuple[pd.DataFrame, dict]:
    """Sample ``spec.n`` completions per prompt with vLLM in a child process. Returns (rows, stats).

    ``progress`` counts rows (prompts x n) and is advanced only when the worker returns: the worker is one blocking
    ``LLM.generate`` call, and splitting it would drain the engine's continuous batch at every split and (one engine
    seed per call) could change the random numbers each request draws, so the count jumps by all rows at the end.
    In between, vLLM's own bar (relayed from the worker unless quiet) shows the count, rate and ETA."""
    max_prompt = max(len(p) for p in prompt_token_ids)
    payload = {
        "model": model_path,
        "prompt_token_ids": prompt_token_ids,
        "n": spec.n,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "max_tokens": spec.max_tokens,
        "seed": spec.seed,
        "kv_cache_gib": spec.kv_cache_gib,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "dtype": spec.dtype,
        "max_model_len": max_prompt + spec.max_tokens + 8,
        "quiet": spec.quiet,
        "compile": spec.compile,
        "cpu_kernels": spec.cpu_kernels,
        "cpu_sampler": spec.cpu_sampler,
        "kv_block_size": spec.kv_block_size,
        **spec.extra,
    }
    if progress is not None:
        progress.set(progress.done)  # the start line; the rate is then per second of worker time, engine load included
    sweep_stale_tmp()
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.parquet"
        spec_path.write_text(json.dumps(payload))
        start, rows = (progress.done if progress is not None else 0), len(prompt_token_ids) * spec.n
        on_count = None
        if progress is not None:  # the last count comes with the worker's stats, below
            def on_count(done: int) -> None:
                if 0 < done * spec.n < rows:
                    progress.set(start + done * spec.n)
        relay = Relay(echo=not spec.quiet, on_prompts_done=on_count)
        kept = False
        if warm.wanted(spec.reuse_worker, spec.tensor_parallel_size):
            try:
                kept = warm.run_kept(str(spec_path), str(out_path), relay.feed)
            except warm.WorkerDied as e:
                raise GenerationError(f"vLLM worker for {model_path} failed: {e}\n{relay.tail}") from e
        if not kept:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline_lib.generation.vllm_worker", str(spec_path), str(out_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), preexec_fn=die_with_parent,
            )
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                relay.feed(chunk)
            rc = proc.wait()
            if rc != 0 or not out_path.is_file():
                raise GenerationError(f"vLLM worker for {model_path} exited with {rc}:\n{relay.tail}")
        df = pd.read_parquet(out_path)
        stats = json.loads((Path(str(out_path) + ".stats.json")).read_text())
        stats["kept_worker"] = kept
    if progress is not None:
        progress.set(start + len(df), extra=f"{stats['generated_tokens'] / max(stats['generate_s'], 1e-9):.0f} tok/s, "
                                       f"engine load {fmt_duration(stats['load_s'])}")
    return df, stats


def sweep_stale_tmp() -> list[Path]:
    """Remove the temporary directories (prompt ids, generations) of vLLM calls whose process is gone: a kill -9
    skips TemporaryDirectory's cleanup, and they piled up in /tmp. Only this user's, only of dead processes."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid = d.name[len(TMP_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        except OSError:  # alive under another user (EPERM), or the directory went away
            continue
    return removed


_BAR_COUNT = re.compile(rb"Processed prompts:[^|]*\|[^|]*\|\s*(\d+)/(\d+)")


class Relay:
    """Copy the worker's output (vLLM's progress bar included) to our stderr while it runs (the run's log unless
    ``--verbose``: pipeline_lib/console.py); keep the tail for errors. ``on_prompts_done(n)`` gets the count of
    vLLM's bar ("Processed prompts: ... n/N") as it moves, so the product's own progress line moves with it."""

    def __init__(self, echo: bool, keep: int = 4000, on_prompts_done=None):
        self.echo, self.keep, self.on_prompts_done = echo, keep, on_prompts_done
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.on_prompts_done is not None and (counts := _BAR_COUNT.findall(self._tail[-200:] + chunk)):
            self.on_prompts_done(int(counts[-1][0]))
        if self.echo and chunk:
            buf = getattr(sys.stderr, "buffer", None)
            buf.write(chunk) if buf is not None else sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        self._tail = (self._tail + chunk)[-self.keep:]

    @property
    def tail(self) -> str:
        return self._tail.decode(errors="replace")
