"""Paired statistics (pipeline_lib.evaluation.paired): exact McNemar p-values worked by hand, bootstrap intervals
bounded analytically, and the invariances a paired difference must have."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_lib.evaluation.paired import compare, mcnemar_exact, paired_bootstrap


def _outcomes(both: int, gained: int, lost: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    before = [1] * both + [0] * gained + [1] * lost + [0] * neither
    after = [1] * both + [1] * gained + [0] * lost + [0] * neither
    return np.array(before), np.array(after)


@pytest.mark.parametrize("gained, lost, p", [
    # 8 discordant prompts, 7 gained: P(X <= 1) = (C(8,0) + C(8,1)) / 2^8 = 9/256; two-sided: 18/256
    (7, 1, 18 / 256),
    (1, 7, 18 / 256),  # symmetric in gained and lost
    # 5 discordant, all gained: P(X <= 0) = 1/32; two-sided 2/32
    (5, 0, 2 / 32),
    # 3 and 3: 2 * (1 + 6 + 15 + 20) / 64 = 84/64 > 1, capped at 1
    (3, 3, 1.0),
    # 10 discordant, 9 gained: 2 * (1 + 10) / 1024 = 22/1024
    (9, 1, 22 / 1024),
    (0, 0, 1.0),  # no discordant prompt: no evidence either way
])
def test_mcnemar_exact_by_hand(gained, lost, p):
    before, after = _outcomes(both=4, gained=gained, lost=lost, neither=3)
    g, l_, pv = mcnemar_exact(before, after)
    assert (g, l_) == (gained, lost)
    assert pv == pytest.approx(p, abs=1e-15)


def test_concordant_prompts_do_not_change_mcnemar():
    """Only the discordant prompts carry information: 100 more prompts that both models pass change nothing."""
    assert mcnemar_exact(*_outcomes(0, 7, 1, 0)) == mcnemar_exact(*_outcomes(100, 7, 1, 50))


def test_constant_difference_has_a_degenerate_interval():
    """Every prompt's score rises by exactly 0.25: every resample's difference is 0.25."""
    before = np.linspace(0, 0.5, 37)
    delta, lo, hi = paired_bootstrap(before, before + 0.25)
    assert delta == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_identical_models_give_zero_and_p_one():
    before, _ = _outcomes(10, 0, 0, 20)
    r = compare("pass", before, before, binary=True)
    assert (r.delta, r.ci_low, r.ci_high, r.p_value, r.n_gained, r.n_lost) == (0, 0, 0, 1.0, 0, 0)
    assert not r.excludes_zero()


def test_interval_within_the_hoeffding_bound_and_near_the_normal_width():
    """400 prompts: 60 gained, 20 lost. Per prompt d in {-1, 0, 1}, mean 0.1. The bootstrap draws i.i.d. prompts from
    this empirical distribution, so Hoeffding bounds its tails: P(mean* - 0.1 <= -t) <= exp(-2 n t^2 / 2^2), which is
    0.025 at t = sqrt(2 ln 40 / n) = 0.1358: the 95% percentile interval must lie inside 0.1 ± 0.1358. The central
    limit theorem gives its width: var(d) = (60 + 20)/400 - 0.1^2 = 0.19, so half-width 1.96 * sqrt(0.19/400) =
    0.0427 (bootstrap with 2,000 resamples: within 10%)."""
    before, after = _outcomes(both=100, gained=60, lost=20, neither=220)
    delta, lo, hi = paired_bootstrap(before, after, n_resamples=2000, seed=0)
    assert delta == pytest.approx(0.1)
    t = math.sqrt(2 * math.log(40) / 400)
    assert 0.1 - t <= lo < delta < hi <= 0.1 + t
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.19 / 400), rel=0.10)


def test_swapping_models_negates_the_result():
    before, after = _outcomes(30, 12, 5, 53)
    r, s = compare("pass", before, after, binary=True), compare("pass", after, before, binary=True)
    assert s.delta == pytest.approx(-r.delta)
    assert (s.ci_low, s.ci_high) == pytest.approx((-r.ci_high, -r.ci_low))
    assert s.p_value == r.p_value and (s.n_gained, s.n_lost) == (r.n_lost, r.n_gained)


def test_seeded_and_order_of_prompts_irrelevant_to_the_estimate():
    before, after = _outcomes(30, 12, 5, 53)
    assert paired_bootstrap(before, after, seed=3) == paired_bootstrap(before, after, seed=3)
    perm = np.random.default_rng(1).permutation(len(before))
    assert paired_bootstrap(before[perm], after[perm])[0] == pytest.approx(paired_bootstrap(before, after)[0])


def test_ratio_metric_resamples_whole_prompts():
    """Instruction-level accuracy: prompt 1 has 1 instruction, prompt 2 has 3. Before: 0 + 1 of 4 followed = 0.25;
    after: 1 + 3 of 4 = 1.0. A resample of two copies of prompt 1 gives 1/1 - 0/1 = 1; of prompt 2, 3/3 - 1/3 = 2/3;
    one of each, 0.75: every resampled difference lies in [2/3, 1]."""
    r = compare("inst", np.array([0, 1]), np.array([1, 3]), den=np.array([1, 3]))
    assert (r.before, r.after, r.delta) == pytest.approx((0.25, 1.0, 0.75))
    assert 2 / 3 - 1e-12 <= r.ci_low <= r.ci_high <= 1 + 1e-12


def test_significant_gain_is_reported_as_such():
    before, after = _outcomes(100, 60, 20, 220)
    r = compare("pass_rate_strict", before, after, binary=True)
    assert r.excludes_zero() and r.ci_low > 0
    assert r.p_value < 1e-4  # 60 vs 20 of 80: far in the binomial tail
    assert r.describe().startswith("+0.100 [+0.0") and "(60 gained, 20 lost; McNemar p = " in r.describe()


@pytest.mark.parametrize("before, after, den, binary, match", [
    ([1, 0], [1], None, False, "same length"),
    ([], [], None, False, "no prompts"),
    ([0.5, 1], [1, 0], None, True, "binary comparison needs 0/1"),
    ([1, 0], [1, 1], [1, 2], True, "binary comparison needs 0/1"),
])
def test_bad_input_is_refused(before, after, den, binary, match):
    with pytest.raises(ValueError, match=match):
        compare("m", np.array(before), np.array(after), None if den is None else np.array(den), binary=binary)
