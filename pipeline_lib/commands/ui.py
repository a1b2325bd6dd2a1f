"""``alignflow ui``: the Prefect UI and the MLflow UI side by side, stopped together with Ctrl-C.

Both servers run as child processes, each in its own session, so that Ctrl-C reaches only this command, which then
stops each server's whole process tree (MLflow's uvicorn workers, Prefect's services) and waits for it. A server
that dies on its own stops the other one too, with its log tail printed. Logs go to files (``--log-dir``), not the
terminal, so the addresses stay readable.

The Prefect UI finds its API through ``PREFECT_UI_API_URL``; without it, it calls port 4200 whatever port the
server listens on, so the variable is set for the child.

Exposure (issue 22, finding 7): Prefect's API has no authentication of its own, and ``prefect server start`` answers
any Host with ``access-control-allow-origin: *``, so any web page open in the user's browser could create flow runs
with parameters of its choosing (a judge ``base_url`` of its own, which would receive the API key) and read Secret
blocks. Here the Prefect server is started (:mod:`pipeline_lib.commands.ui_prefect`) with CORS limited to the UI's
own origin, CSRF protection on (a POST needs a token that a foreign page cannot read), a Host allow-list (DNS
rebinding), and HTTP basic auth when ``PREFECT_SERVER_API_AUTH_STRING`` is set. Binding to a non-loopback
``--host`` is warned about. (MLflow's server already refuses foreign Hosts and cross-origin POSTs.)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the Prefect and MLflow UIs on this machine (Ctrl-C stops both)",
                       description="Start `prefect server` and `mlflow server` (on the recipe's tracking store) as "
                                   "child processes on 127.0.0.1, print their addresses, and stop both on Ctrl-C.")
    p.add_argument("--config", "-c", metavar="RECIPE", default=None, help="recipe whose run.mlflow_tracking_uri the MLflow UI shows")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow store to show (default: $MLFLOW_TRACKING_URI, else the recipe's, else "
                        "sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface both servers bind to (default: %(default)s); "
                                                       "anything but loopback exposes both APIs to the network")
    p.add_argument("--allowed-host", metavar="NAME", action="append", default=[],
                   help="a host name or address clients use to reach the Prefect server besides --host (repeatable; "
                        "requests naming any other Host are refused)")
    p.add_argument("--prefect-port", metavar="PORT", type=int, default=4200, help="default: %(default)s")
    p.add_argument("--mlflow-port", metavar="PORT", type=int, default=5000, help="default: %(default)s")
    p.add_argument("--log-dir", metavar="DIR", default="runs/ui-logs", help="server logs (default: %(default)s)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=180.0,
                   help="seconds to wait for both servers to answer (default: %(default)s)")
    p.set_defaults(func=run)


@dataclass
class Server:
    name: str
    url: str  # what a person opens
    health: str  # what answers 200 once the server is up
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.health, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers the server left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


from pipeline_lib.commands.report import tracking_uri  # noqa: E402  (same resolution order as `report`)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK


def allowed_hosts(args) -> list[str]:
    """Host header values the Prefect server accepts: the bind address (loopback: its usual names too) and the
    --allowed-host names; a wildcard bind without --allowed-host cannot be checked ("*", warned about)."""
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        return ["*"]
    names = [args.host, *args.allowed_host]
    if is_loopback(args.host):
        names += ["127.0.0.1", "localhost"]
    return list(dict.fromkeys(n for n in names if n not in ("0.0.0.0", "::")))


def exposure_warnings(args, env: dict[str, str]) -> list[str]:
    out = []
    if not is_loopback(args.host):
        out.append(f"warning: --host {args.host} is not loopback: the Prefect and MLflow APIs are reachable from the "
                   "network, and neither asks for credentials unless PREFECT_SERVER_API_AUTH_STRING is set (Prefect) "
                   "or MLflow's basic-auth app is configured; put them behind TLS and authentication")
        if not env.get("PREFECT_SERVER_API_AUTH_STRING"):
            out.append("warning: PREFECT_SERVER_API_AUTH_STRING is not set: anyone who reaches the Prefect API can "
                       "start flow runs and read Secret blocks")
        if allowed_hosts(args) == ["*"]:
            out.append("warning: no --allowed-host given for a wildcard --host: the Host header is not checked "
                       "(DNS rebinding)")
    return out


def servers(args, uri: str) -> list[Server]:
    host, log_dir = args.host, Path(args.log_dir)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    prefect_url, mlflow_url = f"http://{host}:{args.prefect_port}", f"http://{host}:{args.mlflow_port}"
    hosts = [a for h in allowed_hosts(args) for a in ("--allowed-host", h)]
    return [
        Server("Prefect", prefect_url, f"{prefect_url}/api/health",
               [sys.executable, "-m", "pipeline_lib.commands.ui_prefect", "--host", host, "--port",
                str(args.prefect_port), *hosts],
               {**env, "PREFECT_UI_API_URL": f"{prefect_url}/api",
                # only the UI's own pages may read API responses cross-origin (Prefect's default is "*")
                "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": prefect_url,
                # POST/PUT/PATCH/DELETE need a token from /api/csrf-token, which a foreign page cannot read; the
                # Prefect client and the UI fetch it themselves
                "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true"},
               log_dir / "prefect.log"),
        Server("MLflow", mlflow_url, f"{mlflow_url}/health",
               [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port",
                str(args.mlflow_port), "--workers", "1"], env, log_dir / "mlflow.log"),
    ]


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from pipeline_lib.errors import UserError

    uri = tracking_uri(args)
    for line in exposure_warnings(args, dict(os.environ)):
        print(line, file=sys.stderr)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"note: no MLflow store at {uri.removeprefix('sqlite:///')} yet; the MLflow UI starts empty",
              file=sys.stderr)
    srv = servers(args, uri)
    for s, port, flag in zip(srv, (args.prefect_port, args.mlflow_port), ("--prefect-port", "--mlflow-port")):
        if not _port_free(args.host, port):
            raise UserError(f"port {port} on {args.host} is in use (a {s.name} server already running?)",
                            hint=f"open {s.url} if it is, or pass {flag} with a free port")
    # Ctrl-C must stop both servers even when whatever started us left SIGINT ignored or blocked (both survive exec:
    # seen when `alignflow ui` ran under a long pytest session, where it never saw the test's SIGINT).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        for s in srv:
            s.start()
        print(f"starting Prefect and MLflow servers (logs in {args.log_dir}/) ...", flush=True)
        deadline, pending = time.monotonic() + args.timeout, list(srv)
        while pending:
            for s in list(pending):
                if s.proc.poll() is not None:
                    raise UserError(f"the {s.name} server exited with status {s.proc.returncode} while starting:\n"
                                    f"{s.tail()}", hint=f"full log: {s.log}")
                if s.answers():
                    pending.remove(s)
            if pending and time.monotonic() > deadline:
                raise UserError(f"{', '.join(s.name for s in pending)} did not answer within {args.timeout:.0f} s",
                                hint="raise --timeout on a busy machine; logs in " + str(args.log_dir))
            time.sleep(0.5)
        prefect, mlflow = srv
        auth = ("on (PREFECT_SERVER_API_AUTH_STRING; clients need PREFECT_API_AUTH_STRING)"
                if os.environ.get("PREFECT_SERVER_API_AUTH_STRING") else "off")
        print(f"Prefect UI  {prefect.url}   (CORS: this origin only; CSRF tokens on; API auth {auth})\n"
              f"MLflow UI   {mlflow.url}   (store {uri})\n\n"
              f"To send rounds to them, in another shell:\n"
              f"  export PREFECT_API_URL={prefect.url}/api ALIGNFLOW_MLFLOW_UI={mlflow.url}\n\n"
              f"Ctrl-C stops both.", flush=True)
        while all(s.proc.poll() is None for s in srv):
            time.sleep(0.5)
        dead = next(s for s in srv if s.proc.poll() is not None)
        print(f"alignflow: error: the {dead.name} server exited with status {dead.proc.returncode}; stopping the "
              f"other.\n{dead.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for s in srv:
            s.stop()
        signal.signal(signal.SIGTERM, previous)
