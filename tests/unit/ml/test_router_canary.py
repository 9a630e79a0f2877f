"""The router's canary split: the share of requests the canary gets, the active answering for a canary that
refuses, drops or errors (clients see no failure), and the per-backend figures the guardrails read."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from airflow_mlops.ml.router import STATUS_PATH, RouterApp

ACTIVE, CANARY = "http://active", "http://canary"


def _routes(path: Path, generation: int, **extra) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"active": ACTIVE, "version": "1", "generation": generation, **extra}))
    os.replace(tmp, path)


async def _call(app: RouterApp, path: str = "/predict") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": []}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def _app(routes: Path, canary: str = "ok") -> RouterApp:
    app = RouterApp(str(routes))

    def active(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"backend": "active"})

    def bad(request: httpx.Request) -> httpx.Response:
        if canary == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if canary == "500":
            return httpx.Response(500, json={"error": "boom"})
        return httpx.Response(200, json={"backend": "canary"})

    app.clients = {
        ACTIVE: httpx.AsyncClient(base_url=ACTIVE, transport=httpx.MockTransport(active)),
        CANARY: httpx.AsyncClient(base_url=CANARY, transport=httpx.MockTransport(bad)),
    }
    return app


async def _status(app: RouterApp) -> dict:
    _, _, body = await _call(app, STATUS_PATH)
    return json.loads(body)


@pytest.mark.parametrize("weight", [10, 50])
def test_the_canary_gets_its_weight_of_the_requests(tmp_path, weight):
    routes = tmp_path / "routes.json"
    _routes(routes, 1, canary=CANARY, canary_version="2", canary_weight=weight)

    async def run() -> tuple[list[str], dict]:
        app = _app(routes)
        app.random.seed(7)
        seen = [(await _call(app))[1]["x-mlops-backend"] for _ in range(4000)]
        return seen, await _status(app)

    seen, status = asyncio.run(run())
    share = seen.count(CANARY) / len(seen)
    # binomial: 4 standard deviations of 4000 draws is at most 3.2 points
    assert abs(share - weight / 100) < 0.032, share
    split = status["split"]["backends"]
    assert split[CANARY]["requests"] == seen.count(CANARY)
    assert split[ACTIVE]["requests"] == seen.count(ACTIVE)
    assert status["canary"] == {"backend": CANARY, "version": "2", "weight": weight}
    assert split[CANARY]["latency_ms"]["n"] == seen.count(CANARY) and split[CANARY]["latency_ms"]["p99"] >= 0


def test_without_a_canary_every_request_goes_to_the_active(tmp_path):
    routes = tmp_path / "routes.json"
    _routes(routes, 1)

    async def run() -> tuple[set[str], dict]:
        app = _app(routes)
        seen = {(await _call(app))[1]["x-mlops-backend"] for _ in range(200)}
        return seen, await _status(app)

    seen, status = asyncio.run(run())
    assert seen == {ACTIVE} and status["canary"] is None
    assert status["split"]["backends"][ACTIVE]["requests"] == 200


@pytest.mark.parametrize("failure", ["refuse", "500"])
def test_a_failing_canary_is_answered_by_the_active_and_counted(tmp_path, failure):
    routes = tmp_path / "routes.json"
    _routes(routes, 3, canary=CANARY, canary_version="2", canary_weight=50)

    async def run() -> tuple[list[tuple[int, str]], dict]:
        app = _app(routes, canary=failure)
        answers = []
        for _ in range(400):
            status, headers, _ = await _call(app)
            answers.append((status, headers["x-mlops-backend"]))
        return answers, await _status(app)

    answers, status = asyncio.run(run())
    assert answers == [(200, ACTIVE)] * 400, "no client saw the canary's failure"
    canary = status["split"]["backends"][CANARY]
    errors = canary["errors_connection"] if failure == "refuse" else canary["errors_5xx"]
    assert 150 < canary["requests"] == errors == canary["fallbacks"] < 250
    assert canary["latency_ms"] is None, "a failed answer has no latency"
    assert status["split"]["backends"][ACTIVE]["requests"] == 400
    assert status["split"]["generation"] == 3


def test_a_5xx_of_the_active_itself_is_returned_not_retried(tmp_path):
    routes = tmp_path / "routes.json"
    tmp = routes.with_name("x.tmp")
    tmp.write_text(json.dumps({"active": CANARY, "generation": 1}))
    os.replace(tmp, routes)

    async def run() -> tuple[int, dict]:
        app = _app(routes, canary="500")
        status, _, _ = await _call(app)
        return status, await _status(app)

    status, router = asyncio.run(run())
    assert status == 500
    assert router["split"]["backends"][CANARY] | {"latency_ms": None} == {
        "requests": 1,
        "errors_5xx": 1,
        "errors_connection": 0,
        "fallbacks": 0,
        "latency_ms": None,
    }


def test_the_figures_start_afresh_when_the_weight_changes(tmp_path):
    routes = tmp_path / "routes.json"
    _routes(routes, 1, canary=CANARY, canary_version="2", canary_weight=50)

    async def run() -> tuple[dict, dict]:
        app = _app(routes)
        for _ in range(50):
            await _call(app)
        before = await _status(app)
        _routes(routes, 2, canary=CANARY, canary_version="2", canary_weight=100)
        os.utime(routes, ns=(1, 1))  # a distinct mtime even on a coarse clock
        for _ in range(10):
            await _call(app)
        return before, await _status(app)

    before, after = asyncio.run(run())
    assert sum(b["requests"] for b in before["split"]["backends"].values()) == 50
    assert after["split"]["generation"] == 2
    assert after["split"]["backends"] == {CANARY: after["split"]["backends"][CANARY]}
    assert after["split"]["backends"][CANARY]["requests"] == 10
