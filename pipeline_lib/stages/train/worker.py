"""The train stage's worker: its training core as a torchrun process group (data parallel, optionally DeepSpeed).

Why child processes: DDP and DeepSpeed need one process per device, each started with its rank in the environment
(what ``torchrun`` / ``accelerate launch`` do); the stage runs inside a Prefect task process, which cannot become
N processes. So the stage writes a spec and runs ``python -m torch.distributed.run --standalone --nproc_per_node N
-m pipeline_lib.train_worker SPEC.json``; every rank calls the same core as the in-process path
(``stages/train/fit.py``), rank 0 writes the model artifact, the parent waits and reads it. The command's module,
``pipeline_lib/train_worker.py``, runs ``main`` here.

Several hosts (``train.nnodes > 1``): ``--standalone`` becomes a c10d rendezvous, ``--nnodes N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id <stage key>``. The stage's host writes the spec into the stage's ``.work``
directory (under ``work_dir``, on storage every host mounts at the same path) and announces it in
``<work_dir>/rendezvous/<HOST_PORT>.json``; each other host runs ``python -m pipeline_lib.train_worker join
--work-dir W --rdzv-endpoint HOST:PORT``, which waits for that announcement and starts the same torchrun command
with the same spec. The group forms when all N hosts have joined; the global rank 0, wherever it lands, writes the
checkpoint to the shared ``work_dir`` and the stage reads it back (its log rows reach the stage's progress only when
rank 0 is on the stage's host; otherwise the joining host prints them).

Protocol (both sides live here):
- SPEC.json: the ``TrainJob`` (``fit.py``; its ``to_spec``): policy and reference (ref, path, sha256), the pairs
  artifact, the train and method configs, the output artifact directory with its inputs and config (computed once,
  by the parent), quiet; and nproc per node, nnodes and the rendezvous endpoint and id. The pid of the process that
  started torchrun (the stage, or a joining host's ``join``) is in the workers' environment (PARENT_ENV).
- stdout: rank 0 writes each trainer log row as one line ``MARKER {"log": row}``; a failing rank writes
  ``MARKER {"error": "...", "rank": r}`` before it exits. Everything else (all ranks' stdout and stderr, torchrun's
  own) is echoed to the parent's stderr unless quiet, and its tail is kept for the error message.
- Death: torchrun gets SIGKILL when the parent dies (PR_SET_PDEATHSIG), and each worker when torchrun dies — torchrun
  starts its workers in sessions of their own, so a kill of torchrun alone would not reach them.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pipeline_lib.child_process import child_env, die_with_parent

MARKER = "@@alignflow-train "
PARENT_ENV = "ALIGNFLOW_TRAIN_PARENT_PID"


class TrainWorkerError(RuntimeError):
    """A training process failed (retried like a vLLM worker that died: an OOM or a lost peer may pass)."""


# -- parent side ----------------------------------------------------------------------------------------------------
def torchrun_command(spec_path: Path, nproc: int, nnodes: int = 1, rdzv_endpoint: str = "",
                     rdzv_id: str = "") -> list[str]:
    """One host's torchrun: ``--standalone`` alone, else a member of an ``nnodes``-host c10d rendezvous."""
    group = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                                                   f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *group, f"--nproc_per_node={nproc}",
            "-m", "pipeline_lib.train_worker", str(spec_path)]


def _env(nproc: int) -> dict:
    env = child_env()
    # torchrun would set 1 thread per process; on CPU (gloo) share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env["PYTHONUNBUFFERED"] = "1"  # log rows and tracebacks arrive as they happen
    env[PARENT_ENV] = str(os.getpid())
    return env


def announcement(work_dir: str | Path, rdzv_endpoint: str) -> Path:
    """Where the stage's host announces a multi-host training's spec to the hosts that join it."""
    return Path(work_dir) / "rendezvous" / (rdzv_endpoint.replace(":", "_").replace("/", "_") + ".json")


def launch(spec: dict, nproc: int, work: Path, on_log: Callable[[dict], None] | None, quiet: bool,
           nnodes: int = 1, rdzv_endpoint: str = "", work_dir: str | Path = "") -> None:
    """Run ``nproc`` training processes on ``spec`` (with ``nnodes > 1``: this host's share of a rendezvous that
    the other hosts join, announced under ``work_dir``); returns when all exited 0, else raises TrainWorkerError
    with the failing rank's error and the tail of the output. Log rows from rank 0 go to ``on_log`` as they come."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "launch-spec.json"  # beside the checkpoints: the work dir is the run's scratch space
    # the stage key names the rendezvous: every host of this training agrees on it, another training never does
    rdzv_id = Path(spec["out"]).name
    spec_path.write_text(json.dumps({**spec, "nproc_per_node": nproc, "nnodes": nnodes,
                                     "rdzv_endpoint": rdzv_endpoint, "rdzv_id": rdzv_id}))
    advert = None
    if nnodes > 1:
        advert = announcement(work_dir, rdzv_endpoint)
        advert.parent.mkdir(parents=True, exist_ok=True)
        tmp = advert.with_suffix(".tmp")
        tmp.write_text(json.dumps({"spec": str(spec_path), "out": spec["out"]}))
        os.replace(tmp, advert)
    cmd = torchrun_command(spec_path, nproc, nnodes, rdzv_endpoint, rdzv_id)
    try:
        _run(cmd, _env(nproc), nproc * nnodes, on_log, quiet)
    finally:
        if advert is not None:
            advert.unlink(missing_ok=True)


def join(work_dir: str | Path, rdzv_endpoint: str, timeout_s: float = 3600.0, quiet: bool = False) -> int:
    """A joining host: wait until a training on ``rdzv_endpoint`` is announced under ``work_dir``, then start this
    host's share of it (the same torchrun command, the same spec). Returns 0 when this host's processes exited 0."""
    import time

    advert = announcement(work_dir, rdzv_endpoint)
    deadline = time.monotonic() + timeout_s
    while not advert.is_file():
        if time.monotonic() > deadline:
            raise TrainWorkerError(f"no training announced at {advert} within {timeout_s:.0f} s")
        time.sleep(1.0)
    spec_path = Path(json.loads(advert.read_text())["spec"])
    spec = json.loads(spec_path.read_text())
    nproc = spec["nproc_per_node"]
    cmd = torchrun_command(spec_path, nproc, spec["nnodes"], spec["rdzv_endpoint"], spec["rdzv_id"])
    _run(cmd, _env(nproc), nproc * spec["nnodes"], None, quiet)
    return 0


def _run(cmd: list[str], env: dict, world: int, on_log: Callable[[dict], None] | None, quiet: bool) -> None:
    """Run one host's torchrun, relay rank 0's log rows, raise TrainWorkerError with the ranks' errors on failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, preexec_fn=die_with_parent)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    errors: dict[str, list] = {}  # message -> the ranks that reported it (often all, after one peer failed)
    try:
        for raw in proc.stdout:
            text, found, payload = raw.decode(errors="replace").partition(MARKER)
            msg = _parse(payload) if found else None
            if msg is None:  # plain output (a marker line that does not parse is shown as it is)
                text = text + found + payload
            if text.strip():
                tail.append(text if text.endswith("\n") else text + "\n")
                if not quiet:
                    sys.stderr.write(text)
                    sys.stderr.flush()
            if msg and "error" in msg:
                errors.setdefault(str(msg["error"]), []).append(msg.get("rank"))
            elif msg and "log" in msg and on_log:
                on_log(msg["log"])
        rc = proc.wait()
    except BaseException:  # on_log failed, or this process is being interrupted: take the group down with us
        _stop(proc)
        raise
    if rc != 0:
        reported = "; ".join(f"{err} (rank{'s' * (len(ranks) > 1)} {', '.join(map(str, sorted(ranks)))})"
                             for err, ranks in errors.items())
        raise TrainWorkerError(f"training with {world} process(es) failed (torchrun exit {rc}): "
                               f"{reported or 'no worker reported an error (see the output)'}\n"
                               f"--- last output ---\n{''.join(tail)[-6000:]}")


def _parse(payload: str) -> dict | None:
    try:
        msg = json.loads(payload)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # torchrun passes SIGTERM on to its workers
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()  # the workers follow through their death signal
        proc.wait()


# -- child side (one per rank) --------------------------------------------------------------------------------------
def _emit(msg: dict) -> None:
    line = MARKER + json.dumps(msg, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)) + "\n"
    sys.stdout.write(line)  # one write of a whole line: ranks' output never splits it in the pipe
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "join":
        return _join_main(argv[1:])
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    try:
        os.kill(int(os.environ[PARENT_ENV]), 0)
    except ProcessLookupError:  # the stage died before the death signal was armed: nobody waits for this run
        return 1
    rank = int(os.environ.get("RANK", "0"))
    try:
        from pipeline_lib.stages.train.fit import TrainJob, fit

        fit(TrainJob.from_spec(spec), on_log=lambda row: _emit({"log": row}))
        _close_group()
    except BaseException as e:
        _emit({"error": f"{type(e).__name__}: {e}", "rank": rank})
        raise
    return 0


def _close_group() -> None:
    """All ranks wait for rank 0's artifact, then close the process group: a gloo group left to the interpreter's
    exit can abort a rank that finished early ("terminate called without an active exception", SIGABRT: seen here in
    about 1 of 10 runs), which fails the whole run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _join_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline_lib.train_worker join",
                                description="Join a multi-host training (train.nnodes > 1) from this host.")
    p.add_argument("--work-dir", required=True, help="the round's run.work_dir, mounted at the same path as on the "
                                                     "stage's host")
    p.add_argument("--rdzv-endpoint", required=True, help="the training's train.rdzv_endpoint (HOST:PORT)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the announcement")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        return join(a.work_dir, a.rdzv_endpoint, a.timeout, a.quiet)
    except TrainWorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
