"""The HTML report's cost section: one row per round (its ``cost.*`` totals) and the campaign's sum, then each
round's stages. Cells carry ``data-metric`` / ``data-value`` like the rest of the page (pipeline_lib/report/html.py)."""

from __future__ import annotations

from html import escape
from typing import Any, Mapping, Sequence

from pipeline_lib.cost.accounting import sum_costs, unprefixed
from pipeline_lib.cost.table import COLUMNS, _cell


def _row(label: str, cost: Mapping[str, Any], cols) -> str:
    cells = [f"<td>{escape(label)}</td>"]
    for _, key, digits in cols:
        text = _cell(cost, key, digits)
        value = cost.get(key)
        data = f' data-metric="cost.{key}" data-value="{value!r}"' if isinstance(value, float) else ""
        cells.append(f'<td class="num"{data}>{escape(text) or "–"}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _table(rows: Sequence[tuple[str, Mapping[str, Any]]], first: str, cls: str) -> str:
    cols = [(h, k, d) for h, k, d in COLUMNS if any(_cell(c, k, d) for _, c in rows)]
    head = "".join(f"<th>{escape(h)}</th>" for h in [first] + [h for h, _, _ in cols])
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(_row(label, c, cols) for label, c in rows) + "</tbody></table>")


def cost_section(rounds: Sequence[Any]) -> str:
    """``rounds``: the report's RoundData (parent ``metrics`` with the round's ``cost.*``; ``stages`` with theirs)."""
    totals = [(f"round {r.round_index}: {r.name}", unprefixed(r.metrics)) for r in rounds]
    totals = [(label, c) for label, c in totals if c]
    if not totals:
        return "<h2>Cost</h2><p class='muted'>No cost recorded (rounds run before cost accounting).</p>"
    rows = totals + ([("campaign total", sum_costs([c for _, c in totals]))] if len(totals) > 1 else [])
    parts = ["<h2>Cost</h2><p class='small muted'>Wall and CPU seconds, GPU-seconds, peak memory of the process tree, "
             "tokens generated and trained, judge usage, and the efficiency figures, per round and summed "
             "(stages that were cache hits cost nothing in the round that reused them).</p>",
             _table(rows, "round", "cost-rounds")]
    for r in rounds:
        stage_rows, reused = [], []
        for name, s in r.stages.items():
            c = unprefixed(s.metrics)
            if s.reused or not c:
                reused.append(name)
            else:
                stage_rows.append((name, c))
        if stage_rows:
            note = f"<p class='small muted'>cache hits: {escape(', '.join(reused))}</p>" if reused else ""
            parts.append(f"<details><summary>Round {r.round_index}: cost by stage</summary>"
                         + _table(stage_rows + [("total", unprefixed(r.metrics))], "stage", "cost-stages")
                         + note + "</details>")
    return "".join(parts)
