"""SPPO's win-probabilities: from a judge's verdicts on the K samples of a prompt to P̂(y_i ≻ π_t | x).

    P̂(y_i ≻ π_t | x) = (1/K) Σ_j P(y_i ≻ y_j),   P(y_i ≻ y_i) = ½

(SPPO, Wu et al. 2024, §3; uclaml/SPPO ``scripts/compute_prob.py``: the row sum of the K×K matrix over K, diagonal
included, lines 84 and 96). The pair probability P(y_i ≻ y_j) comes in two forms (``pairs.winprob``):

- ``authors`` (default): as the SPPO pipeline computes it. Each sample gets a score s and P(i ≻ j) = σ(s_i − s_j)
  (``compute_prob.py`` line 45). With a pointwise judge (reward model, rules) s is its score. With a pairwise judge
  (PairRM, a pairwise LLM judge) s is LLM-Blender's ``get_scores_from_cmps`` ("max_logits" policy,
  ``llm_blender/gpt_eval/utils.py`` lines 26-43), what ``scripts/rank.py`` stores:
      s_i = (1/K) Σ_j (L_ij − L_ji),   L_ii = 0 (``pair_ranker/ranker.py`` ``_full_predict``),
  L_ij being the ranker's logit that the response in the first slot (i) beats the second (j). Our PairRM judge
  gives each pair P_ij = σ((L_ij − L_ji)/2) (``judges/pairrm.py``), so L_ij − L_ji = 2·logit(P_ij) and
      s_i = (2/K) Σ_j logit(P_ij)
  recovers the authors' scores exactly from the cached pair probabilities. Other pairwise judges are read the same
  way: logit(P_ij) as half of a two-order logit difference.
- ``pairwise``: P(i ≻ j) = the judge's probability of the pair alone (σ((L_ij − L_ji)/2) for PairRM), which is
  what alignflow used before. With a pointwise judge both forms are σ(s_i − s_j).

Why the authors' form is the default: if the ranker's logits are L_ij ≈ r_i − r_j, the authors' s_i − s_j =
2(r_i − r_j), so their P is σ(2Δr) where the pairwise form gives σ(Δr). Simulated (K = 5, L_ij = r_i − r_j,
r ~ N(0, sd²), 20,000 prompts): Σ|P̂ − ½| of the pairwise form is 0.50× the authors' for near-ties (sd 0.01),
0.59× at sd 0.5, 0.71× at sd 1, 0.85× at sd 2. SPPO regresses log-ratios on η(P̂ − ½), so the pairwise form's
targets are up to halved, as if β were doubled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from pipeline_lib.judges.base import Item

FORMS = ("authors", "pairwise")
# Columns the annotate stage adds. winprob*: P̂ per sample; winprob_row*: that sample's row of the K×K matrix,
# P(i ≻ j) for the samples j of its prompt in sample_index order (the pair stage reads P(chosen ≻ rejected) from it).
COLUMNS = {"authors": ("winprob", "winprob_row"), "pairwise": ("winprob_pairwise", "winprob_row_pairwise")}
_EPS = 1e-12  # P clipped to [ε, 1 − ε] before the logit: |logit| ≤ 27.6, where σ in float64 is 1 − 1e-12


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def bradley_terry(scores: np.ndarray) -> np.ndarray:
    """P(i ≻ j) = σ(s_i − s_j) for a vector of scores (``compute_prob.py`` line 45)."""
    s = np.asarray(scores, dtype=float)
    return _sigmoid(s[:, None] - s[None, :])


def blender_scores(pair_probs: np.ndarray) -> np.ndarray:
    """LLM-Blender's per-candidate scores s_i = (1/K) Σ_j (L_ij − L_ji) from pair probabilities
    P_ij = σ((L_ij − L_ji)/2): s_i = (2/K) Σ_j logit(P_ij) (diagonal P = ½, logit 0)."""
    p = np.clip(np.asarray(pair_probs, dtype=float), _EPS, 1.0 - _EPS)
    logit = np.log(p) - np.log1p(-p)
    return 2.0 * logit.sum(axis=1) / p.shape[0]


def authors_matrix(pair_probs: np.ndarray, pointwise: bool) -> np.ndarray:
    """The SPPO pipeline's P(i ≻ j): unchanged for a pointwise judge (already σ(s_i − s_j)), else σ(s_i − s_j) on
    the LLM-Blender scores of the pairwise judge's matrix."""
    return np.asarray(pair_probs, dtype=float) if pointwise else bradley_terry(blender_scores(pair_probs))


def pair_matrix(judge, scores: np.ndarray, items: Sequence[Item], pointwise: bool) -> np.ndarray:
    """The judge's own K×K matrix P(i ≻ j) for one prompt's samples: Bradley-Terry on the scores already computed
    (pointwise judge), else the judge's ``rank`` (pairwise judge; its verdicts are cached)."""
    if pointwise:
        return bradley_terry(scores)
    return np.asarray(judge.rank(items[0].prompt, [it.response for it in items], items[0].meta), dtype=float)


def win_probability_columns(judge, df: pd.DataFrame, items: Sequence[Item]) -> dict[str, list]:
    """The annotate stage's SPPO columns (``COLUMNS``) for a judged table with ``prompt_id``, ``sample_index`` and
    ``score``; ``items[r]`` is row r's judge item. Rows of a prompt are matrix rows in ``sample_index`` order."""
    pointwise = getattr(judge, "native_score", True)
    out: dict[str, list] = {c: [None] * len(df) for cols in COLUMNS.values() for c in cols}
    order = df["sample_index"].to_numpy() if "sample_index" in df.columns else np.arange(len(df))
    scores = df["score"].to_numpy(dtype=float)
    for _, idx in df.groupby("prompt_id", sort=False).indices.items():
        idx = idx[np.argsort(order[idx], kind="stable")]
        m = pair_matrix(judge, scores[idx], [items[i] for i in idx], pointwise)
        for form, matrix in (("pairwise", m), ("authors", authors_matrix(m, pointwise))):
            mean_col, row_col = COLUMNS[form]
            for pos, r in enumerate(idx):
                out[mean_col][r] = float(matrix[pos].mean())
                out[row_col][r] = [float(v) for v in matrix[pos]]
    return out


def win_probabilities(judge, df: pd.DataFrame, items: Sequence[Item], form: str = "authors") -> np.ndarray:
    """P̂(y_i ≻ π_t | x) per row, in the given form (see the module docstring)."""
    return np.asarray(win_probability_columns(judge, df, items)[COLUMNS[form][0]], dtype=float)
