"""The report's pictures as PNG: metric trend over rounds, paired differences with their confidence intervals,
chosen-vs-rejected distributions, training curves.

Every chart is a plain function of a table or a mapping (no MLflow, no Prefect), built on ``matplotlib.figure.Figure``
directly rather than ``pyplot``: no global figure registry to leak memory in a long-running worker, no GUI backend,
safe from worker threads. ``png(fig)`` renders with Agg.

Departures from the usual plots in the papers' repos: AlpacaEval and MT-Bench numbers are shown per round as
champion (before) vs candidate (after) of that round, not against a fixed leaderboard; the distribution panels use
one set of bin edges for chosen and rejected so their bars line up and the counts compare bin by bin.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# (canonical name, accepted metric names, axis label). Names other stages may log for the same quantity are
# accepted so the report does not depend on one spelling; the first one present in a round wins. The
# ``alpaca_eval.*`` / ``mt_bench.*`` names are those flows/evaluate.py logs (win rates in percent, as AlpacaEval).
TREND_METRICS: list[tuple[str, tuple[str, ...], str]] = [
    ("pass_rate_strict", ("pass_rate_strict",), "prompt pass rate (strict)"),
    ("instruction_pass_rate", ("instruction_pass_rate",), "instruction pass rate"),
    ("mean_score", ("mean_score",), "mean judge score"),
    ("win_rate", ("win_rate", "alpaca_eval.win_rate"), "AlpacaEval 2 win rate"),
    ("lc_win_rate", ("lc_win_rate", "length_controlled_win_rate", "length_controlled_winrate",
                     "alpaca_eval.length_controlled_winrate", "alpaca_eval.lc_win_rate"), "AlpacaEval 2 LC win rate"),
    ("mt_bench_score", ("mt_bench_score", "mt_bench", "mt_bench.score"), "MT-Bench score (1-10)"),
    ("ifeval_prompt_strict", ("ifeval.prompt_level_strict",), "IFEval prompt-level strict"),
    ("ifeval_instruction_strict", ("ifeval.instruction_level_strict",), "IFEval instruction-level strict"),
    ("ifeval_truncated", ("ifeval.truncated_share",), "IFEval share cut at the token limit"),
    ("mean_tokens", ("mean_tokens",), "mean response tokens"),
]

# Which way is better, where it is not "up" (the report colours a delta green only when it is an improvement):
# a shorter or longer answer is neither (length alone says nothing of quality), fewer answers cut at the token
# limit is better (a cut answer cannot satisfy an end phrase or a closing format).
DIRECTION: dict[str, int] = {"mean_tokens": 0, "ifeval_truncated": -1}

# Training curves: (MLflow metric name as lineage logs it -- TRL's "rewards/margins" with "/" -> "_" --, title).
TRAIN_CURVES: list[tuple[str, str]] = [
    ("loss", "loss"),
    ("rewards_margins", "reward margin (chosen - rejected)"),
    ("rewards_accuracies", "reward accuracy"),
    ("wpo_weight", "WPO weight (mean)"),
]

TREND_NAMES = {canonical: names for canonical, names, _ in TREND_METRICS}

CHAMPION, CANDIDATE = "#8c8c8c", "#1f77b4"
CHOSEN, REJECTED = "#2ca02c", "#d62728"


def png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # constrained layout already fits the labels: no second draw
    return buf.getvalue()


def _grid(n: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)) -> tuple[Figure, list]:
    ncols = 2 if n == 4 else min(ncols, n)  # four panels as 2 x 2 rather than three and a lone one
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def resolve_metric(metrics: Mapping[str, float], prefix: str, canonical: str) -> float | None:
    """The value of ``prefix + name`` for the first accepted name of ``canonical`` present in ``metrics``."""
    for name in TREND_NAMES[canonical]:
        if prefix + name in metrics:
            return float(metrics[prefix + name])
    return None


def trend_table(rounds: Sequence[Mapping]) -> pd.DataFrame:
    """One row per round: ``round``, ``promoted``, and ``before.<m>`` / ``after.<m>`` for each canonical metric that
    any round has (NaN where a round lacks it). ``rounds``: mappings with ``round``, ``promoted`` and ``metrics``
    (the parent run's metrics)."""
    rows = []
    for i, r in enumerate(rounds):
        for key in ("round", "metrics"):
            if key not in r:
                raise ValueError(f"rounds[{i}]: missing {key!r}")
        row = {"round": int(r["round"]), "promoted": bool(r.get("promoted", False))}
        for canonical, _, _ in TREND_METRICS:
            for side in ("before", "after"):
                v = resolve_metric(r["metrics"], side + ".", canonical)
                if v is not None:
                    row[f"{side}.{canonical}"] = v
        rows.append(row)
    return pd.DataFrame(rows).sort_values("round", kind="stable").reset_index(drop=True)


def trend_chart(table: pd.DataFrame) -> Figure:
    """Per metric, champion (before) and candidate (after) of each round; a star marks a promoted candidate.

    ``table`` as from ``trend_table``. A metric none of the rounds has gets no panel."""
    if "round" not in table.columns:
        raise ValueError("trend table: missing column 'round'")
    present = [(c, label) for c, _, label in TREND_METRICS
               if table.get(f"after.{c}", pd.Series(dtype=float)).notna().any()
               or table.get(f"before.{c}", pd.Series(dtype=float)).notna().any()]
    if not present:
        raise ValueError("trend table: no before.<metric>/after.<metric> columns with values "
                         f"(known metrics: {', '.join(m[0] for m in TREND_METRICS)})")
    fig, axes = _grid(len(present))
    x = table["round"].to_numpy()
    promoted = table.get("promoted", pd.Series(False, index=table.index)).fillna(False).astype(bool).to_numpy()
    for ax, (metric, label) in zip(axes, present):
        before = table.get(f"before.{metric}", pd.Series(np.nan, index=table.index)).to_numpy(float)
        after = table.get(f"after.{metric}", pd.Series(np.nan, index=table.index)).to_numpy(float)
        ax.plot(x, before, "o--", color=CHAMPION, label="champion (before)")
        ax.plot(x, after, "o-", color=CANDIDATE, label="candidate (after)")
        if promoted.any():
            ax.plot(x[promoted], after[promoted], "*", color="#ff7f0e", markersize=14, label="promoted",
                    linestyle="none")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    return fig


def _edges(values: np.ndarray, integer: bool, max_bins: int = 20) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if integer and hi - lo + 1 <= 2 * max_bins:
        return np.arange(lo, hi + 2) - 0.5  # one bin per integer value, centred on it
    # About sqrt(n) bins (at least 5): 20 bins over a few dozen values is mostly empty bins and spikes.
    return np.histogram_bin_edges(values, bins=min(max_bins, max(5, math.ceil(math.sqrt(len(values))))))


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")


def distribution_chart(pairs: pd.DataFrame, max_bins: int = 20) -> Figure:
    """Histograms of judge score and of response length, chosen vs rejected, on shared bin edges.

    ``pairs``: the pairs table. Length is ``chosen_n_tokens``/``rejected_n_tokens`` (tokens) for sampled pairs, the
    responses' characters for dataset pairs (no token counts); the score panel is left out when a dataset carries
    no scores."""
    if not {"chosen_n_tokens", "rejected_n_tokens", "chosen", "rejected"} & set(pairs.columns) or \
            not ({"chosen_n_tokens", "rejected_n_tokens"} <= set(pairs.columns) or
                 {"chosen", "rejected"} <= set(pairs.columns)):
        _need(pairs, ["chosen_n_tokens", "rejected_n_tokens"], "pairs table")
    if pairs.empty:
        raise ValueError("pairs table: no rows to plot")
    pairs = pairs.copy()
    panels = []
    if {"chosen_score", "rejected_score"} <= set(pairs.columns) and \
            not pairs[["chosen_score", "rejected_score"]].isna().all().all():
        panels.append(("score", "judge score", False))
    if {"chosen_n_tokens", "rejected_n_tokens"} <= set(pairs.columns):
        panels.append(("n_tokens", "response length (tokens)", True))
    else:
        for side in ("chosen", "rejected"):
            pairs[f"{side}_n_chars"] = pairs[side].str.len()
        panels.append(("n_chars", "response length (characters)", True))
    fig, axes = _grid(len(panels), ncols=2)
    for ax, (col, label, integer) in zip(axes, panels):
        chosen = pairs[f"chosen_{col}"].to_numpy(float)
        rejected = pairs[f"rejected_{col}"].to_numpy(float)
        both = np.concatenate([chosen, rejected])
        if not np.isfinite(both).all():
            raise ValueError(f"pairs table: column chosen_{col} or rejected_{col} has NaN/inf values")
        edges = _edges(both, integer, max_bins)
        # Side by side in each bin (not overlaid): both counts stay readable where the distributions overlap.
        ax.hist([chosen, rejected], bins=edges, color=[CHOSEN, REJECTED],
                label=[f"chosen (mean {chosen.mean():.3g})", f"rejected (mean {rejected.mean():.3g})"])
        if integer and len(edges) <= 13:
            ax.set_xticks((edges[:-1] + edges[1:]) / 2)  # one tick per token count
        elif integer:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(pairs)} pairs", fontsize=10)
    return fig


def history_from_log(log_history: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """Trainer ``log_history`` rows (as in the checkpoint manifest) -> ``{metric: [(step, value), ...]}`` with
    MLflow's names ("/" -> "_"); the end-of-training summary row (no ``loss``) is skipped."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in log_history:
        if "step" not in row or "loss" not in row:
            continue
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k.replace("/", "_"), []).append((int(row["step"]), float(v)))
    return out


def training_chart(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss, reward margin, reward accuracy and (when logged) WPO weight against the optimiser step."""
    present = [(k, t) for k, t in TRAIN_CURVES if len(history.get(k, ())) > 0]
    if not present:
        raise ValueError(f"training history: none of {', '.join(k for k, _ in TRAIN_CURVES)} was logged "
                         f"(have: {', '.join(sorted(history)) or 'nothing'})")
    fig, axes = _grid(len(present), panel=(3.6, 2.7))
    for ax, (key, title) in zip(axes, present):
        pts = sorted(history[key])
        ax.plot([s for s, _ in pts], [v for _, v in pts], "-", color=CANDIDATE, marker="." if len(pts) < 60 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def paired_chart(rows: Sequence[tuple[str, float, float, float]], title: str = "") -> Figure:
    """A forest plot: one row per comparison ``(label, delta, ci_low, ci_high)``, the difference after - before as a
    dot with its confidence interval as a bar, and a line at 0. An interval clear of 0 is drawn in colour (green
    above, red below), one that crosses it in grey: the picture says which differences are more than noise."""
    if not rows:
        raise ValueError("paired chart: no comparisons")
    fig = Figure(figsize=(7.5, 0.5 + 0.42 * len(rows)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    for yi, (label, d, lo, hi) in zip(y, rows):
        color = CHOSEN if lo > 0 else REJECTED if hi < 0 else CHAMPION
        ax.plot([lo, hi], [yi, yi], "-", color=color, linewidth=3, solid_capstyle="butt")
        ax.plot([d], [yi], "o", color=color, markersize=6)
        ax.annotate(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", (hi, yi), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=9)
    lo_all, hi_all = min(r[2] for r in rows), max(r[3] for r in rows)
    span = max(hi_all - lo_all, 1e-3)
    ax.set_xlim(min(lo_all, 0) - 0.05 * span, max(hi_all, 0) + 0.45 * span)  # room for the labels
    ax.set_xlabel("after - before (95% CI)" if not title else title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig
