"""The campaign's start-vs-final table: a change is coloured as an improvement only in the metric's better direction
(more prompts passed is better, fewer answers cut at the token limit is better, length alone is neither)."""

import re

from pipeline_lib.report.collect import FinalComparison
from pipeline_lib.report.html import final_section


def _rows(html: str) -> dict[str, list[tuple[str, str]]]:
    """label -> [(class, text)] of each cell of the final-metrics table."""
    out = {}
    for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S):
        cells = re.findall(r'<td class="([^"]*)"[^>]*>(.*?)</td>', row, flags=re.S)
        if cells:
            out[cells[0][1]] = cells
    return out


def _final(**metrics: float) -> str:
    return final_section(FinalComparison(run_id="r" * 32, metrics=metrics, tags={}))


def test_directions_of_pass_rate_truncated_share_and_length():
    html = _final(**{
        "start.ifeval.prompt_level_strict": 0.20, "final.ifeval.prompt_level_strict": 0.25,
        "paired.ifeval.prompt_level_strict.ci_low": 0.02, "paired.ifeval.prompt_level_strict.ci_high": 0.08,
        "paired.ifeval.prompt_level_strict.p_value": 3.48e-5,
        "start.ifeval.truncated_share": 0.54, "final.ifeval.truncated_share": 0.18,
        "start.mean_tokens": 160.0, "final.mean_tokens": 50.0,
        "paired.mean_tokens.ci_low": -120.0, "paired.mean_tokens.ci_high": -100.0,
    })
    rows = _rows(html)
    strict = rows["IFEval prompt-level strict"]
    assert strict[3] == ("num up", "+0.050") and strict[4][0] == "num up"
    assert strict[5] == ("num", "3.5e-05")  # not "0.000"
    cut = rows["IFEval share cut at the token limit"]  # fell 0.54 -> 0.18: an improvement, though negative
    assert cut[1][1] == "0.540" and cut[2][1] == "0.180" and cut[3] == ("num up", "-0.360")
    length = rows["mean response tokens"]  # shorter by an interval clear of zero: still neither good nor bad
    assert length[3] == ("num muted", "-110.000") and length[4][0] == "num muted"


def test_worse_changes_are_down_and_an_interval_through_zero_is_grey():
    rows = _rows(_final(**{
        "start.ifeval.truncated_share": 0.54, "final.ifeval.truncated_share": 0.65,
        "start.pass_rate_strict": 0.30, "final.pass_rate_strict": 0.28,
        "paired.pass_rate_strict.ci_low": -0.07, "paired.pass_rate_strict.ci_high": 0.03,
        "paired.pass_rate_strict.p_value": 0.62,
    }))
    assert rows["IFEval share cut at the token limit"][3] == ("num down", "+0.110")
    held = rows["prompt pass rate (strict)"]
    assert held[3] == ("num down", "-0.020") and held[4] == ("num muted", "[-0.070, +0.030]")
    assert held[5] == ("num", "0.620")
