"""A Ray head on 127.0.0.1 for tests and benchmarks: started with ``ray start --head --block`` and stopped by
signalling that one process (it stops the cluster processes it started; nothing else on the machine is touched).

Ray resolves 127.0.0.1 to the host's outside address unless it runs as a "local only" cluster
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is imported): with it, the GCS, raylet and workers listen
on 127.0.0.1 only. Callers set it in their own environment too, before importing ray (the driver must agree).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2, timeout_s: float = 120.0) -> Iterator[tuple[str, int, float]]:
    """Yields (address, pid of the head process, seconds it took to start). Workers import this checkout's code."""
    os.environ.update(LOCAL_ENV)
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)}
    log_path = Path(temp) / "head.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                 "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
                                 "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={temp}"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
        try:
            while "Ray runtime started" not in log_path.read_text():
                if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"ray head did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield f"127.0.0.1:{port}", proc.pid, time.perf_counter() - t0
        finally:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()  # this process's driver (flows.sharded connects once per process)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
