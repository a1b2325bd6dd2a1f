"""The operations tests' POST to the Prefect server: sent again after a 503 (the server's "retry me", see
tests/integration/_servers.py), never after any other error. Against a real HTTP server on 127.0.0.1 that answers
a scripted list of statuses and counts the requests it got."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration._servers import post_retrying_503


@pytest.fixture
def scripted():
    """A server whose i-th POST gets the i-th status of ``statuses`` (the last one repeats); ``bodies`` records
    what it was sent."""
    state = {"statuses": [], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            state["bodies"].append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            i = min(len(state["bodies"]), len(state["statuses"])) - 1
            payload = json.dumps({"n": len(state["bodies"])}).encode()
            self.send_response(state["statuses"][i])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/api/deployments/"
    yield state
    server.shutdown()
    server.server_close()


def test_two_503s_then_a_success_sends_the_same_body_three_times(scripted):
    scripted["statuses"] = [503, 503, 201]
    r = post_retrying_503(scripted["url"], {"name": "every-minute"}, delays=(0.01, 0.01, 0.01))
    assert r.status_code == 201 and r.json() == {"n": 3}
    assert scripted["bodies"] == [{"name": "every-minute"}] * 3


@pytest.mark.parametrize("status", [500, 409, 422])
def test_other_errors_are_not_sent_again(scripted, status):
    scripted["statuses"] = [status, 201]
    with pytest.raises(AssertionError, match=rf"POST {scripted['url']} -> {status}"):
        post_retrying_503(scripted["url"], {}, delays=(0.01, 0.01))
    assert len(scripted["bodies"]) == 1


def test_a_503_after_the_last_delay_fails_after_one_try_per_delay_plus_the_first(scripted):
    scripted["statuses"] = [503]
    with pytest.raises(AssertionError, match=r"-> 503: \{\"n\": 4\}"):
        post_retrying_503(scripted["url"], {}, delays=(0.01, 0.01, 0.01))
    assert len(scripted["bodies"]) == 4
