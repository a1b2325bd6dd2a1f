"""The base class's generic adapters (pipeline_lib/judges/base.py), checked on tiny in-test judges with numbers
worked out by hand: score -> compare/rank by Bradley-Terry, compare -> rank/score by mean win probability."""

import math

import numpy as np
import pytest

from pipeline_lib.judges.base import Item, Judge, JudgeOptions


class TableScoreOptions(JudgeOptions):
    offset: float = 0.0


class TableScorer(Judge):
    """Pointwise: the score of a response is looked up in a table (plus an option, to vary the identity)."""

    kind = "table_scorer"
    Options = TableScoreOptions
    TABLE = {"a": 0.0, "b": math.log(3), "c": math.log(9)}

    def score(self, items):
        return np.array([self.TABLE[it.response] + self.options.offset for it in items])


class TablePairwise(Judge):
    """Pairwise only: P(x beats y) from a table of unordered pairs."""

    kind = "table_pairwise"
    P = {("x", "y"): 0.8, ("x", "z"): 0.6, ("y", "z"): 0.3}

    def compare(self, prompt, a, b, meta=None):
        if a == b:
            return 0.5
        return self.P[(a, b)] if (a, b) in self.P else 1.0 - self.P[(b, a)]


def scorer(offset=0.0):
    return TableScorer(TableScoreOptions(kind="table_scorer", offset=offset))


def pairwise():
    return TablePairwise(JudgeOptions(kind="table_pairwise"))


def test_bradley_terry_compare_from_scores():
    """s_a = 0, s_b = ln 3: P(a > b) = 1 / (1 + e^{ln 3}) = 1/4 and P(b > a) = 3 / (1 + 3) = 3/4."""
    j = scorer()
    assert j.compare("p", "a", "b") == pytest.approx(0.25, abs=1e-12)
    assert j.compare("p", "b", "a") == pytest.approx(0.75, abs=1e-12)
    assert j.compare("p", "b", "b") == pytest.approx(0.5, abs=1e-12)


def test_bradley_terry_compare_ignores_a_common_offset():
    """Bradley-Terry depends only on score differences: adding 5 to every score changes nothing."""
    assert scorer(offset=5.0).compare("p", "a", "c") == pytest.approx(scorer().compare("p", "a", "c"), abs=1e-12)


def test_rank_from_scores():
    """Scores (0, ln 3, ln 9): P(b > a) = 3/4, P(c > b) = sigma(ln 3) = 3/4, P(c > a) = sigma(ln 9) = 9/10."""
    m = scorer().rank("p", ["a", "b", "c"])
    expected = np.array([[0.5, 0.25, 0.1],
                         [0.75, 0.5, 0.25],
                         [0.9, 0.75, 0.5]])
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_rank_from_pairwise_compare():
    """[i, j] = P(i beats j); the lower triangle is 1 - the upper one; the diagonal is 0.5."""
    m = pairwise().rank("p", ["x", "y", "z"])
    expected = np.array([[0.5, 0.8, 0.6],
                         [0.2, 0.5, 0.3],
                         [0.4, 0.7, 0.5]])
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_score_from_pairwise_is_mean_win_probability_per_prompt():
    """Mean win probability against the other candidates of the same prompt (diagonal excluded):
    x: (0.8 + 0.6) / 2 = 0.7, y: (0.2 + 0.3) / 2 = 0.25, z: (0.4 + 0.7) / 2 = 0.55.
    Items of two prompts are interleaved; a prompt with a single candidate gets 0.5 (no opponent)."""
    items = [Item("p1", "x"), Item("p2", "y"), Item("p1", "z"), Item("p3", "x"), Item("p1", "y"),
             Item("p2", "x")]
    s = pairwise().score(items)
    # p2 has {y, x}: y wins against x with 0.2, x with 0.8.
    np.testing.assert_allclose(s, [0.7, 0.2, 0.55, 0.5, 0.25, 0.8], atol=1e-12)


def test_a_judge_without_score_or_compare_says_so():
    class Empty(Judge):
        kind = "empty"

    with pytest.raises(NotImplementedError, match="empty"):
        Empty(JudgeOptions(kind="empty")).score([Item("p", "a")])


def test_identity_hash_follows_options():
    """The identity (used as lineage record and cache key) changes with the options and only with them."""
    assert scorer(0.0).identity_hash() == scorer(0.0).identity_hash()
    assert scorer(0.0).identity_hash() != scorer(1.0).identity_hash()


def test_options_reject_unknown_keys():
    with pytest.raises(ValueError, match="tempreature"):
        TableScoreOptions(kind="table_scorer", tempreature=0.1)


def test_a_bare_pairwise_judge_gives_win_probabilities_from_its_own_matrix():
    """SPPO's P-hat from a pairwise judge used without the judgment cache: the annotate stage's win-probability
    columns come from the judge's K x K matrix, not from Bradley-Terry on its mean-win-probability scores (the judge
    says it has no native score). Pairwise form, P-hat = row means with the diagonal's 1/2: x (0.5 + 0.8 + 0.6) / 3
    = 0.6333333, y (0.2 + 0.5 + 0.3) / 3 = 0.3333333, z (0.4 + 0.7 + 0.5) / 3 = 0.5333333. Bradley-Terry on the
    scores (0.7, 0.25, 0.55) would give sigma(0.45) = 0.6106 for P(x > y) instead of 0.8."""
    import pandas as pd

    from pipeline_lib.winprob import win_probability_columns

    judge = pairwise()
    assert judge.native_score is False and scorer().native_score is True
    df = pd.DataFrame({"prompt_id": ["p"] * 3, "prompt": ["p"] * 3, "response": ["x", "y", "z"],
                       "sample_index": [0, 1, 2], "score": judge.score([Item("p", r) for r in "xyz"])})
    cols = win_probability_columns(judge, df, [Item("p", r) for r in "xyz"])
    np.testing.assert_allclose(cols["winprob_pairwise"], [0.6333333, 0.3333333, 0.5333333], atol=1e-7)
    np.testing.assert_allclose(cols["winprob_row_pairwise"][0], [0.5, 0.8, 0.6], atol=1e-12)
