"""Progress: counts, rate and ETA worked by hand on a fake clock; throttled log lines; quiet; TTY redraw."""

from __future__ import annotations

import io

import pytest

from pipeline_lib.report.progress import Progress, _artifact_key, fmt_duration


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_and_eta_by_hand():
    """First update at t=10 with 10 done fixes the origin (start-up is not throughput). At t=12, 20 done:
    rate = (20 - 10) / (12 - 10) = 5 samples/s; ETA = (100 - 20) / 5 = 16 s."""
    clock, out = Clock(10.0), io.StringIO()
    p = Progress(100, "collect", "samples", stream=out, clock=clock)
    p.update(10)
    assert p.rate() != p.rate()  # NaN: no time has passed since the origin
    assert p.line().endswith("| ? samples/s | ETA ?")
    clock.t = 12.0
    p.update(10)
    assert p.rate() == 5.0 and p.eta_s() == 16.0
    assert p.line() == "[collect] 20/100 samples (20%) | 5.00 samples/s | ETA 16s"


def test_log_lines_are_throttled_and_the_last_one_always_printed():
    """every_s=5 on a non-TTY stream: updates at t = 0 (printed: first), 2 (no), 5 (printed: 5 s since t=0),
    7 (no), 8 reaching the total (printed: final) -> 3 lines."""
    clock, out = Clock(), io.StringIO()
    p = Progress(5, "annotate", "responses", stream=out, every_s=5.0, clock=clock)
    for t in (0, 2, 5, 7, 8):
        clock.t = t
        p.update(1, extra=f"t={t}")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[annotate] 1/5 responses (20%)") and lines[0].endswith("| t=0")
    assert lines[1].startswith("[annotate] 3/5 responses (60%)")
    # Rate over the last line: (5 - 1) responses / (8 - 0) s = 0.50/s; all done: ETA 0s.
    assert lines[2] == "[annotate] 5/5 responses (100%) | 0.50 responses/s | ETA 0s | t=8"


def test_quiet_prints_nothing():
    out = io.StringIO()
    with Progress(3, "train", "steps", quiet=True, stream=out, clock=Clock()) as p:
        p.update(3)
    assert out.getvalue() == "" and p.done == 3 and p.fraction == 1.0


def test_tty_redraws_one_line_and_close_ends_it():
    clock, out = Clock(), Tty()
    with Progress(4, "evaluate", "prompts", stream=out, clock=clock) as p:
        for t in (0.0, 1.0, 2.0, 3.0):
            clock.t = t
            p.update(1)
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert text.rstrip("\n").split("\r\x1b[2K")[-1] == "[evaluate] 4/4 prompts (100%) | 1.00 prompts/s | ETA 0s"


def test_trainer_callback_takes_total_and_step_from_the_rows():
    """Rows as pipeline_lib.stages.train passes them: step 3 of 12 at t=4 after step 1 at t=0:
    rate (3 - 1) / 4 = 0.5 steps/s, ETA (12 - 3) / 0.5 = 18 s."""
    clock, out = Clock(), io.StringIO()
    p = Progress(0, "train", "steps", stream=out, every_s=0.0, clock=clock)
    on_log = p.trainer_callback()
    on_log({"step": 1, "max_steps": 12, "loss": 0.6931, "rewards/margins": 0.0})
    clock.t = 4.0
    on_log({"step": 3, "max_steps": 12, "loss": 0.5, "rewards/margins": 0.25})
    on_log({"step": 3, "max_steps": 12, "train_runtime": 4.0})  # summary row: no loss, no line
    lines = out.getvalue().splitlines()
    assert p.total == 12 and len(lines) == 2
    assert lines[1] == "[train] 3/12 steps (25%) | 0.50 steps/s | ETA 18s | loss 0.5000 margin +0.250"


def test_trainer_callback_counts_ensemble_members_one_after_the_other():
    """BPO's ensemble of 2 members of 4 steps: each member logs steps 1..4 again; member 1's step 2 is overall
    step 4 + 2 = 6 of 8. Steps 1 (t=0) .. 6 (t=5): rate (6 - 1) / 5 = 1 step/s, ETA (8 - 6) / 1 = 2 s."""
    clock, out = Clock(), io.StringIO()
    p = Progress(0, "train", "steps", stream=out, every_s=0.0, clock=clock)
    on_log = p.trainer_callback(members=2)
    for t, (member, step) in enumerate([(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]):
        clock.t = float(t)
        on_log({"step": step, "max_steps": 4, "loss": 0.5, "ensemble_member": member})
    lines = out.getvalue().splitlines()
    assert p.total == 8 and [ln.split(" ")[1] for ln in lines] == ["1/8", "2/8", "3/8", "4/8", "5/8", "6/8"]
    assert lines[-1] == "[train] 6/8 steps (75%) | 1.00 steps/s | ETA 2s | member 2/2 loss 0.5000"


def test_durations_and_keys():
    assert fmt_duration(9.6) == "10s" and fmt_duration(75) == "1m15s" and fmt_duration(3725) == "1h02m"
    assert fmt_duration(float("nan")) == "?" and fmt_duration(float("inf")) == "?"
    assert _artifact_key("Evaluate candidate (held out)") == "evaluate-candidate-held-out-progress"


def test_bad_total_is_named():
    with pytest.raises(ValueError, match="Progress 'collect': total must be >= 0, got -1"):
        Progress(-1, "collect")


def test_outside_prefect_no_artifact_is_attempted():
    p = Progress(2, "collect", stream=io.StringIO(), clock=Clock())
    p.update(2)
    assert p._prefect is False and p._artifact_id is None
