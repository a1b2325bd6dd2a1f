"""What a person sees on the terminal: the product's lines there, the libraries' chatter in a log file.

``alignflow run|campaign|evaluate`` print progress lines, one line per stage boundary, warnings a user can act on and
the result table. Everything else the libraries underneath write (vLLM's engine notices and per-tensor loading
lines, torch's C++ warnings, ``datasets`` progress bars, Prefect's and MLflow's INFO lines, Python warnings) goes to
``<run.work_dir>/logs/<time>-<name>.log``, whose path is printed at the end; ``--verbose`` puts it all back on the
terminal.

How: :func:`library_output_to` points file descriptors 1 and 2 at the log file, so that whatever writes to them
(a C++ extension, a child process that inherits them, a logging handler made before we started) lands in the log,
and keeps copies of the terminal's descriptors for :func:`terminal` (progress, stage lines, warnings) and
:func:`stdout` (the table, ``--json``). Redirecting descriptors rather than ``sys.stdout`` is what catches output
from C++ and from child processes.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

_streams: dict[str, TextIO | None] = {"out": None, "err": None}
_log_path: list[Path | None] = [None]


def terminal() -> TextIO:
    """Where the product's progress, stage lines and warnings go (the terminal's stderr)."""
    return _streams["err"] or sys.stderr


def stdout() -> TextIO:
    """Where results go (the terminal's stdout): the table, ``--json``."""
    return _streams["out"] or sys.stdout


def log_path() -> Path | None:
    """The log file library output goes to, while :func:`library_output_to` is active."""
    return _log_path[0]


def say(line: str) -> None:
    """One product line on the terminal."""
    stream = terminal()
    stream.write(line + "\n")
    stream.flush()


def new_log_path(work_dir: str | Path, name: str) -> Path:
    """``<work_dir>/logs/<YYYYmmdd-HHMMSS>-<name>.log`` (a new file per invocation)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"
    return Path(work_dir) / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}.log"


def _terminal_stream(fd: int, current: TextIO) -> TextIO:
    """A stream on a copy of ``fd`` (the terminal), or the current object when it is not backed by ``fd`` (pytest's
    capture, a notebook): then it is left as it is and keeps receiving the product's lines."""
    try:
        if current.fileno() != fd:
            return current
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return current
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(current, "encoding", None) or "utf-8",
                     errors="replace")


class _ActionableWarnings(logging.Handler):
    """Warnings and errors from our flows' and tasks' run loggers, as one line each on the terminal (tracebacks
    stay in the log). Prefect's closing "Finished in state ..." lines are left out: the stage line says it."""

    def __init__(self, stream: TextIO):
        super().__init__(level=logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if msg.startswith("Finished in state"):
                return
            first = msg.strip().splitlines()[0] if msg.strip() else ""
            if len(first) > 300:  # an exception's repr can carry a worker's whole output tail; the log has it all
                first = first[:297] + "..."
            who = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or record.name
            self.stream.write(f"{record.levelname.lower()}: [{who}] {first}\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a display problem must never fail a run
            pass


WARNING_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "alignflow")


@contextlib.contextmanager
def library_output_to(log_file: Path | None) -> Iterator[Path | None]:
    """While active: file descriptors 1 and 2 write to ``log_file`` (appended); :func:`terminal` and :func:`stdout`
    write to the terminal; run warnings are echoed there in one line. ``None``: nothing changes (``--verbose``)."""
    if log_file is None:
        yield None
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _terminal_stream(1, sys.stdout), _terminal_stream(2, sys.stderr)
    saved = (os.dup(1), os.dup(2))
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    previous = dict(_streams), _log_path[0]
    _streams.update(out=out, err=err)
    _log_path[0] = log_file
    handler = _ActionableWarnings(err)
    for name in WARNING_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield log_file
    except BaseException:
        ok = False
        raise
    else:
        ok = True
    finally:
        if ok and out is not sys.stdout and err is not sys.stderr:
            # A real terminal: what libraries print at interpreter exit (Prefect stopping its temporary server, from
            # an atexit handler registered during the run) goes to the log too. atexit runs handlers last-registered
            # first, so this one runs before theirs.
            atexit.register(_reopen_for_exit, str(log_file))
        for name in WARNING_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        for s in (out, err):
            if s not in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
                    s.close()
        _streams.update(previous[0])
        _log_path[0] = previous[1]
        _last_log[0] = log_file


_last_log: list[Path | None] = [None]


def last_log() -> Path | None:
    """The log file of the last command in this process (named in error messages)."""
    return _last_log[0]


def forget_last_log() -> None:
    """A new command starts: an error before its own log exists must not name an earlier command's log."""
    _last_log[0] = None


def _reopen_for_exit(path: str) -> None:
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def add_output_options(parser) -> None:
    """``--verbose``: the libraries' output on the terminal (default: the run's log file)."""
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the libraries' output (vLLM, torch, Prefect, MLflow) on the terminal instead of "
                             "writing it to <run.work_dir>/logs/")


@contextlib.contextmanager
def command_output(args, work_dir: str | Path, name: str) -> Iterator[Path | None]:
    """A command's terminal: quiet (library output to a new log under ``work_dir``) unless ``args.verbose``; the
    log's path is printed at the end (``--quiet`` turns progress and stage lines off through ``run.quiet``)."""
    path = None if getattr(args, "verbose", False) else new_log_path(work_dir, name)
    with library_output_to(path):
        yield path
    if path is not None:
        say(f"log: {path}")

