"""Cost accounting: figures worked by hand, sums against their parts, and a meter that sees child processes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from pipeline_lib.cost.accounting import count_parameters, stage_cost, sum_costs
from pipeline_lib.cost.meter import StageMeter
from pipeline_lib.cost.table import format_cost_table

MEASURED = {"wall_s": 10.0, "cpu_s": 18.0, "gpu_s": 0.0, "peak_rss_gib": 2.5}


def test_collect_cost_counts_generated_tokens_and_rate():
    c = stage_cost("collect", MEASURED, {"generated_tokens": 5000, "generate_s": 20.0, "engine_load_s": 9.0})
    assert c["generated_tokens"] == 5000 and c["generate_s"] == 20.0
    assert c["generation_tokens_per_s"] == 250.0  # engine start-up is not generation
    assert c["wall_s"] == 10.0 and c["peak_rss_gib"] == 2.5


def test_evaluate_cost_from_mean_tokens():
    # 100 prompts x 71.17 mean tokens = 7117 tokens, at 200 tok/s -> 35.585 s of generation
    c = stage_cost("evaluate-candidate", MEASURED, {"mean_tokens": 71.17, "n_prompts": 100, "tokens_per_s": 200.0})
    assert c["generated_tokens"] == 7117 and c["generate_s"] == pytest.approx(35.585)


def test_train_cost_tokens_flops_and_mfu_by_hand():
    # stages/train/fit.py: tokens_per_s = tokens / (setup_s + train_s): 12000 tokens over 30 + 90 s -> 100 tok/s
    metrics = {"tokens_per_s": 100.0, "setup_s": 30.0, "train_s": 90.0}
    c = stage_cost("train", MEASURED, metrics, n_params=1_000_000, epochs=2, peak_tflops=0.5)
    assert c["trained_tokens"] == 12000 and c["train_s"] == 120.0 and c["training_tokens_per_s"] == 100.0
    # 6 N T for the policy + 2 N (T / epochs) for the one reference pass: 6e6*12000 + 2e6*6000 = 8.4e10 FLOPs
    assert c["train_flops"] == pytest.approx(8.4e10)
    # over 120 s at 0.5 TFLOP/s = 6e13 possible: MFU 0.0014
    assert c["mfu"] == pytest.approx(8.4e10 / 6e13)


def test_judge_usage_and_money_only_when_a_price_is_declared():
    metrics = {"judge_requests": 40, "judge_input_tokens": 120_000, "judge_output_tokens": 8_000}
    free = stage_cost("annotate", MEASURED, metrics, judge={"kind": "llm"})
    assert free["judge_requests"] == 40 and "judge_usd" not in free
    priced = stage_cost("annotate", MEASURED, metrics,
                        judge={"kind": "llm", "price_per_million_tokens": {"input": 2.5, "output": 10.0}})
    assert priced["judge_usd"] == pytest.approx(0.12 * 2.5 + 0.008 * 10.0)  # 0.30 + 0.08
    assert "judge_requests" not in stage_cost("annotate", MEASURED, {}, judge={"kind": "rules"})


def test_sums_add_seconds_and_tokens_take_peak_maxima_and_recompute_rates():
    a = stage_cost("collect", {**MEASURED, "peak_rss_gib": 4.0}, {"generated_tokens": 1000, "generate_s": 10.0})
    b = stage_cost("evaluate-x", {**MEASURED, "peak_rss_gib": 3.0},
                   {"mean_tokens": 30.0, "n_prompts": 100, "tokens_per_s": 30.0})
    t = sum_costs([a, b])
    assert t["wall_s"] == 20.0 and t["cpu_s"] == 36.0 and t["peak_rss_gib"] == 4.0
    assert t["generated_tokens"] == 4000 and t["generate_s"] == 110.0
    # a ratio of sums (4000 / 110), not the mean of the two rates ((100 + 30) / 2)
    assert t["generation_tokens_per_s"] == pytest.approx(4000 / 110)
    # a campaign sums rounds the same way
    assert sum_costs([t, t])["generated_tokens"] == 8000 and sum_costs([t, t])["peak_rss_gib"] == 4.0


def test_cost_table_marks_cache_hits_and_drops_empty_columns():
    cost = {"stages": [{"stage": "collect", "cached": False, **stage_cost("collect", MEASURED, {
        "generated_tokens": 5000, "generate_s": 20.0})}, {"stage": "prompts-train", "cached": True}],
        "total": sum_costs([stage_cost("collect", MEASURED, {"generated_tokens": 5000, "generate_s": 20.0})])}
    text = format_cost_table(cost)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "cost" and "gen tokens" in lines[0] and "judge" not in lines[0]
    assert "gpu s" not in lines[0] and "MFU" not in lines[0]  # nothing ran on a GPU, nothing trained
    assert "cached" in next(l for l in lines if "prompts-train" in l)
    total = next(l for l in lines if l.startswith("| total"))
    assert "5,000" in total and "250.0" in total


def test_count_parameters_equals_the_models_numel(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model.path)
    # tied embeddings are stored once, as parameters() counts them once
    assert count_parameters(tiny_model.path) == sum(p.numel() for p in model.parameters())


def test_meter_sees_a_childs_cpu_time_and_memory():
    meter = StageMeter(every_s=0.05).start()
    base = meter.peak_rss
    # a child that holds 300 MB for a second while spinning the CPU for ~0.6 s
    code = ("import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); t = time.process_time()\n"
            "while time.process_time() - t < 0.6: pass\ntime.sleep(0.4)")
    subprocess.run([sys.executable, "-c", code], check=True)
    m = meter.read()
    assert m["cpu_s"] >= 0.5  # the child's CPU time is charged to the stage
    assert m["peak_rss_gib"] * 2**30 - base >= 250 * 2**20  # its memory was seen while it lived
    assert m["wall_s"] >= 1.0 and m["gpu_s"] == 0.0
    assert meter.read() is m  # reading again gives the same figures
    assert not math.isnan(m["wall_s"])


def test_campaign_result_sums_its_rounds():
    from pipeline_lib.commands.campaign import format_result

    def summary(tokens, wall, peak):
        total = sum_costs([stage_cost("collect", {**MEASURED, "wall_s": wall, "peak_rss_gib": peak},
                                      {"generated_tokens": tokens, "generate_s": 10.0})])
        return {"before": {"pass_rate_strict": 0.1}, "after": {"pass_rate_strict": 0.2}, "promoted": True,
                "cost": {"stages": [], "total": total}}

    text = format_result({"rounds": [summary(1000, 30.0, 2.0), summary(3000, 50.0, 5.0)], "final": None})
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in text.splitlines()
            if l.startswith("| round ") or l.startswith("| total")}
    head = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| campaign cost")).split("|")[2:-1]]
    total = dict(zip(head, rows["total"]))
    assert total["wall s"] == "80.0" and total["gen tokens"] == "4,000" and total["peak GiB"] == "5.00"
    assert total["gen tok/s"] == "200.0"  # 4000 tokens over 2 x 10 s of generation
