"""The Prefect server that ``alignflow ui`` starts: Prefect's own app (API, UI, services), as ``prefect server
start`` runs it in the foreground with one worker, behind a check of the ``Host`` header.

Why the check: a page in the user's browser can make the browser talk to 127.0.0.1 through DNS rebinding (its own
host name, re-pointed at 127.0.0.1), and then the page *is* same-origin: CORS and CSRF tokens do not stop it, but its
requests carry its own host name, which is not in the allowed list (HTTP 400). ``alignflow ui`` sets the rest in the
environment: CORS limited to the UI's own origin and CSRF protection on (issue 22, finding 7).

Run as ``python -m pipeline_lib.commands.ui_prefect --host H --port P [--allowed-host NAME ...]``.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline_lib.commands.ui_prefect")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--allowed-host", action="append", default=[], help="Host header values accepted (no port)")
    args = p.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
                                  PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT, PREFECT_SERVER_LOGGING_LEVEL)
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = TrustedHostMiddleware(create_app(final=True, webserver_only=False), allowed_hosts=args.allowed_host or ["*"])
    uvicorn.run(app, host=args.host, port=args.port, timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
                ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
                log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower())


if __name__ == "__main__":
    main()
