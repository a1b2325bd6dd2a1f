"""Generation requests in as few vLLM worker calls as possible: one output per chat, the chats grouped by sampling
parameters (one ``sample()`` call per group). Used by the benchmarks (AlpacaEval, MT-Bench) and IFEval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeline_lib.models import ResolvedModel
from pipeline_lib.report.progress import Progress

GREEDY_BELOW = 1e-4  # FastChat: temperature < 1e-4 means greedy decoding


@dataclass(frozen=True)
class SamplingKey:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    kv_cache_gib: float


def run_requests(model: ResolvedModel, messages: Sequence[list[dict]], keys: Sequence[SamplingKey],
                 quiet: bool = False, progress: Progress | None = None,
                 tensor_parallel_size: int = 1) -> tuple[list[dict], dict]:
    """One output per chat, by vLLM in a child process: one ``sample()`` call per distinct sampling key (each
    advances ``progress`` by its requests when it returns). Returns (per request: response, n_tokens,
    finish_reason), stats summed over the calls (``worker_calls`` included)."""
    from transformers import AutoTokenizer

    from pipeline_lib.generation.sampling import SamplingSpec, render_chat, sample

    tok = AutoTokenizer.from_pretrained(model.path)
    _, ids = render_chat(tok, list(messages))
    out: list[dict] = [{} for _ in messages]
    stats = {"worker_calls": 0, "load_s": 0.0, "generate_s": 0.0, "generated_tokens": 0}
    for key in dict.fromkeys(keys):  # first-seen order
        where = [i for i, k in enumerate(keys) if k == key]
        greedy = key.temperature < GREEDY_BELOW
        spec = SamplingSpec(n=1, temperature=0.0 if greedy else key.temperature, top_p=1.0 if greedy else key.top_p,
                            max_tokens=key.max_tokens, seed=key.seed, kv_cache_gib=key.kv_cache_gib,
                            tensor_parallel_size=tensor_parallel_size, quiet=quiet)
        df, st = sample(model.path, [ids[i] for i in where], spec, progress)
        df = df.sort_values("prompt_index").reset_index(drop=True)
        for row in df.itertuples(index=False):
            out[where[row.prompt_index]] = {"response": row.response, "n_tokens": int(row.n_tokens),
                                            "finish_reason": row.finish_reason}
        stats["worker_calls"] += 1
        for k in ("load_s", "generate_s", "generated_tokens"):
            stats[k] += st[k]
    return out, stats
