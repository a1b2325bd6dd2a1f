"""One self-contained HTML page from ``ReportData``: tables, base64 PNG charts, the candidate's lineage, the config.

No scripts, no external fonts or stylesheets: the page opens from disk, from an e-mail attachment or a CI artifact.
Every metric cell carries ``data-metric`` / ``data-value`` (the float exactly as MLflow holds it), so a test or a
scraper can check the page against the store without parsing the rounded text.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from html import escape
from typing import Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from pipeline_lib.cost.html import cost_section
from pipeline_lib.report import charts
from pipeline_lib.report.collect import STAGE_ORDER, ChainEntry, FinalComparison, ReportData, RoundData, StageRun

# Stage metrics worth a glance in the stage table (the rest stay in MLflow).
STAGE_HIGHLIGHTS: dict[str, list[str]] = {
    "prompts": ["n_prompts"],
    "collect": ["n_samples", "mean_response_tokens", "truncated_share", "tokens_per_s"],
    "annotate": ["n_judged", "mean_score", "std_score"],
    "pair": ["n_pairs", "n_prompts_tied", "mean_score_gap"],
    "train": ["steps", "train_loss", "last_rewards_margins", "last_rewards_accuracies", "tokens_per_s"],
    "evaluate": ["pass_rate_strict", "instruction_pass_rate", "mean_score", "mean_tokens"],
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #e3e5e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #eceef1;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}td.num{text-align:right}
.up{color:#137333}.down{color:#b3261e}.muted{color:#888}.small{font-size:12px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3f4f6;padding:1px 4px;border-radius:3px}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#eceef1}
.badge.yes{background:#d7f0dd;color:#137333}.badge.reused{background:#fff2cc;color:#7a5c00}
.notes{background:#fff8e1;border:1px solid #f0d98c;padding:8px 14px;border-radius:6px}
img.chart{max-width:100%;border:1px solid #eceef1;border-radius:4px;margin:4px 0}
details{margin:10px 0}summary{cursor:pointer;font-weight:600;font-size:15px}
ul.tree{list-style:none;padding-left:0;margin:6px 0}ul.tree li{margin:2px 0;white-space:nowrap}
"""


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3f}"


def compact(v: float) -> str:
    """Stage metrics at a glance: counts as integers, the rest to 3 significant digits."""
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.3g}"


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(charts.png(fig)).decode()
    return f'<img class="chart" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """``rows`` hold ready HTML cells (``<td ...>...</td>``)."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _td(text: str, cls: str = "", **data: str) -> str:
    attrs = "".join(f' data-{k.replace("_", "-")}="{escape(v)}"' for k, v in data.items())
    return f'<td class="{cls}"{attrs}>{text}</td>'


def _metric_td(metrics: Mapping[str, float], key: str) -> str:
    v = metrics.get(key)
    return _td(fmt(v), "num", metric=key, value=repr(float(v)) if v is not None else "")


def _code(s: str, n: int = 12) -> str:
    return f'<code title="{escape(s)}">{escape(s[:n])}</code>'


def _present_metrics(rounds: Sequence[RoundData]) -> list[tuple[str, str]]:
    """(canonical metric, label) of the trend metrics any round has."""
    return [(c, label) for c, _, label in charts.TREND_METRICS
            if any(charts.resolve_metric(r.metrics, "after.", c) is not None
                   or charts.resolve_metric(r.metrics, "before.", c) is not None for r in rounds)]


def _metric_key(metrics: Mapping[str, float], side: str, canonical: str) -> str:
    """The MLflow key a canonical metric is stored under in this round (first accepted name present)."""
    names = dict((c, n) for c, n, _ in charts.TREND_METRICS)[canonical]
    return next((f"{side}.{n}" for n in names if f"{side}.{n}" in metrics), f"{side}.{canonical}")


def summary_section(data: ReportData) -> str:
    present = _present_metrics(data.rounds)
    rows = []
    for r in data.rounds:
        cells = [_td(str(r.round_index), "num"), _td(escape(r.name)), _td(_code(r.run_id))]
        for c, _ in present:
            key = _metric_key(r.metrics, "after", c)
            cells.append(_metric_td(r.metrics, key))
        badge = '<span class="badge yes">promoted</span>' if r.promoted else '<span class="badge">kept</span>'
        cells.append(_td(f'{badge} <span class="small muted">{escape(r.tags.get("alignflow.promotion_reason", ""))}'
                         f"</span>"))
        rows.append(cells)
    head = ["round", "name", "MLflow run"] + [f"candidate {label}" for _, label in present] + ["promotion"]
    return "<h2>Rounds</h2>" + _table(head, rows, "summary")


def trend_section(data: ReportData) -> str:
    table = charts.trend_table([{"round": r.round_index, "promoted": r.promoted, "metrics": r.metrics}
                                for r in data.rounds])
    if not any(col.startswith(("before.", "after.")) for col in table.columns):
        return "<h2>Trend</h2><p class='muted'>No held-out metrics logged (evaluation disabled?).</p>"
    return ("<h2>Trend</h2><p class='small muted'>Held-out metrics per round: the champion the round started from "
            "(before) and the round's candidate (after).</p>" + _img(charts.trend_chart(table), "metric trend"))


def _tone(low: float, high: float, canonical: str) -> str:
    """CSS class of a change whose value (or interval) lies in [low, high]: "up" when it is an improvement,
    "down" when it is a loss, by the metric's direction (``charts.DIRECTION``; neutral metrics stay grey)."""
    sign = charts.DIRECTION.get(canonical, 1)
    return ("up" if sign * low > 0 and sign * high > 0 else "down" if sign * low < 0 and sign * high < 0
            else "muted")


def _delta_td(before: float | None, after: float | None, canonical: str) -> str:
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return _td("–", "num")
    d = after - before
    return _td(f"{d:+.3f}", "num " + _tone(d, d, canonical))


def _stage_rows(r: RoundData) -> list[list[str]]:
    rows = []
    order = STAGE_ORDER + sorted(set(r.stages) - set(STAGE_ORDER))
    for name in (n for n in order if n in r.stages):
        s: StageRun = r.stages[name]
        family = name.split("-")[0]
        hl = STAGE_HIGHLIGHTS.get(family, list(s.metrics)[:4])
        shown = ", ".join(f"{k} {compact(s.metrics[k])}" for k in hl if k in s.metrics)
        where = (f'<span class="badge reused" title="cache hit: produced by round run {escape(s.parent_run_id)}">'
                 f"reused</span>" if s.reused else escape(s.status.lower()))
        outputs = " ".join(f"{escape(o.role)} {_code(o.sha256)}" for o in s.outputs)
        rows.append([_td(escape(name)), _td(_code(s.run_id, 8)), _td(where), _metric_td(s.metrics, "stage_s"),
                     _td(outputs), _td(f'<span class="small">{escape(shown)}</span>')])
    return rows


def _ci_cells(metrics: Mapping[str, float], name: str, canonical: str) -> list[str]:
    """The paired comparison of metric ``name`` (MLflow ``paired.<name>.*``): its CI and McNemar p, or dashes."""
    lo, hi = metrics.get(f"paired.{name}.ci_low"), metrics.get(f"paired.{name}.ci_high")
    ci = _td(f"[{lo:+.3f}, {hi:+.3f}]", "num " + _tone(lo, hi, canonical),
             metric=f"paired.{name}.ci", value=f"{lo!r},{hi!r}") if lo is not None and hi is not None else _td("–")
    p = metrics.get(f"paired.{name}.p_value")
    if p is None:
        return [ci, _td("–", "num")]
    # a p-value below 0.001 would print as 0.000; two significant digits say how far below
    return [ci, _td(f"{p:.2g}" if 0 < p < 1e-3 else fmt(p), "num", metric=f"paired.{name}.p_value", value=repr(p))]


def _paired_rows(metrics: Mapping[str, float]) -> list[tuple[str, float, float, float]]:
    """``(metric, delta, ci_low, ci_high)`` of every paired comparison logged in ``metrics``, in logging order."""
    names = [k[len("paired."):-len(".delta")] for k in metrics if k.startswith("paired.") and k.endswith(".delta")]
    return [(n, metrics[f"paired.{n}.delta"], metrics[f"paired.{n}.ci_low"], metrics[f"paired.{n}.ci_high"])
            for n in names if f"paired.{n}.ci_low" in metrics and f"paired.{n}.ci_high" in metrics]


def _paired_chart(metrics: Mapping[str, float], alt: str) -> str:
    rows = [r for r in _paired_rows(metrics) if r[0] != "mean_tokens"]
    return _img(charts.paired_chart(rows), alt) if rows else ""


def round_section(r: RoundData, open_: bool) -> str:
    parts = [f'<details {"open" if open_ else ""}><summary>Round {r.round_index}: {escape(r.name)} '
             f'<span class="muted small">({escape(r.status.lower())}, run {escape(r.run_id)})</span></summary>']
    mrows = []
    for c, label in _present_metrics([r]):
        kb, ka = _metric_key(r.metrics, "before", c), _metric_key(r.metrics, "after", c)
        mrows.append([_td(escape(label)), _metric_td(r.metrics, kb), _metric_td(r.metrics, ka),
                      _delta_td(r.metrics.get(kb), r.metrics.get(ka), c), *_ci_cells(r.metrics, ka[len("after."):], c)])
    if mrows:
        parts.append("<h3>Evaluation: champion and candidate on the same prompts</h3>" + _table(
            ["metric", "champion (before)", "candidate (after)", "delta", "95% CI of delta (paired)",
             "McNemar p"], mrows, "round-metrics") + _paired_chart(r.metrics, f"{r.name} paired differences"))
    reason = r.tags.get("alignflow.promotion_reason")
    if reason:
        parts.append(f"<p><b>Promotion:</b> {escape(reason)}</p>")
    parts.append("<h3>Stages</h3>" + _table(["stage", "run", "status", "seconds", "outputs (sha256)", "metrics"],
                                            _stage_rows(r), "stages"))
    if r.pairs is not None and len(r.pairs):
        parts.append("<h3>Preference pairs: chosen vs rejected</h3>" + _img(charts.distribution_chart(r.pairs),
                                                                            f"{r.name} score and length"))
    if r.train_history:
        parts.append("<h3>Training</h3>" + _img(charts.training_chart(r.train_history), f"{r.name} training"))
    if r.problems:
        parts.append("".join(f'<p class="small muted">{escape(p)}</p>' for p in r.problems))
    return "".join(parts) + "</details>"


def final_section(final: FinalComparison | None) -> str:
    """A campaign's effect: its first policy against its last checkpoint on the same prompts."""
    if final is None:
        return ""
    m = final.metrics
    rows = []
    for c, names, label in charts.TREND_METRICS:
        name = next((n for n in names if f"start.{n}" in m), None)
        if name is None:
            continue
        rows.append([_td(escape(label)), _metric_td(m, f"start.{name}"), _metric_td(m, f"final.{name}"),
                     _delta_td(m.get(f"start.{name}"), m.get(f"final.{name}"), c), *_ci_cells(m, name, c)])
    wall = m.get("rounds_wall_s")
    head = (f"<h2>Campaign: start vs final</h2><p class='small muted'>The campaign's starting policy and its last "
            f"checkpoint on the same prompts (run {_code(final.run_id)}); intervals are paired bootstrap intervals "
            f"over prompts, p the exact McNemar test on the prompts one model passes and the other fails."
            + (f" The rounds took {wall / 60:.1f} min." if wall else "") + "</p>")
    return head + _table(["metric", "start", "final", "delta", "95% CI of delta (paired)", "McNemar p"], rows,
                         "final-metrics") + _paired_chart(m, "campaign start vs final")


def lineage_section(chain: Sequence[ChainEntry]) -> str:
    if not chain:
        return "<h2>Lineage of the candidate</h2><p class='muted'>No candidate checkpoint recorded.</p>"
    items = []
    for e in chain:
        who = (f"{escape(e.producer.stage)} run {_code(e.producer.run_id, 8)} (round run "
               f"{_code(e.producer.parent_run_id, 8)})" if e.producer else '<span class="muted">external input</span>')
        again = ' <span class="muted small">(see above)</span>' if e.repeat else ""
        items.append(f'<li style="padding-left:{e.depth * 22}px">{"└ " if e.depth else ""}<b>{escape(e.role)}</b> '
                     f'{_code(e.sha256)} <span class="muted">{escape(e.name)}</span> ← {who}{again}</li>')
    return ("<h2>Lineage of the candidate</h2><p class='small muted'>Each artifact with the stage run that produced it "
            "(matched by sha256 across rounds).</p><ul class='tree'>" + "".join(items) + "</ul>")


def registry_section(data: ReportData) -> str:
    if not data.registry:
        return ""
    rows = [[_td(v["version"], "num"), _td(escape(v["aliases"]) + (" (seed policy)" if v["seed"] else "")),
             _td(_code(v["sha256"])), _td(_code(v["run_id"], 8))] for v in data.registry]
    name = data.rounds[-1].params.get("run.registered_model", "")
    return f"<h2>Model registry: {escape(name)}</h2>" + _table(["version", "aliases", "sha256", "round run"], rows)


def config_section(rounds: Sequence[RoundData]) -> str:
    """Keys that differ between rounds first (each round's value), then the last round's full config, folded."""
    keys = sorted(set().union(*(r.params for r in rounds)))
    values = {k: [r.params.get(k, "") for r in rounds] for k in keys}
    differ = [k for k in keys if len(set(values[k])) > 1]
    parts = ["<h2>Configuration</h2>"]
    if differ:
        head = ["key"] + [f"round {r.round_index}" for r in rounds]
        parts.append("<h3>Differs between rounds</h3>" + _table(
            head, ([_td(f"<code>{escape(k)}</code>")] + [_td(escape(v)) for v in values[k]] for k in differ),
            "config-diff"))
    last = rounds[-1]
    rows = ([_td(f"<code>{escape(k)}</code>"), _td(escape(last.params[k]))] for k in sorted(last.params))
    parts.append(f"<details><summary>Resolved config of {escape(last.name)} ({len(last.params)} keys, the MLflow "
                 f"params of its parent run)</summary>" + _table(["key", "value"], rows, "config") + "</details>")
    return "".join(parts)


def render(data: ReportData) -> str:
    """The whole page."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = ("<div class='notes'><b>Notes</b><ul>" + "".join(f"<li>{escape(n)}</li>" for n in data.notes)
             + "</ul></div>") if data.notes else ""
    body = [f"<h1>alignflow report: {escape(data.title)}</h1>",
            f"<p class='meta'>MLflow <code>{escape(data.tracking_uri)}</code> · experiment "
            f"<b>{escape(data.experiment)}</b> · {len(data.rounds)} round(s) · generated {now}</p>", notes,
            final_section(data.final), summary_section(data), trend_section(data), cost_section(data.rounds),
            "<h2>Round details</h2>",
            *(round_section(r, i == len(data.rounds) - 1) for i, r in enumerate(data.rounds)),
            lineage_section(data.lineage), registry_section(data), config_section(data.rounds)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>alignflow: {escape(data.title)}"
            f"</title><meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>")
