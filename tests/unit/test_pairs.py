import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_lib.judges.base import Item
from pipeline_lib.losses import sppo_loss
from pipeline_lib.stages.pair import build_pairs
from pipeline_lib.winprob import win_probabilities, win_probability_columns


def judged(scores_by_prompt):
    rows = []
    for pid, scores in scores_by_prompt.items():
        for i, s in enumerate(scores):
            rows.append({"prompt_id": pid, "prompt": f"q{pid}", "prompt_text": f"<q{pid}>", "sample_index": i,
                         "response": f"{pid}-r{i}", "score": s, "behavior_logp_seq": -float(i),
                         "n_tokens": 10 + i, "response_source": "on_policy"})
    return pd.DataFrame(rows)


def test_best_worst_picks_first_max_and_first_min_and_drops_ties():
    # p1 scores [0.5, 1.0, 0.0, 1.0]: max 1.0 first at index 1, min 0.0 at index 2.
    # p2 is all 0.5: a tie, no pair.
    pairs, counts = build_pairs(judged({"p1": [0.5, 1.0, 0.0, 1.0], "p2": [0.5] * 4}), "best_worst")
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row.chosen, row.rejected) == ("p1-r1", "p1-r2")
    assert (row.chosen_score, row.rejected_score) == (1.0, 0.0)
    assert row.chosen_behavior_logp_seq == -1.0 and row.rejected_behavior_logp_seq == -2.0
    assert counts == {"n_prompts": 2, "n_pairs": 1, "n_prompts_tied": 1, "mean_score_gap": 1.0}


def test_all_pairs_counts_every_strictly_ordered_pair():
    # [0.5, 1.0, 0.0, 1.0]: (0,2) (1,0) (1,2) (3,0) (3,2) = 5 pairs; (1,3) and (3,1) are ties.
    pairs, counts = build_pairs(judged({"p1": [0.5, 1.0, 0.0, 1.0]}), "all_pairs")
    got = sorted(zip(pairs.chosen, pairs.rejected))
    assert got == sorted([("p1-r0", "p1-r2"), ("p1-r1", "p1-r0"), ("p1-r1", "p1-r2"), ("p1-r3", "p1-r0"),
                          ("p1-r3", "p1-r2")])
    # mean gap = (0.5 + 0.5 + 1 + 0.5 + 1) / 5 = 0.7
    assert counts["mean_score_gap"] == pytest.approx(0.7)


def test_min_margin_drops_small_gaps():
    pairs, counts = build_pairs(judged({"p1": [0.2, 0.4], "p2": [0.0, 1.0]}), "best_worst", min_margin=0.25)
    assert pairs.chosen.tolist() == ["p2-r1"] and counts["n_prompts_tied"] == 1


def test_sppo_winprob_orders_by_win_probability():
    # Scores [1, 0, 0.5] as Bradley-Terry: P(0>1)=s(1)=.731, P(0>2)=s(.5)=.622, P(2>1)=s(.5)=.622.
    # Win probabilities with the diagonal at 1/2: w0=(.5+.7311+.6225)/3=.6179, w1=(.2689+.5+.3775)/3=.3821, w2=.5
    df = judged({"p1": [1.0, 0.0, 0.5]})
    w = win_probabilities(None, df, [Item(r.prompt, r.response) for r in df.itertuples()])
    np.testing.assert_allclose(w, [0.6179, 0.3821, 0.5], atol=1e-4)
    assert w.sum() == pytest.approx(1.5)  # sum_i mean_j P(i>j) = K/2 for any consistent matrix
    df = df.assign(**win_probability_columns(None, df, [Item(r.prompt, r.response) for r in df.itertuples()]))
    pairs, _ = build_pairs(df, "sppo_winprob")
    assert (pairs.chosen[0], pairs.rejected[0]) == ("p1-r0", "p1-r1")
    assert pairs.chosen_winprob[0] == pytest.approx(0.6179, abs=1e-4)


# -- SPPO's win-probabilities from a pairwise judge (pipeline_lib/winprob.py) ------------------------------------------
# Ranker logits L[i, j] = "sample i (first slot) beats sample j", L_ii = 0, as LLM-Blender's _full_predict leaves it.
L = np.array([[0.0, 1.0, 2.0], [-0.5, 0.0, 0.4], [-1.0, 0.2, 0.0]])


class PairwiseMatrix:
    """A pairwise judge's view as the annotate stage sees it (``native_score`` False, ``rank`` gives the K x K matrix)
    with PairRM's per-pair probability P_ij = sigmoid((L_ij - L_ji) / 2); the real PairRM is in test_pairrm.py."""

    native_score = False

    def rank(self, prompt, candidates, meta=None):
        d = L - L.T
        return 1 / (1 + np.exp(-d / 2))


def test_authors_win_probabilities_by_hand():
    """LLM-Blender (llm_blender/gpt_eval/utils.py lines 26-43): s_i = mean_j (L_ij - L_ji). L - L^T has rows
    (0, 1.5, 3), (-1.5, 0, 0.2), (-3, -0.2, 0), so s = (1.5, -0.4333333, -1.0666667). uclaml/SPPO compute_prob.py:
    P_ij = sigmoid(s_i - s_j) (line 45): P01 = s(1.9333333) = 0.8736179, P02 = s(2.5666667) = 0.9286853,
    P12 = s(0.6333333) = 0.6532449; P-hat = row sum / K with the diagonal's 1/2 (lines 84, 96):
    (0.5 + 0.8736179 + 0.9286853) / 3 = 0.7674344, (0.1263821 + 0.5 + 0.6532449) / 3 = 0.4265423, 0.3060233.
    The per-pair form: P01 = s(0.75) = 0.6791787, P02 = s(1.5) = 0.8175745, P12 = s(0.1) = 0.5249792 ->
    P-hat (0.6655844, 0.4486002, 0.3858155): every |P-hat - 1/2| smaller."""
    df = judged({"p1": [0.0, 0.0, 0.0]})
    items = [Item(r.prompt, r.response) for r in df.itertuples()]
    np.testing.assert_allclose(win_probabilities(PairwiseMatrix(), df, items), [0.7674344, 0.4265423, 0.3060233],
                               atol=1e-7)
    np.testing.assert_allclose(win_probabilities(PairwiseMatrix(), df, items, "pairwise"),
                               [0.6655844, 0.4486002, 0.3858155], atol=1e-7)
    cols = win_probability_columns(PairwiseMatrix(), df, items)
    np.testing.assert_allclose(cols["winprob_row"][0], [0.5, 0.8736179, 0.9286853], atol=1e-7)
    # the rows follow sample_index whatever the table's row order
    shuffled = df.iloc[[2, 0, 1]].reset_index(drop=True)
    items = [Item(r.prompt, r.response) for r in shuffled.itertuples()]
    np.testing.assert_allclose(win_probabilities(PairwiseMatrix(), shuffled, items), [0.3060233, 0.7674344, 0.4265423],
                               atol=1e-7)


def with_winprob(scores_by_prompt):
    df = judged(scores_by_prompt)
    cols = win_probability_columns(None, df, [Item(r.prompt, r.response) for r in df.itertuples()])
    return df.assign(**cols)


def test_sppo_winprob_keeps_tied_prompts_and_carries_the_pair_probability():
    """compute_prob.py's prepare_score (lines 83-97) keeps every prompt: all-tied samples give chosen = rejected =
    the first sample (argmax = argmin = 0), P-hat = 1/2 on both sides. P(chosen > rejected) for sppo_single is the
    matrix entry [argmax][argmin] (line 95): sigmoid(1 - 0) = 0.7310586 for scores [1, 0, 0.5]."""
    pairs, counts = build_pairs(with_winprob({"p1": [1.0, 0.0, 0.5], "p2": [0.3] * 3}), "sppo_winprob")
    assert counts["n_pairs"] == 2 and counts["n_prompts_tied"] == 0
    assert (pairs.chosen[1], pairs.rejected[1]) == ("p2-r0", "p2-r0")
    assert pairs.chosen_winprob[1] == pairs.rejected_winprob[1] == pytest.approx(0.5)
    assert pairs.pair_winprob.tolist() == pytest.approx([0.7310586, 0.5], abs=1e-7)


def test_pairwise_form_is_selected_by_name():
    df = judged({"p1": [0.0, 0.0, 0.0]})
    df = df.assign(**win_probability_columns(PairwiseMatrix(), df, [Item(r.prompt, r.response)
                                                                       for r in df.itertuples()]))
    authors, _ = build_pairs(df, "sppo_winprob")
    pairwise, _ = build_pairs(df, "sppo_winprob", winprob="pairwise")
    assert (authors.chosen_winprob[0], authors.rejected_winprob[0], authors.pair_winprob[0]) == pytest.approx(
        (0.7674344, 0.3060233, 0.9286853), abs=1e-7)
    assert (pairwise.chosen_winprob[0], pairwise.rejected_winprob[0], pairwise.pair_winprob[0]) == pytest.approx(
        (0.6655844, 0.3858155, 0.8175745), abs=1e-7)


@pytest.mark.parametrize("k", [4, 5])
def test_sppo_all_regresses_every_sample_once(k):
    """Algorithm 1's regression: the mean of the sppo loss over a prompt's sppo_all rows equals
    (1/K) sum_k (rho_k - eta(P-hat_k - 1/2))^2, each sample weighted 1/K (K = 4: pairs (0,1), (2,3); K = 5: the cycle
    (0,1), (1,2), (2,3), (3,4), (4,0), every sample twice)."""
    df = with_winprob({"p1": [0.3, -1.0, 2.0, 0.5, 0.0][:k]})
    pairs, _ = build_pairs(df, "sppo_all")
    want_rows = [(0, 1), (2, 3)] if k == 4 else [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
    assert list(zip(pairs.chosen_sample_index, pairs.rejected_sample_index)) == want_rows
    rho = torch.tensor([0.4, -0.2, 1.1, 0.0, -0.7][:k], dtype=torch.float64)  # log-ratio of each sample
    beta, eta = 0.5, 2.0
    w, l = list(pairs.chosen_sample_index), list(pairs.rejected_sample_index)
    loss_b, _ = sppo_loss(rho[w], rho[l], torch.zeros(len(w)), torch.zeros(len(w)), beta=beta,
                          chosen_winprob=torch.tensor(pairs.chosen_winprob.tolist(), dtype=torch.float64),
                          rejected_winprob=torch.tensor(pairs.rejected_winprob.tolist(), dtype=torch.float64))
    p_hat = torch.tensor(df.winprob.tolist(), dtype=torch.float64)
    want = ((rho - eta * (p_hat - 0.5)) ** 2).mean()
    assert loss_b.mean().item() == pytest.approx(want.item(), rel=1e-12)


def test_iid_and_unlabelled_pairs_keep_samples_apart():
    """iid_pairs: (0, 1) and (2, 3), each ordered by the judge, a tie dropped; unlabelled: the same pairs in sample
    order and no score needed (the round skipped the judge); odd K leaves the last sample out."""
    pairs, counts = build_pairs(judged({"p1": [0.1, 0.9, 0.5, 0.5, 1.0]}), "iid_pairs")
    assert list(zip(pairs.chosen, pairs.rejected)) == [("p1-r1", "p1-r0")] and counts["n_prompts_tied"] == 0
    unscored = judged({"p1": [0.0] * 5}).drop(columns=["score"])
    pairs, counts = build_pairs(unscored, "unlabelled")
    assert list(zip(pairs.chosen, pairs.rejected)) == [("p1-r0", "p1-r1"), ("p1-r2", "p1-r3")]
    assert counts["mean_score_gap"] == 0.0 and "chosen_score" not in pairs.columns


def _with_endings(scores, endings):
    df = judged({"p1": scores})
    return df.assign(finish_reason=["length" if e == "cut" else "stop" for e in endings])


def test_unfinished_samples_keep_last_drop_by_hand():
    # scores [1.0, 0.5, 0.0, 1.0]; samples 0 and 3 were cut at max_tokens.
    df = _with_endings([1.0, 0.5, 0.0, 1.0], ["cut", "end", "end", "cut"])
    pick = {mode: build_pairs(df, "best_worst", unfinished=mode) for mode in ("keep", "last", "drop")}
    # keep: best = first 1.0 (sample 0, cut), worst = 0.0 (sample 2)
    assert list(zip(pick["keep"][0].chosen, pick["keep"][0].rejected)) == [("p1-r0", "p1-r2")]
    # last: the finished ones (0.5, 0.0) outrank both cut ones (1.0 - (1.0 - 0.0 + 0 + 1) = -1.0 each): best = 0.5
    # (sample 1), worst = the first cut sample (0); the rows keep the judge's scores, so the gap is 0.5 - 1.0
    last, counts = pick["last"]
    assert list(zip(last.chosen, last.rejected)) == [("p1-r1", "p1-r0")]
    assert (last.chosen_score[0], last.rejected_score[0]) == (0.5, 1.0)
    assert counts == {"n_prompts": 1, "n_pairs": 1, "n_prompts_tied": 0, "mean_score_gap": -0.5,
                      "n_samples_unfinished": 2}
    # drop: only samples 1 and 2 are paired
    assert list(zip(pick["drop"][0].chosen, pick["drop"][0].rejected)) == [("p1-r1", "p1-r2")]
    assert list(pick["drop"][0].chosen_sample_index) == [1] and list(pick["drop"][0].rejected_sample_index) == [2]


def test_unfinished_last_with_all_pairs_and_a_margin():
    # [0.5 end, 1.0 cut, 0.0 end], margin 0.3: the cut sample's value is 1.0 - (1.0 + 0.3 + 1) = -1.3.
    # keep: (1,0) gap 0.5, (1,2) gap 1.0, (0,2) gap 0.5 -> 3 pairs; last: (0,2) 0.5, (0,1) 1.8, (2,1) 1.3 -> 3 pairs
    df = _with_endings([0.5, 1.0, 0.0], ["end", "cut", "end"])
    keep, _ = build_pairs(df, "all_pairs", min_margin=0.3)
    last, _ = build_pairs(df, "all_pairs", min_margin=0.3, unfinished="last")
    assert sorted(zip(keep.chosen, keep.rejected)) == [("p1-r0", "p1-r2"), ("p1-r1", "p1-r0"), ("p1-r1", "p1-r2")]
    assert sorted(zip(last.chosen, last.rejected)) == [("p1-r0", "p1-r1"), ("p1-r0", "p1-r2"), ("p1-r2", "p1-r1")]


def test_unfinished_changes_nothing_when_all_or_none_are_cut_and_drop_can_leave_no_pair():
    for endings in (["end"] * 3, ["cut"] * 3):
        df = _with_endings([0.2, 0.9, 0.4], endings)
        assert build_pairs(df, "best_worst", unfinished="last")[0].equals(build_pairs(df, "best_worst")[0])
    _, counts = build_pairs(_with_endings([0.2, 0.9, 0.4], ["cut", "end", "cut"]), "best_worst", unfinished="drop")
    assert counts["n_pairs"] == 0 and counts["n_prompts_tied"] == 1  # one finished sample: nothing to pair


def test_unfinished_needs_how_samples_ended():
    with pytest.raises(ValueError, match="needs the judged table's 'finish_reason' column"):
        build_pairs(judged({"p1": [0.0, 1.0]}), "best_worst", unfinished="last")
