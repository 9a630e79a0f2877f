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


# ------------------------------------------------------------------------------------------ shadow traffic
def _shadow_app(routes: Path, handlers: dict, **options) -> RouterApp:
    """A router whose backends are the test's ``handlers``, sending the copies from its own loop (the mock
    transports live in this process; the sender process is tested against real servers below)."""
    routes.write_text(json.dumps({"active": BACKENDS[0], "shadow": BACKENDS[1], "generation": 1}))
    app = RouterApp(str(routes), shadow_sender="inline", **options)
    app.clients = {
        b: httpx.AsyncClient(base_url=b, transport=httpx.MockTransport(h)) for b, h in handlers.items()
    }
    return app


async def _post(app: RouterApp, body: bytes, headers: list | None = None) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": headers or [],
    }
    await app(scope, receive, send)
    answer_headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], answer_headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def _status(app: RouterApp) -> dict:
    _, body = await _call(app, STATUS_PATH)
    return json.loads(body)


def test_shadow_gets_a_copy_of_each_request_and_the_client_only_the_active_answer(tmp_path):
    seen: dict[str, list[tuple[bytes, str]]] = {b: [] for b in BACKENDS[:2]}

    def handler(backend: str):
        def handle(request: httpx.Request) -> httpx.Response:
            seen[backend].append((request.content, request.headers["x-mlops-request-id"]))
            return httpx.Response(200, json={"backend": backend, "label": backend[-1]})

        return handle

    app = _shadow_app(tmp_path / "routes.json", {b: handler(b) for b in BACKENDS[:2]})

    async def run() -> tuple[list, dict]:
        answers = [await _post(app, b'{"row": {"x": %d}}' % i) for i in range(5)]
        answers.append(await _post(app, b'{"row": {"x": 9}}', [(b"x-mlops-request-id", b"client-id-1")]))
        await asyncio.gather(*app.shadow_tasks)
        return answers, await _status(app)

    answers, status = asyncio.run(run())
    assert [(s, body["backend"]) for s, _, body in answers] == [(200, BACKENDS[0])] * 6
    # the same bodies with the same request ids reached both; the client gets the id back
    assert seen[BACKENDS[1]] == seen[BACKENDS[0]] and len(seen[BACKENDS[0]]) == 6
    ids = [headers["x-mlops-request-id"] for _, headers, _ in answers]
    assert ids == [rid for _, rid in seen[BACKENDS[0]]] and len(set(ids)) == 6 and ids[-1] == "client-id-1"
    shadow = status["shadow"]
    assert (shadow["backend"], shadow["sent"], shadow["skipped"], shadow["failed"]) == (BACKENDS[1], 6, 0, 0)
    assert shadow["latency_ms"]["shadow"]["n"] == 6 and shadow["latency_ms"]["active"]["n"] == 6
    assert status["served"] == 6


def test_a_slow_or_failing_shadow_neither_delays_nor_fails_the_client_and_the_bound_skips(tmp_path):
    release = asyncio.Event()

    async def slow_shadow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(500, json={"error": "broken candidate"})

    def active(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"backend": BACKENDS[0]})

    app = _shadow_app(
        tmp_path / "routes.json", {BACKENDS[0]: active, BACKENDS[1]: slow_shadow}, shadow_max_inflight=3
    )

    async def run() -> tuple[list, dict, dict]:
        # the shadow never answers while the clients are served: each answer comes at once all the same
        answers = [await asyncio.wait_for(_post(app, b"{}"), timeout=2) for _ in range(5)]
        during = await _status(app)
        release.set()
        await asyncio.gather(*app.shadow_tasks)
        return answers, during, await _status(app)

    answers, during, after = asyncio.run(run())
    assert [(s, body) for s, _, body in answers] == [(200, {"backend": BACKENDS[0]})] * 5
    assert (during["shadow"]["sent"], during["shadow"]["skipped"], during["shadow"]["inflight"]) == (3, 2, 3)
    assert (after["shadow"]["failed"], after["shadow"]["inflight"]) == (3, 0)

    # a shadow that refuses connections: the client still gets the active's answer, the copy counts as failed
    def refusing(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    app = _shadow_app(tmp_path / "routes2.json", {BACKENDS[0]: active, BACKENDS[1]: refusing})

    async def run_refused() -> tuple[tuple, dict]:
        answer = await _post(app, b"{}")
        await asyncio.gather(*app.shadow_tasks)
        return answer, await _status(app)

    (status_code, _, body), status = asyncio.run(run_refused())
    assert (status_code, body) == (200, {"backend": BACKENDS[0]})
    assert (status["shadow"]["sent"], status["shadow"]["failed"]) == (1, 1)


def test_without_a_shadow_nothing_is_mirrored(tmp_path):
    calls: list[str] = []

    def handler(backend: str):
        def handle(request: httpx.Request) -> httpx.Response:
            calls.append(backend)
            return httpx.Response(200, json={"backend": backend})

        return handle

    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"active": BACKENDS[0], "generation": 1}))
    app = RouterApp(str(routes))
    app.clients = {
        b: httpx.AsyncClient(base_url=b, transport=httpx.MockTransport(handler(b))) for b in BACKENDS
    }
    status_code, headers, _ = asyncio.run(_post(app, b"{}"))
    assert status_code == 200 and calls == [BACKENDS[0]] and headers["x-mlops-request-id"]
    assert not app.shadow_tasks and app.shadow_sender is None
    assert asyncio.run(_status(app))["shadow"]["sent"] == 0


# ------------------------------------------------------------------------------ the shadow sender process
class _Shadow:
    """A real HTTP server on loopback (in a thread) standing for the shadow: it records what it gets."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                seen.append((body, self.headers["x-mlops-request-id"]))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the sender may open up to 64 connections at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _process_app(routes: Path, shadow_url: str, **options) -> RouterApp:
    """A router with the test's active backend (in process) and a real shadow, sending copies from its
    shadow sender process (the default)."""
    routes.write_text(json.dumps({"active": BACKENDS[0], "shadow": shadow_url, "generation": 1}))
    app = RouterApp(str(routes), **options)
    app.clients = {
        BACKENDS[0]: httpx.AsyncClient(
            base_url=BACKENDS[0], transport=httpx.MockTransport(lambda r: httpx.Response(200, json={}))
        )
    }
    return app


async def _until(app: RouterApp, done, timeout: float = 20.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await _status(app))["shadow"]
        if done(status) or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.05)


def _autogroup_nice(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/autogroup") as handle:
            words = handle.read().split()
    except OSError:
        return None
    return words[-1] if words else None


def _threads_by_policy(pid: int) -> Counter[int]:
    return Counter(os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))


def test_a_sender_process_on_idle_cpu_sends_every_copy_and_reports_the_counts(tmp_path):
    # The copies leave the router's loop, which serves production: a child process in the SCHED_IDLE class
    # (all its threads) sends them; the shadow still gets every request with its body and request id.
    shadow = _Shadow()
    app = _process_app(tmp_path / "routes.json", shadow.url)

    async def run() -> tuple[list, dict, Counter[int], int]:
        try:
            answers = [await _post(app, b'{"row": {"x": %d}}' % i) for i in range(20)]
            status = await _until(app, lambda s: s["sent"] >= 20 and s["inflight"] == 0)
            pid = app.shadow_sender.process.pid
            # its own session, at the lowest priority: with autogroup scheduling, SCHED_IDLE only ranks a
            # thread below those of its own session, and the router's must keep its priority
            assert os.getsid(pid) != os.getsid(0)
            # (a kernel without autogroup has no file; one whose tasks sit in a cgroup's group shows it empty)
            if _autogroup_nice("self") is not None:
                assert _autogroup_nice(pid) == "19"
                assert _autogroup_nice("self") != "19"
            return answers, status, _threads_by_policy(pid), pid
        finally:
            app.shadow_sender.close()

    try:
        answers, status, policies, pid = asyncio.run(run())
    finally:
        shadow.close()
    assert [s for s, _, _ in answers] == [200] * 20
    assert (status["sent"], status["skipped"], status["failed"], status["queued"]) == (20, 0, 0, 0)
    assert sorted(shadow.seen) == sorted(
        (b'{"row": {"x": %d}}' % i, headers["x-mlops-request-id"])
        for i, (_, headers, _) in enumerate(answers)
    )
    assert status["sender"] == {"mode": "process", "pid": pid} and pid != os.getpid()
    assert status["latency_ms"]["shadow"]["n"] == 20
    assert set(policies) == {os.SCHED_IDLE}, policies
    assert app.shadow_tasks == set(), "nothing was sent from the router's loop"


def test_a_sender_that_gets_no_cpu_never_holds_up_the_client_and_the_dropped_copies_are_counted(tmp_path):
    # A host with no CPU to spare for the shadow (here: its sender stopped): the router's queue fills, each
    # client is answered at once all the same, and every copy is accounted for as sent, queued or skipped.
    import signal

    shadow = _Shadow()
    app = _process_app(tmp_path / "routes.json", shadow.url, shadow_queue_bytes=64 * 1024)
    body = b'{"row": {"x": "%s"}}' % (b"y" * 2000)

    async def run() -> tuple[list, dict, dict]:
        try:
            await _post(app, body)
            await _until(app, lambda s: s["sent"] == 1)
            pid = app.shadow_sender.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                answers = [await asyncio.wait_for(_post(app, body), timeout=2) for _ in range(300)]
                during = (await _status(app))["shadow"]
            finally:
                os.kill(pid, signal.SIGCONT)
            after = await _until(app, lambda s: s["queued"] == 0 and s["inflight"] == 0 and s["sent"] > 1)
            return answers, during, after
        finally:
            app.shadow_sender.close()

    try:
        answers, during, after = asyncio.run(run())
    finally:
        shadow.close()
    assert [s for s, _, _ in answers] == [200] * 300
    assert during["skipped"] > 0 and during["sent"] == 1, during
    assert during["sent"] + during["queued"] + during["skipped"] == 301, during
    assert after["sent"] + after["skipped"] == 301 and after["failed"] == 0, after
    assert len(shadow.seen) == after["sent"]


def test_a_copy_too_large_for_the_queue_and_copies_after_the_sender_died_still_reach_the_shadow(tmp_path):
    # What the sender process cannot take is sent from the router's loop as before: nothing is lost silently.
    shadow = _Shadow()
    app = _process_app(tmp_path / "routes.json", shadow.url, shadow_queue_bytes=16 * 1024)
    small, large = b'{"row": {"x": 1}}', b'{"row": {"x": "%s"}}' % (b"y" * 200_000)

    async def run() -> dict:
        try:
            await _post(app, small)
            await _post(app, large)  # larger than the queue: sent inline
            await _until(app, lambda s: s["sent"] == 2 and s["inflight"] == 0)
            app.shadow_sender.process.kill()
            app.shadow_sender.process.wait()
            await asyncio.sleep(0.1)  # the router notices the end of the queue
            await _post(app, small)  # the sender is gone: the copy goes inline
            await asyncio.gather(*app.shadow_tasks)
            return await _until(app, lambda s: s["sent"] == 3 and s["inflight"] == 0)
        finally:
            if app.shadow_sender is not None:
                app.shadow_sender.close()

    try:
        status = asyncio.run(run())
    finally:
        shadow.close()
    assert sorted(len(body) for body, _ in shadow.seen) == sorted([len(small), len(large), len(small)])
    assert (status["sent"], status["skipped"], status["failed"]) == (3, 0, 0)


def test_with_shadow_cpu_shared_the_sender_keeps_a_normal_priority(tmp_path, monkeypatch):
    # MLOPS_SHADOW_CPU=shared: the user wants every copy sent, at the price of competing with production
    monkeypatch.setenv("MLOPS_SHADOW_CPU", "shared")
    shadow = _Shadow()
    app = _process_app(tmp_path / "routes.json", shadow.url)

    async def run() -> tuple[dict, Counter[int]]:
        try:
            await _post(app, b"{}")
            status = await _until(app, lambda s: s["sent"] == 1 and s["inflight"] == 0)
            return status, _threads_by_policy(app.shadow_sender.process.pid)
        finally:
            app.shadow_sender.close()

    try:
        status, policies = asyncio.run(run())
    finally:
        shadow.close()
    assert status["sent"] == 1 and len(shadow.seen) == 1
    assert set(policies) == {os.SCHED_OTHER}, policies
