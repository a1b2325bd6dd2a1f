"""``alignflow report`` on a real MLflow store, rendered by headless Chromium: the page shows the store's numbers.

Chromium is Debian's ``chromium`` package (CI: ``apt-get install -y chromium``); the tests fail, not skip, without it.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pipeline_lib.cli import main
from pipeline_lib.lineage import client
from pipeline_lib.report.html import fmt
from tests.integration._report_store import log_round, new_store, pairs_table, seed_policy

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = os.environ.get("ALIGNFLOW_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("headless Chromium not found: apt-get install -y chromium (or set ALIGNFLOW_CHROMIUM)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=True)


class Cells(HTMLParser):
    """Every ``<td data-metric=... data-value=...>`` of the rendered DOM, with its text and enclosing table class;
    the ``<img>`` sources; all text."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.imgs: list[str] = []
        self.text: list[str] = []
        self._table: list[str] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table.append(a.get("class") or "")
        elif tag == "td" and "data-metric" in a:
            self._cell = {"table": self._table[-1], "metric": a["data-metric"], "value": a["data-value"], "text": ""}
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()
        elif tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Campaign ``camp``: round 1 kept (pass rate 0.25 -> 0.125), round 2 promoted (0.25 -> 0.5) trained from
    round 1's checkpoint; round 2 also logs AlpacaEval LC win rates."""
    root = tmp_path_factory.mktemp("report")
    uri, lin = new_store(root)
    seed = seed_policy(root)
    r1 = log_round(lin, root, name="camp-r1", campaign="camp", index=1, policy=seed,
                   before={"pass_rate_strict": 0.25, "mean_score": 0.1, "mean_tokens": 20.0},
                   after={"pass_rate_strict": 0.125, "mean_score": 0.05, "mean_tokens": 24.0},
                   pairs=pairs_table([1.0, 0.5, 0.75], [0.0, 0.5, 0.25], [10, 12, 12], [11, 11, 14]),
                   losses=[0.69, 0.6, 0.4], promoted=False)
    r2 = log_round(lin, root, name="camp-r2", campaign="camp", index=2, policy=r1["checkpoint"],
                   before={"pass_rate_strict": 0.25, "mean_score": 0.1, "mean_tokens": 20.0, "lc_win_rate": 0.0625},
                   after={"pass_rate_strict": 0.5, "mean_score": 0.3, "mean_tokens": 160.25, "lc_win_rate": 0.1875},
                   pairs=pairs_table([0.9, 0.8], [0.2, 0.1], [30, 31], [40, 41]), losses=[0.7, 0.5, 0.3, 0.2],
                   promoted=True)
    return {"root": root, "uri": uri, "lin": lin, "r1": r1, "r2": r2, "seed": seed}


def _report(target: str, uri: str, out: Path, capsys) -> tuple[int, str, str]:
    rc = main(["report", target, "--tracking-uri", uri, "--out", str(out)])
    cap = capsys.readouterr()
    return rc, cap.out.strip(), cap.err


@pytest.fixture(scope="module")
def campaign_page(store, tmp_path_factory) -> str:
    """The campaign's report, written once by the CLI for the tests that look at it."""
    out = tmp_path_factory.mktemp("out")
    assert main(["report", "camp", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    return str(out / "camp.html")


def test_rendered_page_shows_the_numbers_mlflow_holds(store, campaign_page, tmp_path):
    path = campaign_page
    dom = chromium(["--dump-dom", f"file://{path}"], tmp_path / "profile").stdout
    page = Cells()
    page.feed(dom)

    c = client(store["uri"])
    metrics = {r: c.get_run(store[r]["parent"]).data.metrics for r in ("r1", "r2")}
    summary = [x for x in page.cells if x["table"] == "summary"]
    per_round = [x for x in page.cells if x["table"] == "round-metrics"]
    # Summary: one candidate cell per (round, metric any round has): 2 rounds x 4 metrics, in round order.
    assert [x["metric"] for x in summary] == ["after.pass_rate_strict", "after.mean_score", "after.lc_win_rate",
                                              "after.mean_tokens"] * 2
    for round_key, cells in (("r1", summary[:4]), ("r2", summary[4:])):
        for x in cells:
            store_value = metrics[round_key].get(x["metric"])
            if store_value is None:  # round 1 has no LC win rate: a dash, not a zero
                assert x["value"] == "" and x["text"] == "–"
            else:
                assert float(x["value"]) == store_value and x["text"] == fmt(store_value)
    # Hand-checked text: round 2 candidate pass rate 0.500; mean tokens 160.25 -> "160.2" (>= 100: one decimal).
    assert summary[4]["text"] == "0.500" and summary[7]["text"] == "160.2"
    # Per-round tables hold before and after of every metric the round has, equal to the store's values.
    assert len(per_round) == 3 * 2 + 4 * 2
    assert all(float(x["value"]) == metrics["r1" if i < 6 else "r2"][x["metric"]] for i, x in enumerate(per_round))

    text = " ".join(page.text)
    # Deltas: round 2 pass rate 0.5 - 0.25 = +0.250; LC win rate 0.1875 - 0.0625 = +0.125.
    assert "+0.250" in text and "+0.125" in text
    assert "promoted: better" in text and "champion kept" in text
    # The candidate's lineage crosses rounds: round 2's checkpoint <- its pairs, and its policy = round 1's
    # checkpoint <- round 1's pairs; the seed policy has no producing run.
    for ref in (store["r2"]["checkpoint"], store["r2"]["pairs"], store["r1"]["checkpoint"], store["r1"]["pairs"],
                store["r1"]["prompts"]):
        assert ref.sha256[:12] in text
    assert "external input" in text
    assert "camp-r2" in text and store["r2"]["parent"] in text

    # Pictures: the trend, then per round the pairs distributions and the training curves; all decodable PNGs.
    assert len(page.imgs) == 1 + 2 * 2
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "PNG"


def test_screenshot_shows_the_charts_drawn(campaign_page, tmp_path):
    """The browser paints the embedded PNGs: the last round (open by default) shows its chosen-vs-rejected
    histogram, whose bars are the chart's 'chosen' green (#2ca02c); nothing else on the page is that colour."""
    path = campaign_page
    shot = tmp_path / "page.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,3600", f"file://{path}"], tmp_path / "profile")
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 3600)
    greens = sum(n for n, rgb in img.getcolors(maxcolors=1 << 20) if rgb == (0x2C, 0xA0, 0x2C))
    assert greens > 500


def test_a_stage_run_id_reports_its_round(store, tmp_path, capsys):
    pair_run = store["r1"]["runs"]["pair"]
    rc, path, _ = _report(pair_run, store["uri"], tmp_path, capsys)
    html = Path(path).read_text()
    assert rc == 0 and "alignflow report: round camp-r1" in html and store["r1"]["parent"] in html
    assert "camp-r2" not in html


def test_reused_stages_are_found_by_artifact_hash(store, tmp_path, capsys):
    """A round whose tasks were all cache hits logs no stage runs; its parent's alignflow.artifact.* tags lead to
    the runs of round 1 that produced them, shown as reused, and round 1's pairs give the distribution chart."""
    lin, r1 = store["lin"], store["r1"]
    parent = lin.start_round("key-cached", "cached", {"run": {"registered_model": "x"}},
                             tags={"alignflow.campaign": "", "alignflow.round_index": "0"})
    for name in ("prompts", "generations", "judgments", "pairs", "checkpoint"):
        tag = "prompts_train" if name == "prompts" else name
        lin.client.set_tag(parent, f"alignflow.artifact.{tag}", r1[name].sha256)
    lin.finish_round(parent, {"before.mean_score": 0.1, "after.mean_score": 0.05})
    rc, path, _ = _report(parent, store["uri"], tmp_path, capsys)
    page = Cells()
    page.feed(Path(path).read_text())
    text = " ".join(page.text)
    assert rc == 0
    assert text.count("reused") >= 5  # prompts-train, collect, annotate, pair, train
    assert r1["runs"]["pair"][:8] in text and r1["runs"]["train"][:8] in text
    assert len(page.imgs) == 1 + 2  # trend (one round), pairs, training: all from round 1's records
    assert "no stage run recorded for prompts-heldout, evaluate-champion, evaluate-candidate" in text


def test_changed_pairs_artifact_is_named_and_not_plotted(store, tmp_path, capsys):
    """The pairs file is rewritten after the round: its content no longer hashes to the digest the run logged, so
    the page says so and draws no distribution from it (the training curves still come from MLflow)."""
    uri, lin = store["uri"], store["lin"]
    r = log_round(lin, store["root"], name="solo", campaign="solo", index=1, policy=store["seed"],
                  before={"mean_score": 0.1}, after={"mean_score": 0.2},
                  pairs=pairs_table([0.9], [0.1], [5], [6]), losses=[0.7, 0.6], promoted=True)
    data = r["pairs"].dir / "data.parquet"
    pairs_table([0.1], [0.9], [5], [6]).to_parquet(data, index=False)
    rc, path, err = _report("solo", uri, tmp_path / "out", capsys)
    html = Path(path).read_text()
    assert rc == 0 and "is corrupt" in html and "no score/length distributions" in html
    assert "note: solo: pairs artifact" in err
    assert html.count("<img") == 2  # trend + training, no pairs chart


def test_unknown_campaign_and_missing_store_are_named(store, tmp_path, capsys):
    rc, _, err = _report("nope", store["uri"], tmp_path, capsys)
    assert rc == 2 and "no campaign named 'nope'" in err and "campaigns there: camp" in err.split("\n")[0]
    rc, _, err = _report("it's", store["uri"], tmp_path, capsys)
    assert rc == 2 and "campaign name \"it's\": quotes and backslashes cannot be searched for" in err
    missing = tmp_path / "absent.db"
    rc, _, err = _report("camp", f"sqlite:///{missing}", tmp_path, capsys)
    assert rc == 2 and f"no MLflow store at {missing}" in err
    assert not missing.exists()  # not created empty by MLflow


def test_log_round_charts_logs_pngs_to_the_run(store):
    """Outside a Prefect run: the PNGs go to MLflow under charts/ (the Prefect side is in test_report_prefect)."""
    from pipeline_lib.report.publish import log_round_charts

    lin, r2 = store["lin"], store["r2"]
    logged = log_round_charts(lin, r2["parent"], pairs=r2["pairs"], checkpoint=r2["checkpoint"], campaign="camp")
    assert logged == {"trend.png": "charts/trend.png", "pairs.png": "charts/pairs.png",
                      "training.png": "charts/training.png"}
    listed = sorted(f.path for f in lin.client.list_artifacts(r2["parent"], "charts"))
    assert listed == ["charts/pairs.png", "charts/training.png", "charts/trend.png"]
    local = lin.client.download_artifacts(r2["parent"], "charts/trend.png", str(store["root"] / "dl"))
    assert Image.open(local).format == "PNG"
    assert re.match(r".*/mlartifacts/", lin.client.get_run(r2["parent"]).info.artifact_uri)  # not the working dir
