"""The pair stage: preference pairs from judged samples.

Strategies (registry ``STRATEGIES``; what each produces and which losses accept it: ``methods.PAIRINGS``):
- ``best_worst``: per prompt, chosen = the highest score, rejected = the lowest; the first sample wins among equal
  scores (deterministic); a prompt whose best and worst scores differ by no more than ``min_margin`` (a tie at 0)
  gives no pair.
- ``all_pairs``: every ordered pair (i, j) of one prompt's samples with s_i - s_j > min_margin.
- ``iid_pairs``: samples (0, 1), (2, 3), … of each prompt, each pair ordered by the judge (ties within the margin
  dropped; with odd K the last sample is unused). Each pair is two independent draws of the policy, which SAIL's
  score-function term needs (the argmax and argmin of K > 2 samples are not).
- ``sppo_winprob``: SPPO's pair (uclaml/SPPO ``scripts/compute_prob.py`` lines 83-97): chosen = argmax, rejected =
  argmin of the estimated win probability P-hat(y_i > pi); every prompt gives a pair, ties included (all samples
  tied: chosen = rejected = the first sample, whose log-ratio is then regressed to 0), as the code does.
- ``sppo_all``: SPPO's Algorithm 1 regression over all K samples: every sample appears equally often, so the mean of
  the ``sppo`` loss over a prompt's rows is (1/K) sum_k (rho_k - eta(P-hat_k - 1/2))^2: pairs (0, 1), (2, 3), … for
  even K; for odd K the cycle (0, 1), (1, 2), …, (K-1, 0) (each sample twice, 2K sequences instead of K + 1).
- ``unlabelled``: samples (0, 1), (2, 3), … in sample order, no judge: SAIL-PP labels pairs with the policy itself
  (the round skips the annotate stage; ``score`` may be absent).

``pairs.unfinished`` (score-ranked strategies only) decides what a sample cut at ``collect.max_tokens`` counts for:
``keep`` ranks it by its score like any other; ``last`` ranks it below every finished sample of its prompt (so a
finished sample is chosen over a cut one whatever their scores, and cut samples are ordered among themselves by
score); ``drop`` leaves it out. A cut response never ended: the rules judge scores the text it has, which can pass
every instruction of a prompt, so with ``keep`` DPO gets no signal against rambling and looping (in the 3-round
IFEval campaign of 2026-12-04 a third of the chosen samples were cut, about as many as the rejected ones). ``last``
measured in that campaign (docs/efficacy.md, run s3): IFEval answers at the token limit 54% -> 18%, but IFEval
+2.8 points against +4.4 with ``keep``: a finished sample that fails the instructions now beats a cut one that passes.

The SPPO strategies carry ``chosen_winprob``/``rejected_winprob`` (P-hat of each side) and ``pair_winprob``
(P(chosen > rejected), for ``sppo_single``) in the form ``pairs.winprob`` selects (``pipeline_lib/winprob.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from pipeline_lib.artifacts import ArtifactRef, read_table, ref_from_dir, write_table
from pipeline_lib.methods import PAIRINGS, PAIRS
from pipeline_lib.sections import Section
from pipeline_lib.stage import done, output_dir
from pipeline_lib.winprob import COLUMNS as WINPROB_COLUMNS

# Per-sample columns carried into the pair rows as chosen_* / rejected_*, and the per-prompt columns carried as they
# are (not the prompt table's columns, prompts.sources.PROMPT_COLUMNS: prompt_text is the templated prompt).
SIDE_COLUMNS = ["response", "score", "winprob", "behavior_logp_seq", "n_tokens", "sample_index", "response_source"]
PAIR_PROMPT_COLUMNS = ["prompt_id", "prompt", "prompt_text"]
Pick = Callable[[np.ndarray, float], list[tuple[int, int]]]


class PairsConfig(Section):
    strategy: Literal["best_worst", "all_pairs", "iid_pairs", "sppo_winprob", "sppo_all", "unlabelled"] = "best_worst"
    min_margin: float = Field(0.0, ge=0.0, description="drop pairs whose score gap is not above this (ties always)")
    winprob: Literal["authors", "pairwise"] = Field(
        "authors", description="SPPO's P(a > b) from a pairwise judge: authors = LLM-Blender's scores over all K "
                               "samples (uclaml/SPPO); pairwise = the judge's probability of each pair alone")
    unfinished: Literal["keep", "last", "drop"] = Field(
        "keep", description="samples cut at collect.max_tokens (they never ended): keep = ranked by score like the "
                            "rest; last = ranked below every finished sample of the prompt; drop = not paired")

    @model_validator(mode="after")
    def _winprob_applies(self) -> "PairsConfig":
        if self.winprob != "authors" and not PAIRINGS[self.strategy].columns:
            users = ", ".join(name for name, spec in PAIRINGS.items() if spec.columns)
            raise ValueError(f"pairs.winprob={self.winprob} applies to win-probability pairings ({users}), not "
                             f"pairs.strategy={self.strategy}")
        if self.unfinished != "keep" and not PAIRINGS[self.strategy].ranks_by_score:
            users = ", ".join(name for name in PAIRS if PAIRINGS[name].ranks_by_score)
            raise ValueError(f"pairs.unfinished={self.unfinished} applies to pairings that rank samples by the "
                             f"judge's score ({users}), not pairs.strategy={self.strategy}")
        return self


def _best_worst(scores: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    i, j = int(np.argmax(scores)), int(np.argmin(scores))
    return [(i, j)] if scores[i] - scores[j] > min_margin else []


def _all_pairs(scores: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    k = len(scores)
    return [(i, j) for i in range(k) for j in range(k) if scores[i] - scores[j] > min_margin]


def _consecutive(k: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(0, k - 1, 2)]


def _iid_pairs(scores: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    out = []
    for i, j in _consecutive(len(scores)):
        if scores[i] - scores[j] > min_margin:
            out.append((i, j))
        elif scores[j] - scores[i] > min_margin:
            out.append((j, i))
    return out


def _sppo_best_worst(winprob: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    return [(int(np.argmax(winprob)), int(np.argmin(winprob)))]  # compute_prob.py line 85: no prompt dropped


def _sppo_all(winprob: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    k = len(winprob)
    return _consecutive(k) if k % 2 == 0 else [(i, (i + 1) % k) for i in range(k)]


def _unlabelled(values: np.ndarray, min_margin: float) -> list[tuple[int, int]]:
    return _consecutive(len(values))


def _cut(g: pd.DataFrame) -> np.ndarray:
    return (g["finish_reason"] == "length").to_numpy()


def _keep(g: pd.DataFrame, values: np.ndarray, min_margin: float) -> tuple[pd.DataFrame, np.ndarray]:
    return g, values


def _last(g: pd.DataFrame, values: np.ndarray, min_margin: float) -> tuple[pd.DataFrame, np.ndarray]:
    cut = _cut(g)
    if not cut.any() or cut.all():
        return g, values
    # shifted below the lowest finished score by more than the margin: every finished sample outranks every cut one
    offset = float(np.max(values) - np.min(values)) + min_margin + 1.0
    return g, np.where(cut, values - offset, values)


def _drop(g: pd.DataFrame, values: np.ndarray, min_margin: float) -> tuple[pd.DataFrame, np.ndarray]:
    finished = ~_cut(g)
    return g[finished].reset_index(drop=True), values[finished]


# pairs.unfinished: (a prompt's samples, their ranking values) -> the samples and values the strategy picks from
UNFINISHED: dict[str, Callable[[pd.DataFrame, np.ndarray, float], tuple[pd.DataFrame, np.ndarray]]] = {
    "keep": _keep, "last": _last, "drop": _drop}

STRATEGIES: dict[str, Pick] = {
    "best_worst": _best_worst,
    "all_pairs": _all_pairs,
    "iid_pairs": _iid_pairs,
    "sppo_winprob": _sppo_best_worst,
    "sppo_all": _sppo_all,
    "unlabelled": _unlabelled,
}
# Which per-sample column orders the samples for each strategy (None: sample order only; "winprob": the P-hat
# column of the configured form).
KEY_COLUMN = {"best_worst": "score", "all_pairs": "score", "iid_pairs": "score", "sppo_winprob": "winprob",
              "sppo_all": "winprob", "unlabelled": None}


def build_pairs(judged: pd.DataFrame, strategy: str, min_margin: float = 0.0,
                winprob: str = "authors", unfinished: str = "keep") -> tuple[pd.DataFrame, dict]:
    """Pure function behind the stage: returns (pairs, counts)."""
    pick, rank = STRATEGIES[strategy], UNFINISHED[unfinished]
    key = KEY_COLUMN[strategy]
    if unfinished != "keep" and "finish_reason" not in judged.columns:
        raise ValueError(f"pairs.unfinished={unfinished} needs the judged table's 'finish_reason' column (how each "
                         "sample ended, written by the collect stage); this table lacks it")
    uses_winprob = key == "winprob"
    if uses_winprob:  # the configured form's columns, under the names the pairs table and the losses use
        mean_col, row_col = WINPROB_COLUMNS[winprob]
        if not {mean_col, row_col} <= set(judged.columns):
            raise ValueError(f"pairs.strategy={strategy} needs the judged table's {mean_col!r} and {row_col!r} "
                             "columns (win probabilities from the annotate stage); this table lacks them")
        judged = judged.drop(columns=[c for c in ("winprob", "winprob_row") if c not in (mean_col, row_col)],
                             errors="ignore")
        judged = judged.rename(columns={mean_col: "winprob", row_col: "winprob_row"})
    rows, n_tied = [], 0
    for _, g in judged.groupby("prompt_id", sort=False):
        g = g.sort_values("sample_index").reset_index(drop=True)
        values = g[key].to_numpy(dtype=float) if key else np.zeros(len(g))
        g, values = rank(g, values, min_margin)
        idx = pick(values, min_margin) if len(values) else []
        n_tied += not idx
        for i, j in idx:
            row = {c: g.at[0, c] for c in PAIR_PROMPT_COLUMNS if c in g.columns}
            for side, k in (("chosen", i), ("rejected", j)):
                row.update({f"{side}_{c}": g.at[k, c] for c in SIDE_COLUMNS if c in g.columns})
            if uses_winprob:
                row["pair_winprob"] = float(g.at[i, "winprob_row"][j])  # P(chosen > rejected)
            rows.append(row)
    pairs = pd.DataFrame(rows)
    if len(pairs):
        pairs = pairs.rename(columns={"chosen_response": "chosen", "rejected_response": "rejected"})
    n_prompts = judged["prompt_id"].nunique()
    scored = len(pairs) and "chosen_score" in pairs.columns
    counts = {"n_prompts": n_prompts, "n_pairs": len(pairs), "n_prompts_tied": n_tied,
              "mean_score_gap": float((pairs["chosen_score"] - pairs["rejected_score"]).mean()) if scored else 0.0}
    if unfinished != "keep":
        counts["n_samples_unfinished"] = int((judged["finish_reason"] == "length").sum())
    return pairs, counts


def run(judgments: ArtifactRef, cfg: PairsConfig, work_dir: str | Path) -> ArtifactRef:
    """The pairs table of ``judgments`` under ``cfg.strategy``; raises ValueError when no prompt gives a pair."""
    config = cfg.model_dump()
    inputs = {"judgments": judgments.sha256}
    out = output_dir(work_dir, "pair", inputs, config)
    if done(out):
        return ref_from_dir(out)
    pairs, counts = build_pairs(read_table(judgments), cfg.strategy, cfg.min_margin, cfg.winprob, cfg.unfinished)
    if counts["n_pairs"] == 0:
        raise ValueError(f"no preference pairs: all {counts['n_prompts']} prompts had tied scores "
                         f"(margin > {cfg.min_margin} required); sample more (collect.k) or use another judge")
    return write_table(pairs, out, name="pairs", producer="pair", inputs=inputs, config=config,
                       extra={"metrics": counts})
