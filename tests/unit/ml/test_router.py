"""The router's count of requests in flight per backend, which the deployer's drain waits on.

A property test drives the real :class:`RouterApp` through random interleavings of new requests, backends
answering, backends refusing connections (the router then retries once on the backend a switch made active)
and switches of the routes file. The backends are in-process ASGI-free transports the test controls, so it
can hold each request at a backend for as long as it likes: at every step the router's ``/__router__``
status must give, per backend, exactly the requests that backend is working on (never negative, never a
request charged to the wrong backend), and every count must be back to 0 once all requests are answered.
A drain waits for ``inflight[old] == 0``, so this is what makes it wait for exactly the old backend's work.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_mlops.ml.router import STATUS_PATH, RouterApp

BACKENDS = ("http://b0", "http://b1", "http://b2")


class Backends:
    """Backends whose requests wait until the test answers them (``ok``) or refuses the connection."""

    def __init__(self) -> None:
        self.holding: list[tuple[str, asyncio.Future[str]]] = []

    def transport(self, backend: str) -> httpx.MockTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.holding.append((backend, outcome))
            if await outcome == "refuse":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json={"backend": backend})

        return httpx.MockTransport(handler)

    def working(self) -> Counter[str]:
        return Counter(b for b, outcome in self.holding if not outcome.done())

    def finish(self, index: int, outcome: str) -> None:
        waiting = [f for _, f in self.holding if not f.done()]
        if waiting:
            waiting[index % len(waiting)].set_result(outcome)


async def _call(app: RouterApp, path: str = "/predict") -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": []}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _route(path: Path, backend: str, generation: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"active": backend, "generation": generation}))
    os.replace(tmp, path)


async def _settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.just(0)),
        st.tuples(st.just("ok"), st.integers(0, 50)),
        st.tuples(st.just("refuse"), st.integers(0, 50)),
        st.tuples(st.just("switch"), st.integers(0, len(BACKENDS) - 1)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps, finish_with=st.sampled_from(["ok", "refuse"]))
def test_inflight_per_backend_is_exactly_the_work_each_backend_has(tmp_path, steps, finish_with):
    asyncio.run(_run(tmp_path / "routes.json", steps, finish_with))


async def _run(routes: Path, steps: list[tuple[str, int]], finish_with: str) -> None:
    _route(routes, BACKENDS[0], 1)
    app = RouterApp(str(routes))
    backends = Backends()
    app.clients = {b: httpx.AsyncClient(base_url=b, transport=backends.transport(b)) for b in BACKENDS}
    requests: list[asyncio.Task] = []
    generation = 1

    async def check() -> None:
        await _settle()
        status, body = await _call(app, STATUS_PATH)
        inflight = json.loads(body)["inflight"]
        assert all(n > 0 for n in inflight.values()), f"a count went negative: {inflight}"
        assert inflight == dict(backends.working()), (
            f"router says {inflight}, backends are working on {dict(backends.working())}"
        )

    for action, value in steps:
        if action == "send":
            requests.append(asyncio.create_task(_call(app)))
        elif action == "switch":
            generation += 1
            _route(routes, BACKENDS[value], generation)
        else:
            backends.finish(value, action)
        await check()
    while not all(r.done() for r in requests):
        backends.finish(0, finish_with)
        await check()
    assert dict(app.inflight) == {} or set(app.inflight.values()) == {0}
    for request in requests:
        status, _ = request.result()
        assert status in (200, 502)


def test_the_router_refuses_a_body_over_the_limit_before_forwarding_it(tmp_path):
    from airflow_mlops.config import DEFAULT_SERVING_MAX_BODY_BYTES
    from airflow_mlops.ml import router

    assert router.DEFAULT_SERVING_MAX_BODY_BYTES == DEFAULT_SERVING_MAX_BODY_BYTES
    routes = tmp_path / "routes.json"
    _route(routes, BACKENDS[0], 1)
    app = RouterApp(str(routes), max_body_bytes=100)
    backends = Backends()
    app.clients = {b: httpx.AsyncClient(base_url=b, transport=backends.transport(b)) for b in BACKENDS}

    async def post(chunks: list[bytes], headers: list) -> tuple[int, dict]:
        sent: list[dict] = []
        parts = iter(chunks)

        async def receive() -> dict:
            part = next(parts, b"")
            return {"type": "http.request", "body": part, "more_body": part != b""}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/predict",
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    status, body = asyncio.run(post([b"x" * 60] * 2, [(b"content-length", b"120")]))
    assert (
        status == 413 and "limit of 100 bytes" in body["error"] and "serving_max_body_bytes" in body["error"]
    )
    status, body = asyncio.run(post([b"x" * 60] * 5, []))  # chunked: no Content-Length
    assert status == 413 and "limit of 100 bytes" in body["error"]
    assert backends.holding == [], "nothing was forwarded"


def test_a_backend_that_dies_during_a_switch_hands_its_requests_to_the_standby(tmp_path):
    """The deployer names the version that served before as ``standby`` while it switches: a request the
    new backend refuses or drops (it died with the request in flight) is answered by the standby once."""
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"active": BACKENDS[1], "standby": BACKENDS[0], "generation": 2}))
    errors = [
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
        httpx.ReadError("connection reset by peer"),
    ]

    def transport(backend: str) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if backend == BACKENDS[1]:
                raise errors.pop(0)
            return httpx.Response(200, json={"backend": backend})

        return httpx.MockTransport(handler)

    app = RouterApp(str(routes))
    app.clients = {b: httpx.AsyncClient(base_url=b, transport=transport(b)) for b in BACKENDS}
    answers = [asyncio.run(_call(app)) for _ in range(3)]
    assert [(status, json.loads(body)["backend"]) for status, body in answers] == [(200, BACKENDS[0])] * 3
    # without a standby (the switch is over) a dead backend is a 502 that says so
    routes.write_text(json.dumps({"active": BACKENDS[1], "generation": 3}))
    errors.append(httpx.ConnectError("connection refused"))
    status, body = asyncio.run(_call(app))
    assert status == 502 and "does not accept connections" in json.loads(body)["error"]
