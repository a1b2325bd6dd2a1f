"""``alignflow ui``: both servers answer on 127.0.0.1 (MLflow on the given store, the Prefect UI pointed at its own
API), and SIGINT -- what Ctrl-C sends -- stops both server process trees."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline_lib.lineage import client

REPO = Path(__file__).resolve().parents[2]
# The installed console script, as a person runs it (``python -m pipeline_lib.cli`` loads cli.py twice, as
# __main__ and as pipeline_lib.cli, so a subcommand's UserError is not the class main() catches).
ALIGNFLOW = str(Path(sys.executable).parent / "alignflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def raw(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
    """One request with exactly these headers (a browser's Origin, a rebound Host): (status, lower-cased headers)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers)
        for k, v in {**headers, "Content-Length": str(len(body or b""))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def assert_prefect_api_closed_to_other_origins(port: int) -> None:
    """Issue 22, finding 7: what a web page open in the user's browser can do with the Prefect API of `alignflow ui`.
    Before: `access-control-allow-origin: *` on every answer, flow runs created from any page, any Host accepted."""
    own, evil = f"http://127.0.0.1:{port}", "http://evil.example"
    status, h = raw(port, "GET", "/api/health", {"Origin": evil})
    assert status == 200 and "access-control-allow-origin" not in h  # a foreign page cannot read answers
    assert raw(port, "GET", "/api/health", {"Origin": own})[1].get("access-control-allow-origin") == own
    status, h = raw(port, "OPTIONS", "/api/flows/", {"Origin": evil, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in h  # no preflight passes: no JSON POST from a foreign page
    # a form-like POST needs no preflight, and Prefect reads its body as JSON: refused without a CSRF token
    status, _ = raw(port, "POST", "/api/flows/", {"Origin": evil, "Content-Type": "text/plain"}, b'{"name": "evil"}')
    assert status == 403
    # DNS rebinding: the page's own host name resolved to 127.0.0.1 makes it same-origin; its Host is refused
    assert raw(port, "GET", "/api/health", {"Host": f"evil.example:{port}"})[0] == 400
    status, body = get(f"{own}/ui-settings")
    assert json.loads(body)["csrf_enabled"] is True  # the UI fetches tokens itself


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the servers carry their unique port on it)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def ui_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # the server's own SQLite, not ~/.prefect


@pytest.mark.slow  # two servers start: about 30 s on 2 idle cores, 90 s on busy ones
def test_ui_serves_both_and_sigint_stops_both(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri).create_experiment("ui-test-experiment", artifact_location=str(tmp_path / "mlartifacts"))
    p_port, m_port = free_port(), free_port()
    proc = subprocess.Popen([ALIGNFLOW, "ui", "--tracking-uri", uri, "--prefect-port",
                             str(p_port), "--mlflow-port", str(m_port), "--log-dir", str(tmp_path / "logs"),
                             "--timeout", "240"], cwd=REPO, env=ui_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = []
        for line in proc.stdout:  # the command gives up by itself after --timeout
            out.append(line)
            if "Ctrl-C stops both" in line:
                break
        text = "".join(out)
        assert proc.poll() is None, text
        assert f"Prefect UI  http://127.0.0.1:{p_port}" in text and f"MLflow UI   http://127.0.0.1:{m_port}" in text
        assert f"PREFECT_API_URL=http://127.0.0.1:{p_port}/api" in text

        assert get(f"http://127.0.0.1:{p_port}/api/health") == (200, b"true")
        # The UI is told where its API is (else it calls port 4200 whatever port the server has).
        status, body = get(f"http://127.0.0.1:{p_port}/ui-settings")
        assert status == 200 and json.loads(body)["api_url"] == f"http://127.0.0.1:{p_port}/api"
        assert_prefect_api_closed_to_other_origins(p_port)
        # The Prefect client (workers, `alignflow run`) fetches its CSRF token by itself: its POSTs still work.
        probe = subprocess.run([sys.executable, "-c", "from prefect.client.orchestration import get_client\n"
                                "with get_client(sync_client=True) as c: print(c.create_flow_from_name('csrf-probe'))"],
                               env={**ui_env(tmp_path), "PREFECT_API_URL": f"http://127.0.0.1:{p_port}/api"},
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0 and len(probe.stdout.strip()) == 36, probe.stderr[-2000:]
        # MLflow serves the store we named: the experiment created in it above is listed.
        status, body = get(f"http://127.0.0.1:{m_port}/api/2.0/mlflow/experiments/search", {"max_results": 50})
        assert status == 200
        assert "ui-test-experiment" in [e["name"] for e in json.loads(body)["experiments"]]

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and "stopping" in rest
        assert refused(p_port) and refused(m_port)
        deadline = time.monotonic() + 10
        while (left := processes_mentioning(str(p_port)) + processes_mentioning(str(m_port))) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], f"server processes still alive: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_exposure_warnings_and_allowed_hosts():
    """A non-loopback --host is warned about (and a missing auth string, and an unchecked Host); loopback is not."""
    import argparse

    from pipeline_lib.commands.ui import allowed_hosts, exposure_warnings

    local = argparse.Namespace(host="127.0.0.1", allowed_host=[])
    assert exposure_warnings(local, {}) == [] and allowed_hosts(local) == ["127.0.0.1", "localhost"]
    lan = argparse.Namespace(host="0.0.0.0", allowed_host=[])
    w = exposure_warnings(lan, {})
    assert len(w) == 3 and "not loopback" in w[0] and "AUTH_STRING" in w[1] and "DNS rebinding" in w[2]
    named = argparse.Namespace(host="0.0.0.0", allowed_host=["gpu-box.lan"])
    assert allowed_hosts(named) == ["gpu-box.lan"]
    assert len(exposure_warnings(named, {"PREFECT_SERVER_API_AUTH_STRING": "admin:pw"})) == 1


def test_a_busy_port_is_named_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([ALIGNFLOW, "ui", "--tracking-uri",
                            f"sqlite:///{tmp_path / 'm.db'}", "--mlflow-port", str(port), "--prefect-port",
                            str(free_port()), "--log-dir", str(tmp_path / "logs")], cwd=REPO, env=ui_env(tmp_path),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use (a MLflow server already running?)" in r.stderr
    assert "hint: open http://127.0.0.1:" in r.stderr and "or pass --mlflow-port with a free port" in r.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started
