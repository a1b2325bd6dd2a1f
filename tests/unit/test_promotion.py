"""pipeline_lib.promotion.decide_promotion: the candidate replaces the champion only if it beats it by more than the
margin."""

from __future__ import annotations

import pytest

from pipeline_lib.promotion import PromotionConfig, decide_promotion

NAN = float("nan")


def _m(pass_rate: float, mean_score: float = 0.0) -> dict:
    return {"pass_rate_strict": pass_rate, "instruction_pass_rate": 0.0, "mean_score": mean_score,
            "mean_tokens": 10.0}


@pytest.mark.parametrize("candidate, promoted", [
    (0.46, True),   # 0.46 > 0.40 + 0.05 = 0.45
    (0.45, False),  # 0.45 is not above 0.45 (and 0.40 + 0.05 rounds to 0.45000000000000007 in floats)
    (0.44, False),  # better than the champion, but not by the margin
    (0.30, False),  # worse
])
def test_margin(candidate, promoted):
    ok, reason = decide_promotion(PromotionConfig(margin=0.05), _m(0.40), _m(candidate))
    assert ok is promoted
    assert reason.startswith("promoted: pass_rate_strict 0.460 > champion 0.400 + margin 0.05" if promoted
                             else "champion kept: pass_rate_strict")


def test_equal_metrics_keep_the_champion():
    """Zero margin, a tie: 0.5 > 0.5 + 0 is false, so the incumbent stays (no churn on noise-free ties)."""
    ok, reason = decide_promotion(PromotionConfig(margin=0.0), _m(0.5), _m(0.5))
    assert not ok and reason == "champion kept: pass_rate_strict 0.500 <= champion 0.500 + margin 0.0"


def test_any_improvement_promotes_at_zero_margin():
    assert decide_promotion(PromotionConfig(), _m(0.5), _m(0.5 + 1e-9))[0]


def test_the_configured_metric_decides():
    """Candidate: worse pass rate (0.2 vs 0.6), better judge score (0.9 vs 0.1)."""
    champion, candidate = _m(0.6, mean_score=0.1), _m(0.2, mean_score=0.9)
    assert decide_promotion(PromotionConfig(metric="mean_score"), champion, candidate) == (
        True, "promoted: mean_score 0.900 > champion 0.100 + margin 0.0")
    assert not decide_promotion(PromotionConfig(metric="pass_rate_strict"), champion, candidate)[0]


def test_disabled_never_promotes():
    assert decide_promotion(PromotionConfig(enabled=False), _m(0.0), _m(1.0)) == (False, "promotion disabled")


@pytest.mark.parametrize("champion, candidate", [(0.5, NAN), (NAN, 0.5), (NAN, NAN)])
def test_not_evaluated_keeps_the_champion(champion, candidate):
    """evaluate.enabled=false reports NaN metrics; NaN compares false both ways, so the rule must say so itself."""
    assert decide_promotion(PromotionConfig(), _m(champion), _m(candidate)) == (
        False, "champion kept: candidate not evaluated")


def test_negative_margin_is_rejected_at_load():
    from pipeline_lib.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="promotion.margin"):
        load_config(None, ["promotion.margin=-0.1"])


def _p(delta: float, lo: float, hi: float) -> dict:
    return {"metric": "pass_rate_strict", "n": 100, "before": 0.4, "after": 0.4 + delta, "delta": delta,
            "ci_low": lo, "ci_high": hi, "confidence": 0.95, "n_resamples": 2000}


@pytest.mark.parametrize("lo, margin, promoted", [
    (0.01, 0.0, True),     # the whole interval above 0
    (-0.01, 0.0, False),   # a gain of +0.08 whose interval still reaches below 0: noise cannot be ruled out
    (0.03, 0.02, True),    # lower bound above the margin
    (0.02, 0.02, False),   # at the margin is not above it
])
def test_significant_rule_promotes_only_when_the_lower_bound_clears_the_margin(lo, margin, promoted):
    ok, reason = decide_promotion(PromotionConfig(rule="significant", margin=margin), _m(0.40), _m(0.48),
                                  {"pass_rate_strict": _p(0.08, lo, 0.15)})
    assert ok is promoted
    assert f"pass_rate_strict +0.080, 95% CI [{lo:+.3f}, +0.150]" in reason
    assert reason.startswith("promoted:" if promoted else "champion kept:")


def test_significant_rule_keeps_the_champion_a_margin_rule_would_replace():
    """Same numbers, two rules: +0.08 beats margin 0, but its interval [-0.01, +0.15] does not exclude 0."""
    paired = {"pass_rate_strict": _p(0.08, -0.01, 0.15)}
    assert decide_promotion(PromotionConfig(rule="margin"), _m(0.40), _m(0.48), paired)[0]
    assert not decide_promotion(PromotionConfig(rule="significant"), _m(0.40), _m(0.48), paired)[0]


def test_significant_rule_without_a_paired_comparison_keeps_the_champion():
    assert decide_promotion(PromotionConfig(rule="significant"), _m(0.4), _m(0.9), {}) == (
        False, "champion kept: no paired comparison of pass_rate_strict")


def test_ifeval_metric_needs_ifeval_enabled():
    """With IFEval enabled the config loads, and its promotion section decides on the IFEval metric: by hand,
    0.196 -> 0.253 with the 95% interval [+0.024, +0.091] (lower bound above margin 0) promotes; the held-out pass
    rate, which got worse, is not read."""
    from pipeline_lib.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="promotion.metric=ifeval.prompt_level_strict needs evaluate.ifeval"):
        load_config(None, ["promotion.metric=ifeval.prompt_level_strict"])
    cfg = load_config(None, ["promotion.metric=ifeval.prompt_level_strict", "evaluate.ifeval.enabled=true",
                             "promotion.rule=significant"])
    metric = "ifeval.prompt_level_strict"
    paired = {metric: {"delta": 0.057, "ci_low": 0.024, "ci_high": 0.091, "confidence": 0.95}}
    assert decide_promotion(cfg.promotion, {**_m(0.6), metric: 0.196}, {**_m(0.2), metric: 0.253}, paired) == (
        True, "promoted: ifeval.prompt_level_strict +0.057, 95% CI [+0.024, +0.091], lower bound > margin 0.0")
