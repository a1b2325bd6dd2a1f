"""Progress of a long stage: done/total, rate, ETA on the terminal, and a Prefect progress artifact in a flow.

``Progress`` is for any loop with a known total (samples generated, responses judged, optimiser steps): call
``update(n)`` as work finishes. On a terminal the line is redrawn in place; in a log (not a TTY) a line is printed
at most every ``every_s`` seconds and at the end, so CI logs stay short. ``quiet`` prints nothing. Inside a Prefect
flow or task run the same progress goes to a progress artifact (the percentage bar on the run's Artifacts tab),
updated at most every ``prefect_every_s`` seconds so a fast loop does not flood the API.

The rate is the mean since the first update (not since construction: engine start-up is not throughput), and the ETA
is remaining / rate; both are undefined until two updates are apart in time, and shown as ``?``.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, TextIO


def fmt_duration(s: float) -> str:
    """``75`` -> ``1m15s``, ``3725`` -> ``1h02m``, NaN/inf -> ``?``."""
    if not math.isfinite(s):
        return "?"
    s = int(round(max(s, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _artifact_key(label: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", label.lower())).strip("-") + "-progress"


class Progress:
    """Counts, rate and ETA of ``total`` units of work; see the module docstring."""

    def __init__(self, total: int, label: str, unit: str = "items", *, quiet: bool = False,
                 stream: TextIO | None = None, every_s: float = 5.0, prefect: bool = True,
                 prefect_every_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if total < 0:
            raise ValueError(f"Progress {label!r}: total must be >= 0, got {total}")
        self.total, self.label, self.unit, self.quiet = int(total), label, unit, quiet
        self.stream = stream if stream is not None else _terminal()
        self.every_s, self.prefect_every_s, self.clock = every_s, prefect_every_s, clock
        self.done = 0
        self.extra = ""
        self._t_first: float | None = None  # time of the first update: the rate's origin
        self._n_first = 0
        self._last_print = float("-inf")
        self._last_prefect = float("-inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._artifact_id = None
        self._prefect = prefect and in_prefect_run()
        if self._prefect:
            self._artifact_id = self._prefect_call(lambda: _create_artifact(self))

    # -- numbers -------------------------------------------------------------------------------------------------
    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(self.done / self.total, 1.0)

    def rate(self, now: float | None = None) -> float:
        """Units per second since the first update (NaN until time has passed)."""
        if self._t_first is None:
            return float("nan")
        el = (self.clock() if now is None else now) - self._t_first
        return (self.done - self._n_first) / el if el > 0 else float("nan")

    def eta_s(self, now: float | None = None) -> float:
        r = self.rate(now)
        if self.done >= self.total:
            return 0.0
        return (self.total - self.done) / r if not math.isnan(r) and r > 0 else float("nan")

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        r = self.rate(now)
        rate = f"{r:.2f} {self.unit}/s" if not math.isnan(r) else f"? {self.unit}/s"
        extra = f" | {self.extra}" if self.extra else ""
        return (f"[{self.label}] {self.done}/{self.total} {self.unit} ({100 * self.fraction:.0f}%) | {rate} | "
                f"ETA {fmt_duration(self.eta_s(now))}{extra}")

    # -- updates -------------------------------------------------------------------------------------------------
    def update(self, n: int = 1, extra: str | None = None) -> None:
        """``n`` more units done; ``extra`` (e.g. ``loss 0.41``) is shown after the ETA."""
        self.set(self.done + n, extra)

    def set(self, done: int, extra: str | None = None) -> None:
        """The absolute count (a trainer's global step)."""
        now = self.clock()
        if self._t_first is None:  # the first report fixes the origin of the rate
            self._t_first, self._n_first = now, done
        self.done = int(done)
        if extra is not None:
            self.extra = extra
        finished = self.done >= self.total
        if not self.quiet and (finished or now - self._last_print >= (0.2 if self._tty else self.every_s)):
            self._print(now, final=finished)
        if self._prefect and self._artifact_id is not None and (finished or now - self._last_prefect
                                                                >= self.prefect_every_s):
            self._last_prefect = now
            self._prefect_call(lambda: _update_artifact(self))

    def close(self) -> None:
        """End the terminal line (TTY) and push the last count to Prefect."""
        if not self.quiet and self._tty:
            self.stream.write("\n")
            self.stream.flush()
        if self._prefect and self._artifact_id is not None:
            self._prefect_call(lambda: _update_artifact(self))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def trainer_callback(self, members: int = 1) -> Callable[[dict], None]:
        """An ``on_log`` for ``pipeline_lib.stages.train.run``: rows carry ``step``/``max_steps`` and TRL's logs.
        ``members`` > 1 (BPO's LoRA ensemble): rows also carry ``ensemble_member`` i and each member counts its steps
        from 1 again, so member i's step s is overall step i * max_steps + s of members * max_steps."""

        def on_log(row: dict) -> None:
            member = int(row.get("ensemble_member", 0))
            if row.get("max_steps"):
                self.total = members * int(row["max_steps"])
            if "loss" not in row:
                return
            margin = row.get("rewards/margins")
            extra = f"loss {row['loss']:.4f}" + (f" margin {margin:+.3f}" if margin is not None else "")
            if members > 1:
                extra = f"member {member + 1}/{members} " + extra
            step = member * (self.total // members) + int(row["step"]) if "step" in row else self.done
            self.set(step, extra)

        return on_log

    def _print(self, now: float, final: bool) -> None:
        self._last_print = now
        if self._tty:
            self.stream.write("\r\x1b[2K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def _prefect_call(self, fn):
        """Progress reporting must never fail the stage: one warning on the stream, then Prefect updates stop."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the API being down is not the stage's failure
            self._prefect = False
            if not self.quiet:
                print(f"[{self.label}] Prefect progress artifact disabled: {type(e).__name__}: {e}",
                      file=self.stream, flush=True)
            return None


def _terminal() -> TextIO:
    from pipeline_lib.console import terminal

    return terminal()  # the terminal even while library output goes to the run's log (pipeline_lib/console.py)


def in_prefect_run() -> bool:
    """Inside a Prefect flow or task run (where progress and charts also go to Prefect artifacts)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _create_artifact(p: Progress):
    from prefect.artifacts import create_progress_artifact

    # A total of 0 here is "not known yet" (the trainer's comes with its first log), not "all done": start at 0 %.
    return create_progress_artifact(progress=100.0 * p.fraction if p.total else 0.0, key=_artifact_key(p.label),
                                    description=f"{p.label}: {p.done}/{p.total} {p.unit}")


def _update_artifact(p: Progress):
    from prefect.artifacts import update_progress_artifact

    return update_progress_artifact(artifact_id=p._artifact_id, progress=100.0 * p.fraction,
                                    description=f"{p.label}: {p.done}/{p.total} {p.unit}, "
                                                f"ETA {fmt_duration(p.eta_s())}")
