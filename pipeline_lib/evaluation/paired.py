"""Paired statistics for a before/after comparison of two models on the same prompts.

A difference of two pass rates measured on the same 100 prompts is noisy (one standard error near ±0.05 at a pass
rate of 0.3), and the two measurements are correlated: most prompts pass or fail for both models. Pairing by prompt
removes the between-prompt variance, so:

- :func:`paired_bootstrap`: the difference ``after - before`` of a ratio metric ``sum(num) / sum(den)`` over
  prompts, with a percentile confidence interval from resampling *prompts* (the same resampled prompts for both
  models; Efron & Tibshirani 1993, ch. 13). With ``den`` = 1 per prompt the metric is a mean (prompt-level pass rate,
  mean score); with ``den`` = the prompt's instruction count and ``num`` = the instructions followed it is IFEval's
  instruction-level accuracy, resampled as whole prompts because a prompt's instructions are not independent.
- :func:`mcnemar_exact`: McNemar's test for a binary per-prompt outcome, exact form: under H0 (no difference) each
  discordant prompt (passed by one model only) is gained or lost with probability 1/2, so the number gained among
  the ``n`` discordant ones is Binomial(n, 1/2); the two-sided p-value is ``min(1, 2 * P(X <= min(gained, lost)))``.

Both are pure functions of arrays; :func:`compare` puts them together for one metric.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedResult:
    """``after - before`` of one metric on the same prompts."""

    metric: str
    n: int  # prompts
    before: float
    after: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    n_gained: int | None = None  # binary metrics: prompts passed after but not before
    n_lost: int | None = None  # ... passed before but not after
    p_value: float | None = None  # exact McNemar (binary metrics only)

    def as_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def describe(self) -> str:
        """``+0.033 [+0.004, +0.067] (45 gained, 27 lost; McNemar p = 0.045)``."""
        s = f"{self.delta:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"
        if self.p_value is not None:
            s += f" ({self.n_gained} gained, {self.n_lost} lost; McNemar p = {self.p_value:.3g})"
        return s


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    d = den.sum()
    return float(num.sum() / d) if d > 0 else float("nan")


def paired_bootstrap(before: np.ndarray, after: np.ndarray, den: np.ndarray | None = None,
                     n_resamples: int = N_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(delta, ci_low, ci_high) of ``sum(after)/sum(den) - sum(before)/sum(den)`` over prompts, the interval being
    the percentile interval of the same statistic over ``n_resamples`` resamples of the prompts with replacement
    (seeded: the same inputs give the same interval)."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"before and after must be 1-d arrays of the same length, got {before.shape} and "
                         f"{after.shape}")
    n = len(before)
    if n == 0:
        raise ValueError("no prompts to compare")
    den = np.ones(n) if den is None else np.asarray(den, dtype=float)
    if den.shape != before.shape:
        raise ValueError(f"den has shape {den.shape}, expected {before.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    delta = _ratio(after, den) - _ratio(before, den)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    d = den[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diffs = (after[idx].sum(axis=1) - before[idx].sum(axis=1)) / d
    diffs = diffs[np.isfinite(diffs)]
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha]) if len(diffs) else (float("nan"), float("nan"))
    return float(delta), float(lo), float(hi)


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> tuple[int, int, float]:
    """(gained, lost, two-sided exact p) for binary outcomes of the same prompts before and after."""
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if b.shape != a.shape:
        raise ValueError(f"before and after differ in shape: {b.shape} vs {a.shape}")
    gained, lost = int((a & ~b).sum()), int((b & ~a).sum())
    n = gained + lost
    if n == 0:
        return 0, 0, 1.0
    tail = sum(comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n  # exact integers, then one division
    return gained, lost, min(1.0, 2 * tail)


def compare(metric: str, before: np.ndarray, after: np.ndarray, den: np.ndarray | None = None, *,
            binary: bool = False, n_resamples: int = N_RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> PairedResult:
    """The paired comparison of one metric: point estimates, bootstrap CI of the difference, and for a binary
    per-prompt outcome (``binary``: 0/1 values with ``den`` = 1) the exact McNemar test."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    delta, lo, hi = paired_bootstrap(before, after, den, n_resamples, seed, confidence)
    den_ = np.ones(len(before)) if den is None else np.asarray(den, dtype=float)
    extra = {}
    if binary:
        if den is not None or not np.isin(before, (0, 1)).all() or not np.isin(after, (0, 1)).all():
            raise ValueError(f"{metric}: a binary comparison needs 0/1 outcomes per prompt")
        g, l_, p = mcnemar_exact(before, after)
        extra = {"n_gained": g, "n_lost": l_, "p_value": p}
    return PairedResult(metric=metric, n=len(before), before=_ratio(before, den_), after=_ratio(after, den_),
                        delta=delta, ci_low=lo, ci_high=hi, confidence=confidence, n_resamples=n_resamples, **extra)
