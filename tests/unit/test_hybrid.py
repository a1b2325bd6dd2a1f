"""WPO's hybrid setting: dataset responses + on-policy samples judged together; pairs and source shares worked out by
hand; equivalence of the ``lowest`` rule with the pair stage's best_worst; a whole hybrid chain through the stages."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from _tiny import tiny_tokenizer

from pipeline_lib.artifacts import read_manifest, read_table, write_table
from pipeline_lib.generation.sampling import render_chat
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stages.dataset_pairs import FilePairs
from pipeline_lib.stages.dataset_pairs import run as make_dataset_pairs
from pipeline_lib.stages.hybrid_candidates import candidates_table
from pipeline_lib.stages.hybrid_candidates import run as make_candidates
from pipeline_lib.stages.hybrid_pair import REJECTED, HybridOptions, hybrid_pairs
from pipeline_lib.stages.hybrid_pair import run as make_hybrid_pairs
from pipeline_lib.stages.hybrid_prompts import prompts_from_pairs
from pipeline_lib.stages.hybrid_prompts import run as make_hybrid_prompts
from pipeline_lib.stages.pair import build_pairs

# prompt: [(source, score)] in sample_index order
JUDGED = {
    "A": [("off_policy", 0.9), ("off_policy", 0.2), ("on_policy", 0.9), ("on_policy", 0.1), ("on_policy", 0.5)],
    "B": [("off_policy", 0.3), ("off_policy", 0.1), ("on_policy", 0.8), ("on_policy", 0.1), ("reference", 0.6)],
    "C": [("off_policy", 0.4), ("off_policy", 0.4), ("on_policy", 0.4)],
    "D": [("off_policy", 0.0), ("off_policy", 0.7), ("on_policy", 1.0), ("on_policy", 0.5)],
    "E": [("off_policy", 0.1), ("reference", 0.9), ("on_policy", 0.3)],
}


def judged_table(spec=JUDGED, shuffle_seed: int | None = 0) -> pd.DataFrame:
    rows = [{"prompt_id": p, "prompt": f"prompt {p}", "prompt_text": f"<{p}>", "response": f"{p}{k}",
             "response_source": src, "sample_index": k, "score": s}
            for p, cands in spec.items() for k, (src, s) in enumerate(cands)]
    df = pd.DataFrame(rows)
    # row order must not matter, only sample_index
    return df.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True) if shuffle_seed is not None else df


def test_lowest_pairs_and_source_shares_by_hand():
    """A: best 0.9 twice (A0 dataset, A2 sample) -> the first, A0; lowest A3 (0.1), gap 0.8.
    B: best B2 0.8; lowest 0.1 twice (B1, B3) -> the first, B1; gap 0.7.
    C: all 0.4 -> no pair (tied).  D: D2 1.0 vs D0 0.0, gap 1.0.  E: E1 (reference) 0.9 vs E0 0.1, gap 0.8.
    Sources: chosen off (A), on (B, D), reference (E) -> on-policy chosen share 2/4 = 0.5;
    rejected on (A), off (B, D, E) -> on-policy rejected share 1/4 = 0.25. Mean gap (0.8+0.7+1.0+0.8)/4 = 0.825."""
    pairs, counts = hybrid_pairs(judged_table(), "lowest")
    got = list(zip(pairs["prompt_id"], pairs["chosen"], pairs["rejected"]))
    assert sorted(got) == [("A", "A0", "A3"), ("B", "B2", "B1"), ("D", "D2", "D0"), ("E", "E1", "E0")]
    by = pairs.set_index("prompt_id")
    assert by.loc["A", "chosen_response_source"] == "off_policy"
    assert by.loc["A", "rejected_response_source"] == "on_policy"
    assert by.loc["E", "chosen_response_source"] == "reference"
    assert (by.loc["B", "chosen_score"], by.loc["B", "rejected_score"]) == (0.8, 0.1)
    assert by.loc["A", "prompt_text"] == "<A>" and by.loc["A", "chosen_sample_index"] == 0
    assert counts == pytest.approx({
        "n_prompts": 5, "n_pairs": 4, "n_prompts_tied": 1, "mean_score_gap": 0.825,
        "chosen_off_policy": 1, "chosen_on_policy": 2, "chosen_reference": 1, "on_policy_chosen_share": 0.5,
        "rejected_off_policy": 3, "rejected_on_policy": 1, "rejected_reference": 0, "on_policy_rejected_share": 0.25})


def test_min_margin():
    """Margin 0.75: B's gap 0.7 is not above it -> 3 pairs, 2 tied prompts (B, C)."""
    pairs, counts = hybrid_pairs(judged_table(), "lowest", min_margin=0.75)
    assert sorted(pairs["prompt_id"]) == ["A", "D", "E"] and counts["n_prompts_tied"] == 2


def test_lowest_equals_pair_stage_best_worst():
    """Equivalence with the pair stage's best_worst (same tie rules: first in sample order) on random judged tables
    with many ties (scores rounded to 1 decimal)."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        spec = {f"p{i}": [(rng.choice(["off_policy", "on_policy"]), float(np.round(rng.uniform(), 1)))
                          for _ in range(rng.integers(2, 7))] for i in range(8)}
        judged = judged_table(spec, shuffle_seed=trial)
        ours, _ = hybrid_pairs(judged, "lowest", min_margin=0.1)
        ref, _ = build_pairs(judged, "best_worst", min_margin=0.1)
        cols = ["prompt_id", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_response_source"]
        pd.testing.assert_frame_equal(ours[cols].reset_index(drop=True), ref[cols].reset_index(drop=True))


def test_random_other_is_uniform_over_strictly_lower_candidates():
    """A: best A0 (0.9); candidates more than 0 below: A1 0.2, A3 0.1, A4 0.5 (never A2, tied at 0.9).
    The rule draws each 1/3 of the time over 3000 seeds (binomial sd sqrt(1/3*2/3/3000) = 0.0086; tolerance 0.04);
    through hybrid_pairs, 60 seeds reach all three (a miss has probability 3*(2/3)^60 < 1e-10) and nothing else.
    Margin 0.45 leaves A1 (gap 0.7) and A3 (0.8): A4's gap 0.4 is not above it. C (all tied) gives no pair."""
    s = np.array([score for _, score in JUDGED["A"]])
    draws = [REJECTED["random_other"](s, 0, 0.0, np.random.default_rng(seed)) for seed in range(3000)]
    freq = pd.Series(draws).value_counts(normalize=True).sort_index()
    assert freq.index.tolist() == [1, 3, 4] and np.allclose(freq.to_numpy(), 1 / 3, atol=0.04)
    judged = judged_table()
    only_a = judged[judged["prompt_id"] == "A"]
    picks = {hybrid_pairs(only_a, "random_other", seed=seed)[0]["rejected"].iloc[0] for seed in range(60)}
    assert picks == {"A1", "A3", "A4"}
    margin_picks = {hybrid_pairs(only_a, "random_other", seed=seed, min_margin=0.45)[0]["rejected"].iloc[0]
                    for seed in range(40)}
    assert margin_picks == {"A1", "A3"}
    pairs, counts = hybrid_pairs(judged, "random_other", seed=7)
    assert "C" not in set(pairs["prompt_id"]) and counts["n_prompts_tied"] == 1
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()


def test_random_other_is_seeded_per_prompt():
    """Same seed -> same pairs; a prompt's draw does not depend on the other prompts in the table."""
    judged = judged_table()
    a, _ = hybrid_pairs(judged, "random_other", seed=3)
    b, _ = hybrid_pairs(judged_table(shuffle_seed=5), "random_other", seed=3)
    pd.testing.assert_frame_equal(a.sort_values("prompt_id").reset_index(drop=True),
                                  b.sort_values("prompt_id").reset_index(drop=True))
    alone, _ = hybrid_pairs(judged[judged["prompt_id"] == "B"], "random_other", seed=3)
    assert alone["rejected"].iloc[0] == a.set_index("prompt_id").loc["B", "rejected"]


# ---------------------------------------------------------------------------------------------- candidates table
def dataset_pairs() -> pd.DataFrame:
    def pair(pid, c, r, cs, rs, row):
        return {"prompt_id": pid, "prompt": f"prompt {pid}", "prompt_text": f"<{pid}>", "chosen": c, "rejected": r,
                "chosen_score": cs, "rejected_score": rs, "chosen_response_source": "off_policy",
                "rejected_response_source": "off_policy", "source_row": row, "single_turn": True}

    return pd.DataFrame([pair("X", "c1", "r1", 9.0, 2.0, 1), pair("X", "c1", "r2", 9.0, 1.0, 2),
                         pair("Y", "c3", "r3", 5.0, 4.0, 3)])


def generations() -> pd.DataFrame:
    rows = [("X", 2, "s_b", -3.0), ("X", 0, "s_a", -1.0), ("X", 1, "r1", -2.0), ("Y", 0, "s_c", -4.0),
            ("Y", 1, "s_d", -5.0)]
    return pd.DataFrame([{"prompt_id": p, "prompt": f"prompt {p}", "prompt_text": f"<{p}>", "sample_index": k,
                          "response": t, "behavior_logp_seq": lp, "n_tokens": 2, "response_source": "on_policy",
                          "instruction_id_list": [], "kwargs": "[]"} for p, k, t, lp in rows])


def test_candidates_table_by_hand():
    """X: dataset c1, r1, (c1 again: dropped), r2, then samples in sample order s_a, (r1: a duplicate of the
    dataset's r1, dropped), s_b -> 5 candidates; Y: c3, r3, s_c, s_d. Dataset rows keep their dataset score and
    have no behavior log-prob; samples the reverse."""
    c = candidates_table(dataset_pairs(), generations())
    assert list(zip(c["prompt_id"], c["sample_index"], c["response"], c["response_source"])) == [
        ("X", 0, "c1", "off_policy"), ("X", 1, "r1", "off_policy"), ("X", 2, "r2", "off_policy"),
        ("X", 3, "s_a", "on_policy"), ("X", 4, "s_b", "on_policy"),
        ("Y", 0, "c3", "off_policy"), ("Y", 1, "r3", "off_policy"), ("Y", 2, "s_c", "on_policy"),
        ("Y", 3, "s_d", "on_policy")]
    assert c["dataset_score"].tolist()[:3] == [9.0, 2.0, 1.0] and math.isnan(c["dataset_score"].iloc[3])
    assert math.isnan(c["behavior_logp_seq"].iloc[0]) and c["behavior_logp_seq"].tolist()[3:5] == [-1.0, -3.0]
    assert c["prompt_text"].tolist() == ["<X>"] * 5 + ["<Y>"] * 4 and "instruction_id_list" in c.columns


def test_candidates_table_refuses_mismatches():
    gens = generations()
    with pytest.raises(ValueError, match=r"1 without samples \(e.g. \['Y'\]\), 0 not in the dataset"):
        candidates_table(dataset_pairs(), gens[gens["prompt_id"] == "X"])
    with pytest.raises(ValueError, match="prompt X: the dataset and the generations render it differently"):
        candidates_table(dataset_pairs(), gens.assign(prompt_text=lambda d: d["prompt_text"] + " "))
    with pytest.raises(ValueError, match="response_source 'human' is not one of"):
        candidates_table(dataset_pairs(), gens.assign(response_source="human"))
    with pytest.raises(ValueError, match=r"1 pair\(s\) continue a longer conversation, e.g. source rows \[3\]"):
        prompts_from_pairs(dataset_pairs().assign(single_turn=[True, True, False]))


def test_prompts_from_pairs():
    p = prompts_from_pairs(dataset_pairs())
    assert p.to_dict("records") == [
        {"prompt_id": "X", "prompt": "prompt X", "instruction_id_list": [], "kwargs": "[]", "base_task": "prompt X",
         "split": "train"},
        {"prompt_id": "Y", "prompt": "prompt Y", "instruction_id_list": [], "kwargs": "[]", "base_task": "prompt Y",
         "split": "train"}]


# ------------------------------------------------------------------------------------------------ the whole chain
def test_hybrid_chain_through_the_stages(tmp_path):
    """dataset file -> dataset pairs -> prompts -> (generations as collect writes them, prompt_text rendered by
    collect's own render_chat) -> candidates -> judged (scores by hand) -> hybrid pairs.
    q1: dataset good (3) / bad (0); samples s1 (5), s2 (1) -> chosen s1 (on), rejected bad (off).
    q2: dataset fine (4) / meh (2); samples s3 (0), s4 (4) -> chosen fine (first of the 4s, off), rejected s3 (on).
    On-policy share: chosen 1/2, rejected 1/2."""
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    policy = ResolvedModel(ref="tiny", path=str(tmp_path / "tok"), sha256="1" * 64)
    work = tmp_path / "work"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"}, {"prompt": "q2", "chosen": "fine", "rejected": "meh"}]))
    dpairs = make_dataset_pairs(FilePairs(source="jsonl", path=str(data)), policy, work)
    prompts = read_table(make_hybrid_prompts(dpairs, work))
    texts, _ = render_chat(tok, [[{"role": "user", "content": p}] for p in prompts["prompt"]])
    samples = {"q1": ["s1", "s2"], "q2": ["s3", "s4"]}
    gens = pd.DataFrame([{**r, "prompt_text": t, "sample_index": k, "response": s, "behavior_logp_seq": -1.0 - k,
                          "n_tokens": 1, "response_source": "on_policy"}
                         for r, t in zip(prompts.to_dict("records"), texts)
                         for k, s in enumerate(samples[r["prompt"]])])
    gen_ref = write_table(gens, work / "gens", name="generations", producer="collect")
    cand_ref = make_candidates(dpairs, gen_ref, work)
    assert read_manifest(cand_ref.path)["metrics"] == {"n_candidates": 8, "n_duplicates_dropped": 0,
                                                       "candidates_off_policy": 4, "candidates_on_policy": 4,
                                                       "candidates_reference": 0}
    scores = {"good": 3, "bad": 0, "s1": 5, "s2": 1, "fine": 4, "meh": 2, "s3": 0, "s4": 4}
    judged = read_table(cand_ref).assign(score=lambda d: d["response"].map(scores).astype(float))
    pairs_ref = make_hybrid_pairs(write_table(judged, work / "judged", name="judgments", producer="annotate"),
                                  HybridOptions(), work)
    pairs = read_table(pairs_ref)
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], pairs["chosen_response_source"],
                    pairs["rejected_response_source"])) == [("q1", "s1", "bad", "on_policy", "off_policy"),
                                                            ("q2", "fine", "s3", "off_policy", "on_policy")]
    m = read_manifest(pairs_ref.path)["metrics"]
    assert (m["on_policy_chosen_share"], m["on_policy_rejected_share"], m["mean_score_gap"]) == (0.5, 0.5, 4.5)
    assert pairs["prompt_text"].tolist() == texts
