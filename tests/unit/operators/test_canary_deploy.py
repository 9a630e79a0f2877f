"""Canary arguments of the deploy operator and the step trigger's serialization and early verdict."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.operators.serving import BentoDeployOperator
from airflow_mlops.triggers.serving import CanaryStepTrigger


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canary_steps": [50, 10]}, "are not increasing percentages"),
        ({"canary_steps": [0, 50]}, "are not increasing percentages"),
        ({"canary_steps": [100]}, "starting below 100"),
        ({"canary_steps": [10, 150]}, "are not increasing percentages"),
        ({"step_minutes": 0}, "step_minutes=0 is not a positive number"),
        ({"guardrails": {"p99": 2}}, "unknown canary guardrail"),
    ],
)
def test_canary_settings_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(MLOpsArgumentError, match=message):
        BentoDeployOperator(task_id="t", model_name="m", strategy="canary", **kwargs)


def test_the_step_trigger_serializes_its_arguments():
    trigger = CanaryStepTrigger(
        router_url="http://r",
        active_url="http://a",
        canary_url="http://c",
        generation=4,
        until=12.5,
        guardrails={"max_p99_ratio": 3.0},
        poll_interval=0.5,
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_mlops.triggers.serving.CanaryStepTrigger"
    assert CanaryStepTrigger(**kwargs).serialize() == (path, kwargs)


def _router(status: dict) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(status).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def _first(trigger: CanaryStepTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("no event")


def test_the_step_ends_early_when_the_canary_fails_its_requests_and_on_time_otherwise():
    import time

    def backends(errors: int) -> dict:
        return {
            "http://a": {"requests": 100, "errors_5xx": 0, "errors_connection": 0},
            "http://c": {"requests": 20, "errors_5xx": errors, "errors_connection": 0},
        }

    for errors, wanted in ((12, "breach"), (0, "step_done")):
        server = _router({"split": {"generation": 4, "backends": backends(errors)}})
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            started = time.monotonic()
            event = asyncio.run(
                _first(
                    CanaryStepTrigger(url, "http://a", "http://c", 4, time.time() + 1.5, poll_interval=0.1)
                )
            )
            took = time.monotonic() - started
        finally:
            server.shutdown()
        assert event["status"] == wanted
        if wanted == "breach":
            assert took < 1.0 and "error rate 60.00% (12 of 20 requests)" in event["message"]
        else:
            assert took >= 1.4
