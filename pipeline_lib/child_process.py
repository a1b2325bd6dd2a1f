"""What the stages that run their work in child processes share (the vLLM worker, the multi-process trainer): the
child dies with its parent, and imports this checkout's ``pipeline_lib`` whatever the working directory."""

from __future__ import annotations

import os
from pathlib import Path


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (kill -9 of a round must not leave an engine or a
    trainer running). Called in the child: as ``preexec_fn`` of ``Popen``, or first thing in a worker's main."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
