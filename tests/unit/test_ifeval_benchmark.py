"""The IFEval benchmark's data loading, scoring and paired comparison (pipeline_lib.evaluation.ifeval), without a
model: responses written by hand, scored against IFEval's own rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.evaluation import ifeval as ife
from pipeline_lib.commands.ifeval import score_rows
from tests.conftest import shared_dir


def _local() -> str:
    return str(shared_dir() / "data" / "ifeval" / "input_data.jsonl")


def test_loads_all_541_prompts_and_834_instructions():
    df, where = ife.load_rows(_local())
    assert where == _local()
    assert len(df) == 541 and df["key"].is_unique
    assert sum(len(ids) for ids in df["instruction_id_list"]) == 834
    assert len({i for ids in df["instruction_id_list"] for i in ids}) == 25
    first = df.iloc[0]
    assert first["key"] == "1000" and json.loads(first["kwargs"])[1] == {"num_highlights": 3}


def test_default_source_is_the_evaluation_data_directory_copy():
    assert ife.resolve_source(None) == _local()
    assert ife.resolve_source("google/IFEval") == "google/IFEval"


def test_hub_rows_with_null_kwargs_load_like_the_local_file(tmp_path):
    """The hub copy carries every kwarg of every type, unset ones null: they are dropped, so the rows equal the
    local file's."""
    df, _ = ife.load_rows(_local(), subset=20, seed=3)
    all_keys = sorted({k for kws in df["kwargs"] for kw in json.loads(kws) for k in kw})
    hub_like = tmp_path / "hub_like.jsonl"
    with open(hub_like, "w") as f:
        for r in df.itertuples():
            kws = [{k: kw.get(k) for k in all_keys} for kw in json.loads(r.kwargs)]
            f.write(json.dumps({"key": int(r.key), "prompt": r.prompt, "instruction_id_list": r.instruction_id_list,
                                "kwargs": kws}) + "\n")
    again, _ = ife.load_rows(str(hub_like))
    pd.testing.assert_frame_equal(again, df)


def test_subset_is_seeded_and_in_file_order():
    a, _ = ife.load_rows(_local(), subset=30, seed=1)
    b, _ = ife.load_rows(_local(), subset=30, seed=1)
    c, _ = ife.load_rows(_local(), subset=30, seed=2)
    assert a.equals(b) and not a.equals(c)
    full, _ = ife.load_rows(_local())
    position = {k: i for i, k in enumerate(full["key"])}
    assert [position[k] for k in a["key"]] == sorted(position[k] for k in a["key"])


@pytest.mark.parametrize("row, match", [
    ({"prompt": "hi", "instruction_id_list": ["punctuation:no_comma"]}, "row 2: missing field"),
    ({"prompt": "", "instruction_id_list": [], "kwargs": []}, "row 2: 'prompt' must be a non-empty string"),
    ({"prompt": "hi", "instruction_id_list": ["nope:x"], "kwargs": [{}]}, "row 2: .*nope:x"),
    ({"prompt": "hi", "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "less than"}]},
     "row 2: .*num_words"),
])
def test_bad_rows_are_named(tmp_path, row, match):
    p = tmp_path / "bad.jsonl"
    good = {"key": 1, "prompt": "ok", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps({"key": 2, **row}) + "\n")
    with pytest.raises(ValueError, match=match):
        ife.load_rows(str(p))


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ife.load_rows(str(tmp_path / "nope.jsonl"))


def _responses(df: pd.DataFrame) -> list[str]:
    """Hand-written replies drawn at random for each prompt: each follows some instruction types (lowercase, capitals,
    quotation, title, bullets, postscript, JSON...), so both scorers have passes and failures to agree on."""
    rng = np.random.default_rng(0)
    pool = ["my answer is yes.", "HELLO WORLD", '"Quoted reply."', "<<Title>>\n* one\n* two\nP.S. bye",
            "plain words without punctuation", "Some, commas, here.", "```json\n{\"a\": 1}\n```"]
    return [pool[i] for i in rng.integers(0, len(pool), len(df))]


def test_scores_equal_the_ifeval_score_command():
    """score_table (the benchmark stage) and `alignflow ifeval score` (the CLI) give the same four accuracies and the
    same per-instruction table on the same responses."""
    df, _ = ife.load_rows(_local())
    df = df.assign(response=_responses(df))
    scored, metrics = ife.score_table(df)
    rows = [(i + 1, {"prompt": r.prompt, "instruction_id_list": list(r.instruction_id_list),
                     "kwargs": json.loads(r.kwargs), "response": r.response}) for i, r in enumerate(df.itertuples())]
    _, summary = score_rows(rows)
    for mode in ("strict", "loose"):
        assert metrics[f"prompt_level_{mode}"] == pytest.approx(summary[mode]["prompt_level"])
        assert metrics[f"instruction_level_{mode}"] == pytest.approx(summary[mode]["instruction_level"])
    assert metrics["by_instruction"] == summary["by_instruction"]
    assert metrics["prompt_level_strict"] > 0  # the hand-written replies do follow some instructions
    assert list(scored["strict_all"]) == [all(f) for f in scored["strict_follow"]]


def test_paired_comparison_counts_prompts_gained_and_lost():
    """Three prompts. Before: the first passes. After: the second and third pass, the first fails -> 2 gained,
    1 lost, prompt-level +1/3; McNemar on 3 discordant prompts: 2 * (C(3,0) + C(3,1)) / 8 = 1.0."""
    base = pd.DataFrame({"key": ["a", "b", "c"]})
    before = base.assign(strict_all=[True, False, False], loose_all=[True, False, False],
                         strict_follow=[[True], [False], [False, False]],
                         loose_follow=[[True], [False], [False, False]])
    after = base.assign(strict_all=[False, True, True], loose_all=[False, True, True],
                        strict_follow=[[False], [True], [True, True]], loose_follow=[[False], [True], [True, True]])
    p = ife.paired_ifeval(before, after.iloc[::-1].reset_index(drop=True))  # matched by key, not by position
    s = p["prompt_level_strict"]
    assert (s["n_gained"], s["n_lost"], s["p_value"]) == (2, 1, 1.0)
    assert s["delta"] == pytest.approx(1 / 3)
    # instruction level: before 1 of 4 followed, after 3 of 4
    assert p["instruction_level_strict"]["delta"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different prompts"):
        ife.paired_ifeval(before, after.iloc[:2])
