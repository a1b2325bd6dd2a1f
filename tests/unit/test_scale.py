"""Sharded stages without an engine: how a table is split (whole groups, balanced rows), the shard seeds, the merges
(the input's order back, global prompt indices, metrics over all rows), the sharded annotate of a model judge equal
to the unsharded one, the judging half of a sharded evaluation, the ``scale`` config, and that one shard (the
default) calls the stage tasks exactly as the round did before."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, write_table
from pipeline_lib.config import ConfigError, EvaluateConfig, load_config
from pipeline_lib.scale import (ROW, ScaleConfig, merge_generations, merge_judgments, merge_responses, shard_bounds,
                                shard_seed, split_table)


def _table(tmp_path, df, name="t"):
    return write_table(df, tmp_path / "src" / name, name=name, producer="test")


def test_bounds_keep_groups_whole_and_rows_balanced():
    # 10 rows in groups of 3,1,1,3,2 rows; halves: the first run ends at the first group boundary at or past 5 rows
    # (3 + 1 + 1 = 5), so groups [0, 3) and [3, 5), 5 rows each
    assert shard_bounds([3, 1, 1, 3, 2], 2) == [(0, 3), (3, 5)]
    # thirds of 10 rows (targets 3.33, 6.67): boundaries at 4 rows (after group 1) and 8 rows (after group 3)
    assert shard_bounds([3, 1, 1, 3, 2], 3) == [(0, 2), (2, 4), (4, 5)]
    # more shards than groups: one group each
    assert shard_bounds([2, 2], 5) == [(0, 1), (1, 2)]
    assert shard_bounds([4], 1) == [(0, 1)]
    # one heavy group first: every later shard still gets a group
    assert shard_bounds([10, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]


def test_split_then_concatenate_is_the_input_and_groups_stay_together(tmp_path):
    # prompt "b" appears in two places: its rows go to one shard, and the merge puts every row back where it was
    df = pd.DataFrame({"prompt_id": list("aabbccbdd"), "x": range(9)})
    src = _table(tmp_path, df)
    parts = split_table(src, 3, tmp_path, group="prompt_id")
    frames = [read_table(p) for p in parts]
    for f in frames:
        assert f["prompt_id"].nunique() == len(set(f["prompt_id"]))
    owners = {pid: [i for i, f in enumerate(frames) if pid in set(f["prompt_id"])] for pid in "abcd"}
    assert all(len(v) == 1 for v in owners.values())
    assert sorted(pd.concat(frames)[ROW]) == list(range(9))
    assert [read_manifest(p.path)["config"]["of"] for p in parts] == [3, 3, 3]
    # the same split again is the same artifacts (cached by content, not recomputed)
    assert [p.sha256 for p in split_table(src, 3, tmp_path, group="prompt_id")] == [p.sha256 for p in parts]


def test_shard_seeds_are_the_seed_for_one_shard_and_distinct_reproducible_otherwise():
    assert shard_seed(7, 0, 1) == 7
    seeds = [shard_seed(7, i, 4) for i in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= s < 2 ** 31 for s in seeds)
    assert seeds == [shard_seed(7, i, 4) for i in range(4)]
    assert shard_seed(7, 0, 4) != shard_seed(8, 0, 4) and shard_seed(7, 0, 4) != shard_seed(7, 0, 2)


def _fake_collect(shard_ref, k, work_dir, tag):
    """What collect writes for a prompts shard: K rows per prompt, prompt_index from 0 within the shard."""
    p = read_table(shard_ref)
    rows = [{**r, "prompt_index": i, "sample_index": s, "response": f"{r['prompt']}-{s}", "n_tokens": 3 + s,
             "finish_reason": "length" if s == 0 else "stop", "response_token_ids": [1, 2, 3][: 3]}
            for i, r in enumerate(p.to_dict("records")) for s in range(k)]
    metrics = {"generated_tokens": 10, "generate_s": 2.0, "engine_load_s": 1.0}
    return write_table(pd.DataFrame(rows), work_dir / "fake" / tag, name="generations", producer="collect",
                       config={"seed": 1}, extra={"metrics": metrics, "policy": {"ref": "tiny:0"}})


def test_merged_generations_have_global_prompt_indices_in_prompt_order(tmp_path):
    prompts = _table(tmp_path, pd.DataFrame({"prompt_id": [f"p{i}" for i in range(5)],
                                             "prompt": [f"q{i}" for i in range(5)]}))
    parts = split_table(prompts, 2, tmp_path)
    outs = [_fake_collect(p, 2, tmp_path, str(i)) for i, p in enumerate(parts)]
    merged = merge_generations(outs, "policy-sha", prompts, {"k": 2, "shards": 2}, tmp_path)
    df = read_table(merged)
    assert df["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert df["sample_index"].tolist() == [0, 1] * 5
    assert df["prompt"].tolist() == [f"q{i}" for i in range(5) for _ in range(2)]
    assert ROW not in df.columns
    m = read_manifest(merged.path)
    assert m["metrics"]["generated_tokens"] == 20 and m["metrics"]["generate_s"] == 4.0
    assert m["metrics"]["tokens_per_s"] == pytest.approx(5.0)  # per engine: 20 tokens over 4 engine-seconds
    assert m["metrics"]["truncated_share"] == 0.5 and m["metrics"]["n_prompts"] == 5
    assert m["inputs"] == {"policy": "policy-sha", "prompts": prompts.sha256}
    assert [s["sha256"] for s in m["shards"]] == [o.sha256 for o in outs]


def _rm(tmp_path_factory):
    from tests.unit.test_reward_model_judge import build_rm

    return build_rm(tmp_path_factory.mktemp("rm") / "rm")


def test_sharded_annotate_with_a_reward_model_equals_one_call(tmp_path, tmp_path_factory):
    """Three shards judged separately and merged give the unsharded judgments: same rows in the same order, every
    column equal, scores to float tolerance (the reward model batches differently); win-probabilities too, since
    all samples of a prompt are judged in one shard."""
    from pipeline_lib.stages.annotate import run as annotate

    rm = _rm(tmp_path_factory)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    rows = [{"prompt_id": f"p{i}", "prompt": f"Say something {i}", "prompt_index": i, "sample_index": s,
             "response": " ".join(rng.choice(words, size=1 + (i + s) % 4))} for i in range(7) for s in range(3)]
    gens = _table(tmp_path, pd.DataFrame(rows), "gens")
    judge = {"kind": "reward_model", "model": str(rm)}
    whole = read_table(annotate(gens, judge, tmp_path / "w1", quiet=True))
    parts = split_table(gens, 3, tmp_path / "w2", group="prompt_id")
    outs = [annotate(p, judge, tmp_path / "w2", quiet=True) for p in parts]
    merged_ref = merge_judgments(outs, gens, tmp_path / "w2")
    merged = read_table(merged_ref)
    assert list(merged.columns) == list(whole.columns)
    pd.testing.assert_frame_equal(merged.drop(columns=["score", "winprob"]), whole.drop(columns=["score", "winprob"]))
    np.testing.assert_allclose(merged["score"], whole["score"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(merged["winprob"], whole["winprob"], rtol=0, atol=1e-5)
    m = read_manifest(merged_ref.path)
    assert m["config"]["shards"] == 3 and m["inputs"] == {"generations": gens.sha256}
    assert m["metrics"]["mean_score"] == pytest.approx(float(whole["score"].mean()), abs=1e-5)


def test_sharded_evaluation_judges_the_merged_responses(tmp_path):
    """The judging half on merged responses gives the metrics worked out by hand; responses that do not answer the
    prompts row for row are refused."""
    from pipeline_lib.stages.evaluate import run as evaluate_heldout
    from pipeline_lib.models import ResolvedModel

    prompts = _table(tmp_path, pd.DataFrame({
        "prompt_id": ["a", "b", "c"], "prompt": ["Answer in lowercase.", "Use no commas.", "Answer in lowercase."],
        "instruction_id_list": [["change_case:english_lowercase"], ["punctuation:no_comma"],
                                ["change_case:english_lowercase"]],
        "kwargs": [json.dumps([{}])] * 3}), "prompts")
    responses = {"a": "all lowercase here", "b": "no, commas", "c": "Not Lowercase"}
    parts = split_table(prompts, 2, tmp_path)
    outs = []
    for i, p in enumerate(parts):
        df = read_table(p)
        df = df.assign(prompt_index=range(len(df)), response=[responses[x] for x in df["prompt_id"]],
                       n_tokens=[len(responses[x].split()) for x in df["prompt_id"]], finish_reason="stop")
        outs.append(write_table(df, tmp_path / "gen" / str(i), name="responses", producer="heldout-generate",
                                extra={"metrics": {"generated_tokens": 4, "generate_s": 1.0, "load_s": 0.5}}))
    cfg = EvaluateConfig()
    merged = merge_responses(outs, "m-sha", prompts, {"shards": 2}, tmp_path)
    model = ResolvedModel(ref="x", path=str(tmp_path), sha256="m-sha")
    ev = read_manifest(evaluate_heldout(model, prompts, {"kind": "rules"}, cfg, tmp_path, responses=merged).path)
    # a: followed, b: a comma (fails), c: not lowercase (fails) -> 1 of 3 prompts, 1 of 3 instructions
    assert ev["metrics"]["pass_rate_strict"] == pytest.approx(1 / 3)
    assert ev["metrics"]["instruction_pass_rate"] == pytest.approx(1 / 3)
    assert ev["metrics"]["mean_tokens"] == pytest.approx((3 + 2 + 2) / 3)
    assert ev["metrics"]["tokens_per_s"] == pytest.approx(8 / 2.0)
    assert ev["inputs"]["responses"] == merged.sha256
    with pytest.raises(ValueError, match="row for row"):
        evaluate_heldout(model, prompts, {"kind": "rules"}, cfg, tmp_path / "other", responses=outs[0])


def test_scale_config_validation():
    assert load_config(None, []).scale == ScaleConfig()
    cfg = load_config(None, ["scale.shards=4", "scale.task_runner=ray", "scale.address=127.0.0.1:6379",
                             "scale.resources={num_gpus: 1}"])
    assert (cfg.scale.shards, cfg.scale.resources) == (4, {"num_gpus": 1.0})
    with pytest.raises(ConfigError, match="scale.shards: Input should be greater than or equal to 1"):
        load_config(None, ["scale.shards=0"])
    with pytest.raises(ConfigError, match="runs shards: set scale.shards > 1"):
        load_config(None, ["scale.task_runner=ray"])
    with pytest.raises(ConfigError, match="scale.task_runner: Input should be"):
        load_config(None, ["scale.task_runner=spark", "scale.shards=2"])
    with pytest.raises(ConfigError, match="set scale.task_runner"):
        load_config(None, ["scale.shards=2", "scale.resources={num_gpus: 1}"])


def test_one_shard_is_the_round_as_before():
    """scale.shards = 1: the stage tasks are called with the round's own arguments (so the same task cache keys and
    artifacts), nothing is split, and the round's MLflow key is the one computed before the scale section existed."""
    from flows.round_record import round_key_config
    from flows.sharded import ShardedStages
    from pipeline_lib.artifacts import sha256_json
    from tasks.common import RoundContext

    calls = []

    def stage(name):
        return lambda *a, **kw: calls.append((name, a, kw)) or name

    ctx = RoundContext(work_dir="/w", tracking_uri="sqlite://", experiment="e", parent_run_id="p")
    cfg = load_config(None, ["judge.kind=reward_model", "judge.model=tiny-rm:0"])
    prompts, gens, held = (ArtifactRef(kind="table", name=n, path=f"/w/{n}", sha256=n, rows=64)
                           for n in ("prompts", "gens", "held"))
    for scale in (cfg.scale, ScaleConfig(shards=4, min_rows_per_shard=100)):  # default; too few rows to shard
        calls.clear()
        s = ShardedStages(scale, ctx, stage("collect"), stage("annotate"), stage("evaluate"))
        assert s.collect("pol", prompts, cfg.collect) == "collect"
        assert s.annotate(gens, cfg.judge) == "annotate"
        assert s.evaluate("m", held, cfg.judge, cfg.evaluate, "champion", 2) == "evaluate"
        assert calls == [("collect", ("pol", prompts, cfg.collect, ctx), {}),
                         ("annotate", (gens, cfg.judge, ctx), {}),
                         ("evaluate", ("m", held, cfg.judge, cfg.evaluate, ctx),
                          {"role": "champion", "tensor_parallel_size": 2})]
    before = {k: v for k, v in cfg.model_dump(exclude={"run"}).items() if k != "scale"}
    assert sha256_json(round_key_config(cfg)) == sha256_json(before)
    assert round_key_config(load_config(None, ["scale.shards=2"]))["shards"] == 2


def test_small_inputs_get_fewer_shards_or_none():
    scale = ScaleConfig(shards=32, min_rows_per_shard=256)
    assert scale.shards_for(20_000) == 32  # SPPO's 20k prompts: 32 shards of 625
    assert scale.shards_for(1_000) == 3  # 3 shards of >= 256 rows
    assert scale.shards_for(100) == 1  # a 100-prompt held-out set: one engine, the unsharded task
    assert ScaleConfig(shards=4).shards_for(3) == 3 and ScaleConfig(shards=4).shards_for(None) == 4


def test_rules_judge_is_not_sharded_model_judges_are():
    from pipeline_lib.judges.base import JUDGES, parse_judge_options

    assert not JUDGES[parse_judge_options({"kind": "rules"}).kind].model_based
    assert {k for k, cls in JUDGES.items() if cls.model_based} == {"reward_model", "pairrm", "llm"}
