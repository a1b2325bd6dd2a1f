"""A round's charts where people look during a campaign: MLflow run artifacts (``charts/*.png``) and one Prefect
markdown artifact with the same pictures inline.

Prefect 3 has ``create_image_artifact``, but it takes a URL and the UI prints that URL under the picture; a data URL
of a 50 kB PNG is a wall of base64. A markdown artifact with ``![...](data:image/png;base64,...)`` shows the same
pictures with headings and no URL text, and needs no MLflow server to be running (checked by rendering both in the
Prefect 3.7 UI in headless Chromium).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table
from pipeline_lib.report import charts
from pipeline_lib.report.progress import in_prefect_run

CHART_TITLES = {"trend.png": "Held-out metrics per round", "pairs.png": "Preference pairs: score and length",
                "training.png": "Training curves"}


def campaign_trend_rows(c, experiment_id: str, campaign: str) -> list[dict[str, Any]]:
    """``trend_table`` input for the finished rounds of a campaign (latest parent run per round index)."""
    from pipeline_lib.report.collect import CAMPAIGN_TAG, ROUND_INDEX_TAG

    runs = c.search_runs([experiment_id], filter_string=f"tags.`{CAMPAIGN_TAG}` = '{campaign}'",
                         order_by=["attributes.start_time ASC"], max_results=5000)
    by_index = {}
    for r in runs:
        index = r.data.tags.get(ROUND_INDEX_TAG, "0")
        if any(k.startswith(("before.", "after.")) for k in r.data.metrics):
            by_index[int(index) if index.isdigit() else 0] = {
                "round": int(index) if index.isdigit() else 0, "metrics": dict(r.data.metrics),
                "promoted": r.data.tags.get("alignflow.promoted") == "true"}
    return [by_index[k] for k in sorted(by_index)]


def round_charts(pairs: ArtifactRef | None = None, checkpoint: ArtifactRef | None = None,
                 trend_rows: list[Mapping] | None = None) -> dict[str, bytes]:
    """PNG bytes by file name: ``pairs.png`` (from the pairs table), ``training.png`` (the checkpoint manifest's
    ``log_history``), ``trend.png`` (one row per round, as ``trend_table`` takes). Missing inputs give no chart."""
    out: dict[str, bytes] = {}
    if trend_rows:
        table = charts.trend_table(trend_rows)
        if any(col.startswith(("before.", "after.")) for col in table.columns):
            out["trend.png"] = charts.png(charts.trend_chart(table))
    if pairs is not None:
        df = read_table(pairs)
        if len(df):
            out["pairs.png"] = charts.png(charts.distribution_chart(df))
    if checkpoint is not None:
        history = charts.history_from_log(read_manifest(checkpoint.path).get("log_history", []))
        if any(history.get(k) for k, _ in charts.TRAIN_CURVES):
            out["training.png"] = charts.png(charts.training_chart(history))
    return out


def charts_markdown(pngs: Mapping[str, bytes], title: str) -> str:
    parts = [f"## {title}"]
    for name, data in pngs.items():
        parts.append(f"### {CHART_TITLES.get(name, name)}\n\n"
                     f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})")
    return "\n\n".join(parts) + "\n"


def log_round_charts(lineage, run_id: str, *, pairs: ArtifactRef | None = None,
                     checkpoint: ArtifactRef | None = None, campaign: str = "", round_name: str = "",
                     prefect_artifact: bool = True) -> dict[str, str]:
    """Draw the round's charts, log them to MLflow run ``run_id`` under ``charts/``, and (inside a Prefect flow or
    task run) publish them as the markdown artifact ``round-charts``. ``lineage``: a ``RoundLineage``. With
    ``campaign``, the trend covers the campaign's rounds logged so far (call after ``finish_round``, so this round's
    before/after metrics are in). Returns {file name: MLflow artifact path}."""
    rows = campaign_trend_rows(lineage.client, lineage.experiment_id, campaign) if campaign else None
    pngs = round_charts(pairs=pairs, checkpoint=checkpoint, trend_rows=rows)
    logged = {}
    with tempfile.TemporaryDirectory(prefix="alignflow-charts-") as tmp:
        for name, data in pngs.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            lineage.client.log_artifact(run_id, str(path), artifact_path="charts")
            logged[name] = f"charts/{name}"
    if pngs and prefect_artifact and in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=charts_markdown(pngs, f"Round {round_name or run_id}"),
                                 key="round-charts", description=f"Charts of round {round_name or run_id} "
                                                                 f"(MLflow run {run_id}, charts/)")
    return logged
