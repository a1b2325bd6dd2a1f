"""AlpacaEval 2 metrics from a judge's annotations against the reference outputs (gpt4_1106_preview).

An annotation row is one instruction: ``index`` (0-804, the instruction's position in the eval set), ``preference``
on AlpacaEval's 1-2 scale (1: the reference wins, 2: the model wins, fractional: the weighted judge's probability,
1.5 or the legacy 0: a draw, empty: no verdict) and the two outputs' lengths in characters (``len_1`` reference,
``len_2`` model) or the outputs themselves (``output_1``, ``output_2``).

Metrics follow ``alpaca_eval.metrics`` (``winrate.get_winrate``, ``helpers.AbsoluteScoringRule`` /
``ZeroOneScoringRule``, ``glm_winrate.get_length_controlled_winrate``) and ``alpaca_eval.main.evaluate``:

- ``win_rate``: 100 * mean(preference - 1) over rows with a verdict; ``standard_error``: 100 * its standard error
  (ddof 1); ``n_total``: rows with a verdict.
- ``n_wins`` / ``n_wins_base``: rows with preference - 1 above / below 0.5; ``n_draws``: rows at exactly 1.5 (or 0),
  counted in neither.
- ``discrete_win_rate``: the same mean after rounding each preference to 1 or 2, draws (exactly 1.5) kept at 0.5.
- ``avg_length``: int(mean length of the model's outputs), over all rows of the file (the reference averages all
  model outputs; files missing rows therefore differ slightly, see docs/alpaca_eval_reproduction.md).
- ``length_controlled_winrate`` / ``lc_standard_error``: see :mod:`pipeline_lib.evaluation.lc_glm`.

Departures: a preference outside [1, 2] (other than the legacy 0) is an error naming the row (the reference logs and
drops it), and so is an ``index`` repeated within a file or missing from the instruction-difficulty table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_lib.evaluation import lc_glm
from pipeline_lib.evaluation.data import eval_data_dir, read_table

HUB_REPO = "tatsu-lab/alpaca_eval"
EVAL_SET_FILE = "alpaca_eval_gpt4_baseline.json"  # the 805 instructions with gpt4_1106_preview's outputs
DIFFICULTY_FILE = "instruction_difficulty.csv"
REG_LAMBDA = 0.2  # length_controlled_v1's regularize_to_baseline_lambda
WINRATE_KEYS = ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate",
                "avg_length"]


# -- data -----------------------------------------------------------------------------------------------------------
def load_eval_set(path: str | Path | None = None, subset: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The AlpacaEval 2 instructions with the reference outputs: ``index``, ``instruction``, ``dataset``, ``output``,
    ``generator``. From the hub without ``path`` (``tatsu-lab/alpaca_eval``, config ``alpaca_eval_gpt4_baseline``),
    else from a local JSON/JSONL/CSV file. ``subset``: a seeded random sample of that many instructions, in index
    order (for quick runs; AlpacaEval's own ``max_instances`` also samples before truncating)."""
    if path is None:
        from datasets import load_dataset

        # The hub config is defined by a loading script that datasets >= 4 no longer runs; the JSON file that
        # script reads is the config's data, so load it directly.
        df = load_dataset("json", data_files=f"hf://datasets/{HUB_REPO}/{EVAL_SET_FILE}", split="train").to_pandas()
        where = f"hf://datasets/{HUB_REPO}/{EVAL_SET_FILE}"
    else:
        df, where = read_table(path), str(path)
    missing = [c for c in ("instruction", "output") if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    if "index" not in df.columns:  # the reference identifies an instruction by its row position
        df.insert(0, "index", np.arange(len(df)))
    if subset is not None:
        if not 1 <= subset <= len(df):
            raise ValueError(f"subset={subset}: must be between 1 and the {len(df)} instructions of {where}")
        pick = np.sort(np.random.default_rng(seed).choice(len(df), size=subset, replace=False))
        df = df.iloc[pick]
    return df.reset_index(drop=True)


def load_instruction_difficulty(path: str | Path | None = None) -> pd.Series:
    """Per-instruction difficulty gamma (float Series indexed by the instruction ``index``). From the hub file
    ``instruction_difficulty.csv`` without ``path``, else a CSV with ``index`` and ``instruction_difficulty`` columns
    (or two columns, index first, as the reference reads it with ``index_col=0``)."""
    if path is None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=HUB_REPO, filename=DIFFICULTY_FILE, repo_type="dataset")
    df = read_table(path)
    if "instruction_difficulty" in df.columns:
        values = df["instruction_difficulty"]
        keys = df["index"] if "index" in df.columns else df.iloc[:, 0]
    elif df.shape[1] == 2:
        keys, values = df.iloc[:, 0], df.iloc[:, 1]
    else:
        raise ValueError(f"{path}: expected columns 'index' and 'instruction_difficulty', got {list(df.columns)}")
    keys, values = pd.to_numeric(keys, errors="coerce"), pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero(~np.isfinite(keys.to_numpy(float)) | ~np.isfinite(values.to_numpy(float)))
    if bad.size:
        raise ValueError(f"{path}: data row {bad[0] + 1}: index and instruction_difficulty must be finite numbers")
    out = pd.Series(values.to_numpy(float), index=keys.to_numpy(int), name="instruction_difficulty")
    if out.index.has_duplicates:
        raise ValueError(f"{path}: index {out.index[out.index.duplicated()][0]} appears more than once")
    return out


def _preferences(df: pd.DataFrame, where: str) -> pd.Series:
    """The preference column as floats in [1, 2] or NaN (no verdict), the legacy draw 0 mapped to 1.5."""
    if "preference" not in df.columns:
        raise ValueError(f"{where}: missing column 'preference'")
    raw = df["preference"]
    pref = pd.to_numeric(raw, errors="coerce").astype(float).replace({0.0: 1.5})
    bad = np.flatnonzero((pref.isna() & raw.notna() & (raw.astype(str).str.strip() != "")).to_numpy()
                         | ((pref < 1) | (pref > 2)).to_numpy())
    if bad.size:
        raise ValueError(f"{where}: column 'preference' data row {bad[0] + 1}: {raw.tolist()[bad[0]]!r} is not a "
                         "preference (1 = reference wins, 2 = model wins, 1.5 = draw, empty = no verdict)")
    return pref.reset_index(drop=True)


def _lengths(df: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(reference, model) output lengths in characters, from len_1/len_2 or output_1/output_2."""
    out = []
    for k in ("1", "2"):
        if f"len_{k}" in df.columns:
            col = pd.to_numeric(df[f"len_{k}"], errors="coerce")
            name = f"len_{k}"
        elif f"output_{k}" in df.columns:
            col, name = df[f"output_{k}"].fillna("").astype(str).str.len(), f"output_{k}"
        else:
            raise ValueError(f"{where}: needs column len_{k} or output_{k} (the {('reference', 'model')[int(k) - 1]} "
                             "output or its length in characters)")
        bad = np.flatnonzero(~np.isfinite(col.to_numpy(float)) | (col.to_numpy(float) < 0))
        if bad.size:
            raise ValueError(f"{where}: column {name!r} data row {bad[0] + 1}: not a length")
        out.append(col.to_numpy(float))
    return out[0], out[1]


def _indices(df: pd.DataFrame, where: str, difficulty: pd.Series) -> np.ndarray:
    if "index" not in df.columns:
        raise ValueError(f"{where}: missing column 'index' (the instruction's position among AlpacaEval's 805; "
                         "alpaca_eval's annotations.json rows are in that order)")
    idx = pd.to_numeric(df["index"], errors="coerce")
    bad = np.flatnonzero(idx.isna().to_numpy() | (idx != idx.round()).to_numpy())
    if bad.size:
        raise ValueError(f"{where}: column 'index' data row {bad[0] + 1}: {df['index'].tolist()[bad[0]]!r} is not an "
                         "integer")
    idx = idx.to_numpy(int)
    dup = pd.Index(idx)[pd.Index(idx).duplicated()]
    if len(dup):
        raise ValueError(f"{where}: index {dup[0]} appears more than once (one annotation per instruction)")
    unknown = np.setdiff1d(idx, difficulty.index.to_numpy())
    if unknown.size:
        raise ValueError(f"{where}: index {', '.join(map(str, unknown[:5]))} not in the instruction-difficulty table")
    return idx


# -- metrics --------------------------------------------------------------------------------------------------------
def winrate_metrics(df: pd.DataFrame, where: str = "annotations") -> dict[str, Any]:
    """The leaderboard's head-to-head metrics (module docstring) for one model's annotations."""
    pref = _preferences(df, where)
    _, len_model = _lengths(df, where)
    valid = pref.dropna() - 1.0  # in [0, 1]: the model's share of the win
    n_draws = int((pref == 1.5).sum())
    discrete = np.where(valid == 0.5, 0.5, np.round(valid))  # each verdict to loss / draw / win
    return {
        "win_rate": float(valid.mean() * 100) if len(valid) else float("nan"),
        "standard_error": float(valid.sem() * 100) if len(valid) > 1 else float("nan"),
        "n_wins": int((valid > 0.5).sum()),
        "n_wins_base": int((valid < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": int(len(valid)),
        "discrete_win_rate": float(discrete.mean() * 100) if len(valid) else float("nan"),
        "avg_length": int(len_model.mean()) if len(len_model) else 0,
    }


def length_controlled_winrate(annotations: pd.DataFrame, instruction_difficulty: pd.Series,
                              regularization_rows: pd.DataFrame | None = None,
                              regularization_lambda: float = REG_LAMBDA, where: str = "annotations") -> dict[str, Any]:
    """Length-controlled win rate by a GLM fitted on this model's annotations (:mod:`lc_glm`).

    Rows without a verdict are left out of the fit but, as in the reference, predicted: the LC win rate averages the
    length-free prediction over every row of the file. ``regularization_rows``: optional annotations of other
    ("gamed") models against the same reference, columns ``model``, ``index``, ``preference``, ``len_1``, ``len_2``,
    added with total weight ``regularization_lambda`` split equally among their models and model term 0.
    Returns ``length_controlled_winrate``, ``lc_standard_error`` (100 * SEM of the per-row predictions, as the
    reference) and ``glm`` (the fitted coefficients)."""
    pref = _preferences(annotations, where)
    idx = _indices(annotations, where, instruction_difficulty)
    length_x = lc_glm.length_feature(*_lengths(annotations, where))
    gamma = instruction_difficulty.loc[idx].to_numpy(float)
    has = pref.notna().to_numpy()
    if not has.any():
        raise ValueError(f"{where}: no row has a verdict (every preference is empty); nothing to fit")
    reg = None
    if regularization_rows is not None and len(regularization_rows):
        reg = _regularization(regularization_rows, instruction_difficulty, regularization_lambda)
    fit = lc_glm.fit_length_glm(pref.to_numpy(float)[has] - 1.0, length_x[has], gamma[has], reg)
    pred = pd.Series(lc_glm.predict_without_length(fit, gamma))
    return {"length_controlled_winrate": float(pred.mean() * 100),
            "lc_standard_error": float(pred.sem() * 100) if len(pred) > 1 else float("nan"),
            "glm": fit.as_dict()}


def _regularization(rows: pd.DataFrame, difficulty: pd.Series, lam: float):
    where = "regularization_rows"
    if "model" not in rows.columns:
        raise ValueError(f"{where}: missing column 'model' (which gamed baseline each row belongs to)")
    parts = []
    models = list(dict.fromkeys(rows["model"]))
    for m in models:
        g = rows[rows["model"] == m].reset_index(drop=True)
        pref = _preferences(g, f"{where} model {m!r}")
        idx = _indices(g, f"{where} model {m!r}", difficulty)
        has = pref.notna().to_numpy()
        lx = lc_glm.length_feature(*_lengths(g, f"{where} model {m!r}"))  # standardised per model
        parts.append((pref.to_numpy(float)[has] - 1.0, lx[has], difficulty.loc[idx].to_numpy(float)[has]))
    y, lx, gam = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return y, lx, gam, np.full(len(y), lam / len(models))


def score_annotations(df_or_path: pd.DataFrame | str | Path, instruction_difficulty: pd.Series | str | Path,
                      regularization_rows: pd.DataFrame | None = None) -> dict[str, Any]:
    """All leaderboard metrics for one model's annotations (a DataFrame, or a CSV / CSV.gz / JSON / JSONL path)."""
    if isinstance(df_or_path, pd.DataFrame):
        df, where = df_or_path, "annotations"
    else:
        df, where = read_table(df_or_path), str(df_or_path)
    if not isinstance(instruction_difficulty, pd.Series):
        instruction_difficulty = load_instruction_difficulty(instruction_difficulty)
    if df.empty:
        raise ValueError(f"{where}: no rows")
    out = winrate_metrics(df, where)
    out.update(length_controlled_winrate(df, instruction_difficulty, regularization_rows, where=where))
    return out


# -- reproduction of the published leaderboard ----------------------------------------------------------------------
LEADERBOARD_FILE = "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"
DIFFICULTY_ESTIMATE_FILE = "instruction_difficulty_estimated.csv"


def reproduction_rows(data_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Score every ``annotations/<model>.csv.gz`` in the shared AlpacaEval data and set it beside the published
    leaderboard row. Returns (one row per model on the leaderboard, models without a leaderboard row)."""
    d = Path(data_dir) if data_dir else eval_data_dir() / "alpaca_eval"
    board = pd.read_csv(d / LEADERBOARD_FILE, index_col=0)
    gamma = load_instruction_difficulty(d / DIFFICULTY_ESTIMATE_FILE)
    rows, absent = [], []
    for path in sorted((d / "annotations").glob("*.csv.gz")):
        model = path.name.removesuffix(".csv.gz")
        if model not in board.index:
            absent.append(model)
            continue
        ours, pub = score_annotations(path, gamma), board.loc[model]
        rows.append({"model": model, **{k: ours[k] for k in WINRATE_KEYS},
                     **{f"published_{k}": pub[k] for k in WINRATE_KEYS},
                     "lc": ours["length_controlled_winrate"], "published_lc": pub["length_controlled_winrate"],
                     "theta": ours["glm"]["length"], "phi": ours["glm"]["difficulty"], "psi": ours["glm"]["model"],
                     "converged": ours["glm"]["converged"]})
    df = pd.DataFrame(rows)
    df["d_win_rate"] = df["win_rate"] - df["published_win_rate"]
    df["d_lc"] = df["lc"] - df["published_lc"]
    return df, absent


def reproduction_markdown(df: pd.DataFrame, absent: list[str], date: str | None = None) -> str:
    date = date or _dt.date.today().isoformat()
    lines = [
        "# AlpacaEval 2: reproducing the published leaderboard",
        "",
        f"Generated {date} by `python -m pipeline_lib.evaluation.alpaca_eval --reproduction-table` "
        "(checked by `tests/unit/test_alpaca_eval_reproduction.py`).",
        "",
        "What was measured: for each model's published per-instruction annotations "
        "(`shared/data/alpaca_eval/annotations/`, judge `weighted_alpaca_eval_gpt4_turbo`, reference "
        "`gpt4_1106_preview`), `score_annotations` computed the win rate and the length-controlled win rate "
        "(GLM fitted per model by Newton's method, no regularisation rows, instruction difficulty from "
        "`instruction_difficulty_estimated.csv`), compared with `leaderboard_weighted_alpaca_eval_gpt4_turbo.csv`.",
        "",
        f"- models compared: {len(df)}; without a leaderboard row (not compared): {', '.join(absent) or 'none'}",
        f"- win rate: max |Δ| = {df['d_win_rate'].abs().max():.2g} points",
        f"- length-controlled win rate: median |Δ| = {df['d_lc'].abs().median():.2f} points, "
        f"mean |Δ| = {df['d_lc'].abs().mean():.2f}, max |Δ| = {df['d_lc'].abs().max():.2f} "
        f"({df.loc[df['d_lc'].abs().idxmax(), 'model']})",
        f"- standard_error, discrete_win_rate: max |Δ| = "
        f"{max((df[k] - df['published_' + k]).abs().max() for k in ('standard_error', 'discrete_win_rate')):.2g}; "
        f"n_wins, n_wins_base, n_draws and n_total equal the leaderboard's for {_count_equal(df)} of {len(df)} "
        f"models; avg_length for {int((df['avg_length'] == df['published_avg_length']).sum())} "
        f"(the others: {', '.join(df.loc[df['avg_length'] != df['published_avg_length'], 'model']) or 'none'})",
        "",
        "Notes:",
        "",
        "- avg_length: the leaderboard averages all 805 model outputs; a file with fewer rows (an output that was not "
        "annotated) averages only its rows. For those files the published value is int(sum(len_2) / 805), i.e. the "
        "missing outputs had length 0 (checked by the test).",
        "- LC win rate: the published numbers come from the reference fit, which adds the annotations of two gamed "
        "baselines (`df_gamed.csv`, not in the shared data) as regularisation rows and uses the official instruction "
        "difficulty; here neither is available, so the GLM is fitted on the model's rows alone with the estimated "
        "difficulty. The largest gap is gpt4_gamed (outputs of about 70 characters, far shorter than the reference's), "
        "where the unanchored length coefficient θ runs away; that is what the regularisation rows prevent. An "
        "L1-penalised, cross-validated fit like the reference's (sklearn `LogisticRegressionCV`, measured once while "
        "writing this) gave the same median |Δ| (0.62 vs 0.61).",
        "",
        "| model | win rate | published | Δ | LC win rate | published LC | Δ LC | θ (length) | φ (difficulty) "
        "| ψ (model) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in df.itertuples(index=False):
        d_win_rate = round(r.d_win_rate, 4) + 0.0  # no "-0.0000"
        lines.append(f"| {r.model} | {r.win_rate:.2f} | {r.published_win_rate:.2f} | {d_win_rate:+.4f} | "
                     f"{r.lc:.2f} | {r.published_lc:.2f} | {r.d_lc:+.2f} | {r.theta:.3f} | {r.phi:.3f} | {r.psi:.3f} |")
    return "\n".join(lines) + "\n"


def _count_equal(df: pd.DataFrame) -> int:
    keys = ["n_wins", "n_wins_base", "n_draws", "n_total"]
    return int(np.all([df[k].to_numpy() == df[f"published_{k}"].to_numpy() for k in keys], axis=0).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline_lib.evaluation.alpaca_eval")
    p.add_argument("--reproduction-table", action="store_true", help="print the Markdown reproduction table")
    p.add_argument("--data-dir", help="shared/data/alpaca_eval (default: from ALIGNFLOW_SHARED_DIR)")
    p.add_argument("--output", "-o", help="write the table to this file instead of printing it")
    args = p.parse_args(argv)
    if not args.reproduction_table:
        p.print_help()
        return 2
    text = reproduction_markdown(*reproduction_rows(args.data_dir))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
