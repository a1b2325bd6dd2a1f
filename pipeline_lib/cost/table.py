"""A round's cost from its stage records (the MLflow child runs), the printed cost table, and a campaign's sums."""

from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline_lib.cost.accounting import sum_costs, unprefixed


def round_cost(client, experiment_id: str, parent_id: str, flow_run_id: str = "",
               cached: list[str] | None = None) -> dict[str, Any]:
    """``{"stages": [{"stage", "cached", **cost}], "total": {...}}``: one row per stage run this flow run logged under
    the round (in the order they started), one per cache hit (no cost: nothing ran), and their sum."""
    flt = f"tags.mlflow.parentRunId = '{parent_id}'"
    if flow_run_id:
        flt += f" and tags.`prefect.flow_run_id` = '{flow_run_id}'"
    runs = sorted(client.search_runs([experiment_id], filter_string=flt), key=lambda r: r.info.start_time)
    rows = [{"stage": r.info.run_name, "cached": False, **unprefixed(r.data.metrics)} for r in runs]
    rows += [{"stage": name, "cached": True} for name in cached or []]
    return {"stages": rows, "total": sum_costs([r for r in rows if not r["cached"]])}


def campaign_cost(round_costs: list[Mapping[str, Any]]) -> dict[str, float]:
    """The sum over a campaign's rounds (each a :func:`round_cost` result)."""
    return sum_costs([rc["total"] for rc in round_costs])


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:,.0f}" if abs(x) >= 1000 or digits == 0 else f"{x:.{digits}f}"


# (header, key, digits): a column is shown when some row has a value for it.
COLUMNS = [("wall s", "wall_s", 1), ("cpu s", "cpu_s", 1), ("gpu s", "gpu_s", 1), ("peak GiB", "peak_rss_gib", 2),
           ("gpu GiB", "peak_gpu_mem_gib", 2), ("gen tokens", "generated_tokens", 0),
           ("gen tok/s", "generation_tokens_per_s", 1), ("trained tokens", "trained_tokens", 0),
           ("train tok/s", "training_tokens_per_s", 1), ("MFU", "mfu", 3), ("judge req", "judge_requests", 0),
           ("judge tok in/out", "judge_tokens", 0), ("judge $", "judge_usd", 4)]


def _cell(row: Mapping[str, Any], key: str, digits: int) -> str:
    if key == "judge_tokens":
        i, o = row.get("judge_input_tokens"), row.get("judge_output_tokens")
        return "" if i is None and o is None else f"{_fmt(i or 0.0, 0)}/{_fmt(o or 0.0, 0)}"
    v = row.get(key)
    if key == "gpu_s" and not v:
        return ""
    return _fmt(v, digits)


def format_cost_table(cost: Mapping[str, Any], title: str = "cost") -> str:
    """Markdown table: one row per stage (cache hits marked), then the total."""
    rows = [dict(r) for r in cost["stages"]] + [{"stage": "total", "cached": False, **cost["total"]}]
    cols = [(h, k, d) for h, k, d in COLUMNS if any(_cell(r, k, d) for r in rows if not r["cached"])]
    table = [[title] + [h for h, _, _ in cols]]
    for r in rows:
        if r["cached"]:
            table.append([r["stage"], "cached"] + [""] * (len(cols) - 1))
        else:
            table.append([r["stage"]] + [_cell(r, k, d) for _, k, d in cols])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths)))
             + " |" for t in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
