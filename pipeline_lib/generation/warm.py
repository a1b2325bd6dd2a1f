"""A vLLM worker process kept between generation calls: the parent side of ``vllm_worker --serve``.

Why: every generating stage used to start its own worker process, and on CPU starting Python, torch and vLLM costs
about as much as building the engine itself (``bench.round``'s split, 2026-12-05: about 14 s a worker, three workers
in the default round). A kept worker pays the imports once per parent process; each call still builds its own engine
from its own spec and frees it at the end (the trainer, which runs between the generating stages, gets the memory
back), so the samples are those a fresh worker draws.

What is kept, when: one worker per parent process, for calls with ``reuse_worker`` "on", or "auto" on a machine
without CUDA and one engine process (tensor_parallel_size 1). "auto" leaves GPUs to a fresh process per call: freeing
a CUDA engine inside a long-lived process is not reliable across vLLM versions, and a GPU's engine start is small next
to its generation. A call that finds the kept worker busy (another thread is generating) runs a fresh process, as
before. The worker exits after ``IDLE_S`` without a call, after a failed call, and within a second of its parent
(it watches its parent process; stdin is closed at exit).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time

from pipeline_lib.child_process import child_env
from pipeline_lib.generation.vllm_worker import ENGINE_ENV, JOB_END

IDLE_S = 600.0


class WorkerDied(RuntimeError):
    """The kept worker ended without finishing the call (killed, crashed, or its engine failed). ``silent``: it
    ended without a byte of output for this call (gone before the call reached it)."""

    def __init__(self, message: str, silent: bool = False):
        super().__init__(message)
        self.silent, self.reused = silent, False


def wanted(mode: str, tensor_parallel_size: int) -> bool:
    """Whether a call with ``reuse_worker=mode`` runs in the kept worker. "auto" defers to the environment variable
    ALIGNFLOW_REUSE_WORKER (on / off / auto) where it is set, so an operator can turn reuse off without a config."""
    def auto() -> bool:
        import torch

        env = os.environ.get("ALIGNFLOW_REUSE_WORKER", "auto").strip().lower() or "auto"
        if env not in ("on", "off", "auto"):
            raise ValueError(f"ALIGNFLOW_REUSE_WORKER={env!r}: expected on, off or auto")
        if env != "auto":
            return wanted(env, tensor_parallel_size)
        return tensor_parallel_size == 1 and not torch.cuda.is_available()

    modes = {"on": lambda: tensor_parallel_size == 1, "off": lambda: False, "auto": auto}
    if mode not in modes:
        raise ValueError(f"reuse_worker={mode!r}: expected one of {sorted(modes)}")
    return modes[mode]()


def _context() -> tuple:
    """What a worker inherits at its start and a later call must share: the interpreter, the working directory (a
    relative model path) and the environment it would be given (HF_HOME, thread settings), less the engine settings
    (ENGINE_ENV) that travel with each call. Why not those: they change inside a round for reasons that do not touch
    the worker (importing TRL in the parent sets VLLM_LOGGING_LEVEL=ERROR when unset, trl/_compat.py), and a change
    there made every stage after the train stage start a new worker (bench.round --reuse-compare, 2026-12-05: the
    champion's evaluation never reused it)."""
    env = {k: v for k, v in child_env().items() if k not in ENGINE_ENV}
    return sys.executable, os.getcwd(), tuple(sorted(env.items()))


def engine_settings_now() -> dict[str, str | None]:
    """The engine settings a fresh worker would inherit now (None: unset); the kept worker applies them per call."""
    env = child_env()
    return {k: env.get(k) for k in ENGINE_ENV}


class KeptWorker:
    def __init__(self, idle_s: float = IDLE_S):
        self.idle_s, self.context = idle_s, _context()
        self.proc = subprocess.Popen(
            [self.context[0], "-m", "pipeline_lib.generation.vllm_worker", "--serve", str(idle_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(self.context[2]))
        # no die_with_parent (PR_SET_PDEATHSIG) here: it fires when the spawning *thread* ends, and a kept worker
        # outlives the task thread that started it; the worker watches its parent process itself
        self.last_used, self.jobs, self._pending = time.monotonic(), 0, b""

    def usable(self) -> bool:
        # a margin below the worker's own idle timeout, so a call never races the worker's exit; a changed
        # environment or directory needs a worker started in it
        return (self.proc.poll() is None and self.context == _context()
                and time.monotonic() - self.last_used < self.idle_s - min(30.0, self.idle_s / 2))

    def run(self, spec_path: str, out_path: str, feed) -> None:
        """One call: send it, pass the worker's output to ``feed(bytes)`` until the job's end line, raise
        WorkerDied (with the worker ended) if it fails or the process goes away."""
        try:
            request = {"spec": spec_path, "out": out_path, "env": engine_settings_now()}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.close()
            raise WorkerDied(f"the kept vLLM worker had gone: {e}", silent=True) from e
        seen = []
        result = self._read_until_end(lambda b: (seen.append(len(b)), feed(b)))
        self.last_used, self.jobs = time.monotonic(), self.jobs + 1
        if result is None:
            rc = self.close()
            raise WorkerDied(f"the kept vLLM worker ended during the call (exit status {rc})", silent=not any(seen))
        if not result.get("ok"):
            self.close()
            raise WorkerDied(result.get("error", "the call failed"))

    def _read_until_end(self, feed) -> dict | None:
        """The worker ends a job's output with "\\n" + JOB_END + JSON + "\\n". What it wrote before goes to ``feed``,
        closed by a newline if it lacked one (as a process's output is when it exits), so the caller's next line
        starts a line of its own."""
        keep, last = len(JOB_END), b"\n"  # held back: the end marker and its newline may be split across reads
        buf, pending, self._pending = b"", self._pending, b""  # pending: what followed the last end line in its read

        def out(b: bytes) -> None:
            nonlocal last
            if b:
                feed(b)
                last = b[-1:]

        for chunk in _chunks(pending, self.proc.stdout):
            buf += chunk
            at = buf.find(b"\n" + JOB_END)
            if at < 0:
                if len(buf) > keep:
                    out(buf[:-keep])
                    buf = buf[-keep:]
                continue
            out(buf[:at])
            if last != b"\n":
                out(b"\n")
            rest = buf[at + 1 + len(JOB_END):]
            while b"\n" not in rest:
                more = self.proc.stdout.read1(4096)
                if not more:
                    return None
                rest += more
            line, self._pending = rest.split(b"\n", 1)
            return json.loads(line)
        out(buf)
        return None

    def close(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the worker returns from its loop
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _chunks(first: bytes, stream):
    """``first`` (when not empty), then the stream's reads until EOF."""
    if first:
        yield first
    yield from iter(lambda: stream.read1(4096), b"")


_lock = threading.Lock()
_worker: KeptWorker | None = None


def run_kept(spec_path: str, out_path: str, feed, idle_s: float = IDLE_S) -> bool:
    """Run the call in the kept worker (started if there is none or it has ended). False, without running it, when
    the kept worker is busy with another thread's call: the caller then runs a fresh process. Returns True when the
    call ran there; raises WorkerDied if it failed."""
    global _worker
    if not _lock.acquire(blocking=False):
        return False
    try:
        try:
            _call(spec_path, out_path, feed, idle_s)
        except WorkerDied as e:
            # a kept worker killed while it waited (its death not yet visible when the call was sent) never saw
            # the call: run it once more in a new worker; anything else is the call's own failure
            if not (e.silent and e.reused):
                raise
            _call(spec_path, out_path, feed, idle_s)
        return True
    finally:
        _lock.release()


def _call(spec_path: str, out_path: str, feed, idle_s: float) -> None:
    global _worker
    if _worker is None or not _worker.usable():
        if _worker is not None:
            _worker.close()
        _worker = KeptWorker(idle_s)
    reused = _worker.jobs > 0
    try:
        _worker.run(spec_path, out_path, feed)
    except WorkerDied as e:
        _worker, e.reused = None, reused
        raise


def kept_pid() -> int | None:
    """The kept worker's process id, if one is running (tests, stats)."""
    w = _worker
    return w.proc.pid if w is not None and w.proc.poll() is None else None


@atexit.register
def shutdown() -> None:
    """End the kept worker (at interpreter exit, or when a caller wants its memory back now)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.close()
            _worker = None
