"""BentoEndpointTrigger: serialization round-trip and its events against a real local HTTP server."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_mlops.triggers.serving import BentoEndpointTrigger


def test_serialize_round_trips_exactly_the_init_arguments():
    trigger = BentoEndpointTrigger(
        url="http://127.0.0.1:3001", ready_path="/ready", timeout=12.5, poll_interval=0.2
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_mlops.triggers.serving.BentoEndpointTrigger"
    assert kwargs == {
        "url": "http://127.0.0.1:3001",
        "ready_path": "/ready",
        "timeout": 12.5,
        "poll_interval": 0.2,
    }
    assert BentoEndpointTrigger(**kwargs).serialize() == (path, kwargs)


@pytest.fixture
def server():
    """Answers 503 to the first two readiness probes, then 200."""
    calls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            calls["n"] += 1
            ready = calls["n"] > 2
            self.send_response(200 if ready else 503)
            self.end_headers()
            self.wfile.write(b"ok" if ready else b"loading")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", calls
    httpd.shutdown()


async def _first_event(trigger):
    async for event in trigger.run():
        return event.payload


def test_fires_ready_once_the_endpoint_answers_200(server):
    url, calls = server
    event = asyncio.run(_first_event(BentoEndpointTrigger(url=url, timeout=10, poll_interval=0.05)))
    assert event == {"status": "ready", "url": url, "body": "ok"}
    assert calls["n"] == 3


def test_times_out_naming_the_last_answer():
    event = asyncio.run(
        _first_event(BentoEndpointTrigger(url="http://127.0.0.1:9", timeout=0.3, poll_interval=0.05))
    )
    assert event["status"] == "timeout" and "ConnectError" in event["message"]
