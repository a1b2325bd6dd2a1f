"""What a stage, a round and a campaign cost: seconds, device-seconds, memory, tokens, judge usage, efficiency.

Per stage (:func:`stage_cost`, logged as ``cost.*`` metrics of the stage's MLflow child run):

| key | meaning |
|---|---|
| ``wall_s``, ``cpu_s``, ``gpu_s``, ``peak_rss_gib``, ``peak_gpu_mem_gib`` | measured (:mod:`pipeline_lib.cost.meter`) |
| ``generated_tokens``, ``generate_s`` | collect and held-out evaluation: tokens sampled, seconds of sampling (engine start-up excluded) |
| ``trained_tokens``, ``train_s`` | train: tokens the optimiser saw (all epochs), seconds from trainer construction to trained |
| ``train_flops``, ``train_peak_flops`` | train: counted FLOPs (6·N per trained token for the policy, 2·N per token of the one reference pass = one epoch, as ``bench/training.py``) and what the device could have done in ``train_s`` (the measured matmul peak x ``train_s``) |
| ``judge_requests``, ``judge_input_tokens``, ``judge_output_tokens``, ``judge_usd`` | LLM judge usage, when the judge reports it (see :data:`JUDGE_USAGE_KEYS`), and money when its config declares ``price_per_million_tokens: {input: .., output: ..}`` |

Efficiency figures are ratios of sums, so a round's and a campaign's are computed the same way as a stage's:
generation tokens/s = Σ generated_tokens / Σ generate_s, training tokens/s = Σ trained_tokens / Σ train_s, MFU =
Σ train_flops / Σ train_peak_flops. Sums (:func:`sum_costs`) add the additive keys and take the maximum of peaks.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

ADDITIVE = ["wall_s", "cpu_s", "gpu_s", "generated_tokens", "generate_s", "trained_tokens", "train_s", "train_flops",
            "train_peak_flops", "judge_requests", "judge_input_tokens", "judge_output_tokens", "judge_usd"]
PEAKS = ["peak_rss_gib", "peak_gpu_mem_gib"]
PREFIX = "cost."

# The hook for a judge that talks to a metered endpoint: a stage whose manifest metrics carry these keys (requests
# sent, prompt and completion tokens the endpoint reported) has them counted here, and priced when the judge's config
# has ``price_per_million_tokens: {input: .., output: ..}``. The HTTP judge client is to report them and its options
# to accept that key (pipeline_lib/judges/llm/); until then LLM-judge stages count no usage.
JUDGE_USAGE_KEYS = {"judge_requests": "judge_requests", "judge_input_tokens": "judge_input_tokens",
                    "judge_output_tokens": "judge_output_tokens"}


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def parameter_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor of a safetensors model directory, from the files' headers (no tensor is read)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({name: info["shape"] for name, info in header.items() if name != "__metadata__"})
    return shapes


def count_parameters(model_dir: str | Path) -> int:
    """Parameters of a safetensors model directory, from the files' headers (no tensor is read)."""
    return sum(math.prod(shape) for shape in parameter_shapes(model_dir).values())


def judge_usage(metrics: Mapping[str, Any], judge: Mapping[str, Any] | None) -> dict[str, float]:
    """Requests, tokens and (with a declared price) US dollars of a judging stage; {} when nothing is reported."""
    out = {ours: v for theirs, ours in JUDGE_USAGE_KEYS.items() if (v := _num(metrics.get(theirs))) is not None}
    price = (judge or {}).get("price_per_million_tokens")
    if out and isinstance(price, Mapping):
        out["judge_usd"] = (out.get("judge_input_tokens", 0.0) * float(price.get("input", 0.0))
                            + out.get("judge_output_tokens", 0.0) * float(price.get("output", 0.0))) / 1e6
    return out


def stage_cost(stage: str, measured: Mapping[str, float], metrics: Mapping[str, Any], *,
               judge: Mapping[str, Any] | None = None, n_params: int | None = None, epochs: int | None = None,
               peak_tflops: float | None = None) -> dict[str, float]:
    """A stage's cost figures (keys without the ``cost.`` prefix) from what was measured around it and the metrics
    its artifact's manifest records."""
    out = {k: float(v) for k, v in measured.items()}
    if stage == "collect":
        tokens, gen_s = _num(metrics.get("generated_tokens")), _num(metrics.get("generate_s"))
        if tokens is not None and gen_s is not None:
            out.update(generated_tokens=tokens, generate_s=gen_s)
    elif stage.startswith("evaluate"):  # held-out: greedy responses, mean_tokens over n_prompts
        mean, n, rate = (_num(metrics.get(k)) for k in ("mean_tokens", "n_prompts", "tokens_per_s"))
        if mean is not None and n is not None and rate:
            tokens = round(mean * n)
            out.update(generated_tokens=float(tokens), generate_s=tokens / rate)
    elif stage == "train":
        rate = _num(metrics.get("tokens_per_s"))
        train_s = (_num(metrics.get("setup_s")) or 0.0) + (_num(metrics.get("train_s")) or 0.0)
        if rate and train_s:  # stages/train/fit.py: tokens_per_s = tokens (all epochs) / (setup_s + train_s)
            tokens = float(round(rate * train_s))
            out.update(trained_tokens=tokens, train_s=train_s)
            if n_params and peak_tflops:
                ref_tokens = tokens / max(epochs or 1, 1)  # the reference pass scores one epoch's tokens once
                out.update(train_flops=6.0 * n_params * tokens + 2.0 * n_params * ref_tokens,
                           train_peak_flops=peak_tflops * 1e12 * train_s)
    out.update(judge_usage(metrics, judge))
    return with_rates(out)


def with_rates(c: Mapping[str, float]) -> dict[str, float]:
    """Add the efficiency figures that the sums allow: generation and training tokens/s, MFU."""
    out = dict(c)
    if out.get("generate_s"):
        out["generation_tokens_per_s"] = out.get("generated_tokens", 0.0) / out["generate_s"]
    if out.get("train_s"):
        out["training_tokens_per_s"] = out.get("trained_tokens", 0.0) / out["train_s"]
    if out.get("train_peak_flops"):
        out["mfu"] = out.get("train_flops", 0.0) / out["train_peak_flops"]
    return out


def sum_costs(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """Stages into a round, rounds into a campaign: additive keys add, peaks take the maximum, rates recomputed."""
    total: dict[str, float] = {}
    for r in rows:
        for k in ADDITIVE:
            if (v := _num(r.get(k))) is not None:
                total[k] = total.get(k, 0.0) + v
        for k in PEAKS:
            if (v := _num(r.get(k))) is not None:
                total[k] = max(total.get(k, 0.0), v)
    return with_rates(total)


def prefixed(c: Mapping[str, float]) -> dict[str, float]:
    return {PREFIX + k: float(v) for k, v in c.items()}


def unprefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k[len(PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(PREFIX)}
