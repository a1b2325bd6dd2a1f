"""Can the reference log-probs of a round come from collection instead of a no-grad pass? The measured gap.

In a round where the behavior policy sampled the pairs (BPO's reference, or any round's first policy), vLLM already
returned log π_behavior(y_t | ·) for every sampled token (``behavior_logp_seq`` in the generations table). Reusing
them would save the trainer's reference pass, but only if they are the numbers the trainer would compute. Two gaps:

1. numerics: vLLM's kernels vs the trainer's forward on the *same token ids* (fp32, and the trainer's bf16 autocast);
2. tokenisation: the trainer scores ``decode(ids) + EOS`` re-tokenised (TRL's format). A response cut at max_tokens
   never sampled EOS, so the trainer's sum has one more term, log π(EOS | truncated response), than vLLM's; and
   decode → encode does not always give back the sampled ids.

Reported per sequence: mean and max |Δ| of the log-prob sums, the same per token, and the share of responses whose
re-tokenisation differs or that were truncated.
Run: python -m bench.reference_gap --generations PATH/data.parquet --model REF [--rows 64]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

from bench.common import machine, save


def seq_logp(model, prompt_ids: list[int], resp_ids: list[int], autocast: bool) -> float:
    import torch

    ids = torch.tensor([prompt_ids + resp_ids])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None]).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", required=True, help="a collect artifact's data.parquet")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="the policy that sampled them")
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args(argv)
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline_lib.models import resolve

    path = resolve(a.model).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    df = pd.read_parquet(a.generations).head(a.rows)
    rows = []
    for r in df.itertuples():
        p_ids = tok(r.prompt_text, add_special_tokens=False)["input_ids"]
        sampled = [int(t) for t in r.response_token_ids]
        trainer_ids = tok(r.response + tok.eos_token, add_special_tokens=False)["input_ids"]
        fp32 = seq_logp(model, p_ids, sampled, autocast=False)
        rows.append({"n": len(sampled), "vllm": r.behavior_logp_seq, "fp32_same_ids": fp32,
                     "bf16_same_ids": seq_logp(model, p_ids, sampled, autocast=True),
                     "fp32_trainer_ids": seq_logp(model, p_ids, trainer_ids, autocast=False),
                     "truncated": r.finish_reason == "length", "retokenised_differs": trainer_ids[:len(sampled)]
                     != sampled or len(trainer_ids) != len(sampled) + (r.finish_reason == "length")})

    def gap(key):
        d = [abs(x[key] - x["vllm"]) for x in rows]
        per_tok = [abs(x[key] - x["vllm"]) / max(x["n"], 1) for x in rows]
        return {"mean_abs_seq": statistics.fmean(d), "max_abs_seq": max(d), "mean_abs_per_token":
                statistics.fmean(per_tok)}

    result = {"bench": "reference_gap", "machine": machine(), "settings": vars(a), "n_rows": len(rows),
              "mean_tokens": statistics.fmean(x["n"] for x in rows),
              "vllm_vs_fp32_same_ids": gap("fp32_same_ids"), "vllm_vs_bf16_same_ids": gap("bf16_same_ids"),
              "vllm_vs_trainer_tokenisation": gap("fp32_trainer_ids"),
              "truncated_share": statistics.fmean(x["truncated"] for x in rows),
              "retokenisation_differs_share": statistics.fmean(x["retokenised_differs"] for x in rows)}
    save("reference_gap", result)
    for k in ("vllm_vs_fp32_same_ids", "vllm_vs_bf16_same_ids", "vllm_vs_trainer_tokenisation"):
        g = result[k]
        print(f"{k}: mean |Δ| {g['mean_abs_seq']:.4f} nats/sequence (max {g['max_abs_seq']:.4f}), "
              f"{g['mean_abs_per_token']:.5f} nats/token")
    print(f"truncated {result['truncated_share']:.0%}, re-tokenisation differs {result['retokenisation_differs_share']:.0%}"
          f", {result['n_rows']} responses of {result['mean_tokens']:.0f} tokens on average")
    return result


if __name__ == "__main__":
    main()
