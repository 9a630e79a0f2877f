"""The stable address of a local blue/green deployment: a small HTTP reverse proxy.

It listens on the deployment's port and forwards each request to the backend named in a routes file
(``{"active": "http://127.0.0.1:3101", "generation": 3, ...}``). During a switch the file also names the
``standby``, the version that served before, still running until it is drained: a request whose backend
refused it or died with it in flight is sent once more, to the active backend if that changed, else to
the standby (predictions have no side effect but their log line). The deployer switches traffic by replacing
that file atomically (write + rename); the proxy notices the new file on the next request (one ``stat``
per request), so every request goes either wholly to the old or wholly to the new backend and none is
dropped. It counts requests in flight per backend so the deployer can drain the old one before stopping it.

Every forwarded request carries a request id header, ``X-MLOps-Request-Id`` (the client's, else one the
router makes up); the answer gives it back to the client, and the model service writes it into the prediction
log (field ``request_id``).

**Shadow traffic.** When the routes file also names ``"shadow": <backend url>``, a copy of every ``POST``
is sent to that backend *after* the client has its answer from the active one, with the same body and the
same request id; its answer is dropped (the shadow backend logs it to its prediction log, where
:mod:`airflow_mlops.ml.shadow` pairs it with production's by request id). The copies are not sent by the
router's own event loop, which serves production: the router hands the already-read body, as one message,
to a queue (a Unix socket pair, ``MLOPS_ROUTER_SHADOW_QUEUE_BYTES``, default 4 MiB) read by a *shadow
sender*, a child process that runs in the ``SCHED_IDLE`` scheduling class (:func:`run_on_idle_cpu`: it gets
only CPU time production does not want; ``MLOPS_SHADOW_CPU=shared``, :func:`shadow_cpu`: normal priority)
and keeps one connection pool to the shadow. Handing a copy over
never waits: when the queue is full (the sender gets no CPU, or the shadow is slow) the copy is dropped and
counted as ``skipped``. The sender has at most ``MLOPS_ROUTER_SHADOW_MAX_INFLIGHT`` (default 64) copies in
flight; past that it skips them too. So a slow or dead shadow, or a busy host, never holds up the client nor
piles up work; what the shadow saw is in the counts: ``sent`` (copies sent to the shadow), ``skipped``
(dropped: queue full or in-flight bound), ``failed`` (a connection error or a 5xx), ``queued`` (handed over,
not yet taken by the sender). ``MLOPS_ROUTER_SHADOW_SENDER=inline`` sends the copies from the router's loop
instead (as background tasks, same bounds and counts); the router falls back to that when the sender
process cannot run, and for a body too large for the queue.

**Canary split.** When the routes file also names ``"canary": <backend url>`` with ``"canary_weight": <percent>``,
each request goes to the canary with that probability (an independent draw per request), else to the active
backend. The canary is on probation: a request it refuses, drops (connection-level errors) or answers with a
5xx is sent once more to the active backend, so clients see no failed request while a bad canary is found and
rolled back (predictions have no side effect but their log line). Routes files without ``canary`` behave as
before.

**Per-backend figures.** Since the routes file last changed (its ``generation``: a new weight is a new
generation), the router counts per backend the requests sent to it, its 5xx answers (``errors_5xx``), its
connection-level failures (``errors_connection``), the requests it failed that went on to the active backend
(``fallbacks``) and the latency of its answers below 500 (``latency_ms``: ``n``, ``p50``, ``p99``, over at most
the last 50,000). The deployer's canary guardrails read them.

``GET /__router__`` answers ``{"active": ..., "generation": ..., "inflight": {backend: n}, "served": n,
"shadow": {"backend": ..., "sent": n, "skipped": n, "failed": n, "inflight": n, "queued": n,
"sender": {"mode": "process" or "inline", "pid": n or None}, "latency_ms": {...}},
"canary": {"backend": ..., "version": ..., "weight": percent} or None, "split": {"generation": n,
"since": ISO time, "backends": {backend: {"requests", "errors_5xx", "errors_connection", "fallbacks",
"latency_ms"}}}, "pid": n}``
(``latency_ms``: mean and p99 of the active's and of the shadow's answers to the mirrored requests, over the
last 10,000 of them; the sender reports its figures to the router about every 0.2 s, so they may lag by that;
``pid``: the router's process id, which a deploy compares with the router it started).

Run: ``python -m airflow_mlops.ml.router --port 3000 --routes /path/routes.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import marshal
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)

#: ``[mlops] serving_max_body_bytes``'s default (the deployer passes the setting as
#: ``MLOPS_SERVE_MAX_BODY_BYTES``); not imported from the config so that the router does not import Airflow
DEFAULT_SERVING_MAX_BODY_BYTES = 8 * 1024 * 1024

STATUS_PATH = "/__router__"
#: the header pairing a request's answers (active and shadow) in the prediction logs
REQUEST_ID_HEADER = b"x-mlops-request-id"
#: most shadow copies in flight at once (``MLOPS_ROUTER_SHADOW_MAX_INFLIGHT``); past it copies are skipped
DEFAULT_SHADOW_MAX_INFLIGHT = 64
#: how long a shadow copy may take before it counts as failed
SHADOW_TIMEOUT_SECONDS = 30.0
#: bytes of copies waiting for the shadow sender (``MLOPS_ROUTER_SHADOW_QUEUE_BYTES``); past it copies are skipped
DEFAULT_SHADOW_QUEUE_BYTES = 4 * 1024 * 1024
#: how often the shadow sender reports its counts to the router
SHADOW_REPORT_SECONDS = 0.2
#: latencies kept per backend for the split's p50/p99
SPLIT_LATENCY_SAMPLES = 50_000
#: headers that describe one connection, not the message; never forwarded
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


class Routes:
    """The routes file, re-read whenever it was replaced (checked by inode and mtime on each call)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self.data: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return self.data
        key = (stat.st_ino, stat.st_mtime_ns)
        if key != self._key:
            with open(self.path) as handle:
                self.data = json.load(handle)
            self._key = key
        return self.data


def shadow_cpu() -> str:
    """``MLOPS_SHADOW_CPU``: ``idle`` (default: a shadow's server and the router's shadow sender take only CPU
    production leaves idle, and copies they cannot keep up with are dropped and counted) or ``shared`` (they
    run at normal priority: the shadow gets a copy of every request, and competes with production for the
    CPU)."""
    value = (os.environ.get("MLOPS_SHADOW_CPU") or "idle").strip().lower()
    return "shared" if value == "shared" else "idle"


def run_on_idle_cpu(sched_idle: bool = True) -> list[str]:
    """Give this process the lowest CPU priority there is (Linux): for a shadow and its copies, which share
    production's host.

    Every thread goes in the ``SCHED_IDLE`` scheduling class (it runs only on CPU time no normal thread wants,
    and a normal thread that wakes up preempts it at once; threads and processes started afterwards inherit
    the class) at nice 19, and the process's session gets nice 19 too: with the kernel's autogroup scheduling
    (on by default) CPU is shared between *sessions* first, and a ``SCHED_IDLE`` thread only ranks below the
    threads of its own session. In another session of normal weight it would compete with production's
    servers as their equal (measured: a wake-up p99 of 1.9 ms behind a ``SCHED_IDLE`` busy loop in a session
    of the probe's weight, 0.3 ms behind one in a nice 19 session). So call it in a process that runs in a
    session of its own (``start_new_session``), never in production's. ``sched_idle=False``: nice 19 only
    (a shadow server while it loads its model, so that it becomes ready on a busy host). Returns what was
    refused (``["tid: error", ...]``, ``["not Linux"]``, ``["autogroup: error"]``); nothing is raised.
    """
    idle = getattr(os, "SCHED_IDLE", None) if sched_idle else None
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [str(os.getpid())]
    refused: list[str] = [] if idle is not None or not sched_idle else ["not Linux"]
    for task in tasks:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(task), 19)
        if idle is not None:
            try:
                os.sched_setscheduler(int(task), idle, os.sched_param(0))
            except OSError as err:  # a thread that ended meanwhile, or a kernel without the class
                refused.append(f"{task}: {err}")
    try:
        with open("/proc/self/autogroup", "w") as handle:
            handle.write("19")
    except OSError as err:  # no autogroup scheduling (then sessions do not matter), or not allowed
        refused.append(f"autogroup: {err}")
    return refused


class ShadowCopies:
    """Sends copies of answered requests to the shadow backend and counts them: in the shadow sender
    process, or in the router's own loop (``inline``).

    :param client: the HTTP client of a backend url.
    :param max_inflight: most copies in flight; past it copies are skipped and counted.
    """

    def __init__(self, client: Callable[[str], httpx.AsyncClient], max_inflight: int) -> None:
        self.client = client
        self.max_inflight = max_inflight
        self.counts: Counter[str] = Counter()  # received, sent, skipped, failed
        self.tasks: set[asyncio.Task[None]] = set()
        self.active_ms: deque[float] = deque(maxlen=10_000)
        self.shadow_ms: deque[float] = deque(maxlen=10_000)

    def submit(
        self, shadow: str, method: str, target: str, headers: list, active_ms: float, body: bytes
    ) -> None:
        """Send one copy in the background, or skip it when ``max_inflight`` copies are in flight."""
        self.counts["received"] += 1
        if len(self.tasks) >= self.max_inflight:
            self.counts["skipped"] += 1
            return
        self.counts["sent"] += 1
        task = asyncio.get_running_loop().create_task(
            self._send(shadow, method, target, headers, active_ms, body)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(
        self, shadow: str, method: str, target: str, headers: list, active_ms: float, body: bytes
    ) -> None:
        started = time.perf_counter()
        try:
            response = await self.client(shadow).request(
                method, target, content=body, headers=headers, timeout=SHADOW_TIMEOUT_SECONDS
            )
        except Exception as err:  # any failure of the copy is counted, never raised: nobody waits on it
            self.counts["failed"] += 1
            log.debug("Shadow copy to %s failed: %s: %s", shadow, type(err).__name__, err)
            return
        if response.status_code >= 500:
            self.counts["failed"] += 1
            return
        self.active_ms.append(active_ms)
        self.shadow_ms.append((time.perf_counter() - started) * 1000)

    def status(self) -> dict[str, Any]:
        return {
            "received": self.counts["received"],
            "sent": self.counts["sent"],
            "skipped": self.counts["skipped"],
            "failed": self.counts["failed"],
            "inflight": len(self.tasks),
            "latency_ms": {"active": _summary(self.active_ms), "shadow": _summary(self.shadow_ms)},
        }

    def cancel(self) -> None:
        for task in list(self.tasks):  # copies nobody waits for
            task.cancel()


class ShadowSender:
    """The router's end of the shadow sender process: hands it copies without waiting, reads its counts.

    :param max_inflight: the sender's bound on copies in flight.
    :param queue_bytes: the queue's size (the socket's send buffer; the kernel may round it).
    """

    def __init__(self, max_inflight: int, queue_bytes: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
                try:  # SO_SNDBUFFORCE passes net.core.wmem_max (root only); SO_SNDBUF is capped by it
                    ours.setsockopt(socket.SOL_SOCKET, option, queue_bytes)
                    break
                except OSError:
                    continue
            self.frame_bytes = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            ours.setblocking(False)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "airflow_mlops.ml.router", "--shadow-sender", str(theirs.fileno())]
                + ["--shadow-max-inflight", str(max_inflight), "--frame-bytes", str(self.frame_bytes)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its lowest priority must not lower the router's session
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.socket = ours
        self.handed = 0
        self.dropped = 0  # the queue was full
        self.alive = True
        self.remote: dict[str, Any] = {}
        asyncio.get_running_loop().add_reader(ours.fileno(), self._read)

    def hand(self, frame: bytes) -> bool:
        """Queue one copy; ``False`` when the sender cannot take it (too large, or gone): send it inline."""
        try:
            self.socket.send(frame)
        except BlockingIOError:  # the queue is full: production never waits for the shadow
            self.dropped += 1
            return True
        except OSError as err:
            if err.errno != errno.EMSGSIZE:
                log.warning("The shadow sender is gone (%s); copies are sent from the router's loop", err)
                self.close()
            return False
        self.handed += 1
        return True

    def _read(self) -> None:
        while True:
            try:
                message = self.socket.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the sender ended
                self.close()
                return
            self.remote = marshal.loads(message)

    def status(self) -> dict[str, Any]:
        remote = self.remote
        return {
            "sent": remote.get("sent", 0),
            "skipped": self.dropped + remote.get("skipped", 0),
            "failed": remote.get("failed", 0),
            "inflight": remote.get("inflight", 0),
            "queued": max(0, self.handed - remote.get("received", 0)) if self.alive else 0,
            "latency_ms": remote.get("latency_ms") or {"active": None, "shadow": None},
        }

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.socket.fileno())
        self.socket.close()  # the sender sees the end of its queue and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=0)


def run_shadow_sender(fd: int, max_inflight: int, frame_bytes: int) -> None:
    """The shadow sender process (started by the router): copies from the queue on ``fd`` to the shadow."""
    refused = run_on_idle_cpu() if shadow_cpu() == "idle" else []
    if refused:
        log.warning("Shadow sender: not all of its CPU priority could be lowered: %s", refused)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    asyncio.run(_send_copies(sock, max_inflight, frame_bytes))


async def _send_copies(sock: socket.socket, max_inflight: int, frame_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    clients: dict[str, httpx.AsyncClient] = {}

    def client(backend: str) -> httpx.AsyncClient:
        if backend not in clients:  # one connection pool per shadow backend, kept
            clients[backend] = httpx.AsyncClient(
                base_url=backend,
                timeout=httpx.Timeout(SHADOW_TIMEOUT_SECONDS, connect=5.0),
                limits=httpx.Limits(max_connections=max(1, max_inflight), max_keepalive_connections=64),
            )
        return clients[backend]

    copies = ShadowCopies(client, max_inflight)

    async def report() -> None:
        last = None
        while True:
            await asyncio.sleep(SHADOW_REPORT_SECONDS)
            if (copies.counts, len(copies.tasks)) != last:
                last = (Counter(copies.counts), len(copies.tasks))
                with contextlib.suppress(BlockingIOError):
                    sock.send(marshal.dumps(copies.status()))

    reporter = loop.create_task(report())
    buffer = bytearray(frame_bytes + 65536)
    try:
        while True:
            size = await loop.sock_recv_into(sock, buffer)
            if not size:  # the router closed the queue (it stopped)
                return
            # the router's own messages on a socket pair only the two processes hold
            copies.submit(*marshal.loads(memoryview(buffer)[:size]))
    finally:
        reporter.cancel()
        copies.cancel()
        for one in clients.values():
            await one.aclose()


class RouterApp:
    """ASGI app forwarding every request to the active backend.

    :param routes_path: the routes file the deployer writes.
    :param max_body_bytes: largest request body forwarded (default ``MLOPS_SERVE_MAX_BODY_BYTES``).
    :param shadow_max_inflight: most shadow copies in flight (default ``MLOPS_ROUTER_SHADOW_MAX_INFLIGHT``,
        else 64); past it copies are skipped and counted.
    :param shadow_sender: ``process`` (a shadow sender process sends the copies) or ``inline`` (the router's
        loop does); default ``MLOPS_ROUTER_SHADOW_SENDER``, else ``process``.
    :param shadow_queue_bytes: the sender's queue (default ``MLOPS_ROUTER_SHADOW_QUEUE_BYTES``, else 4 MiB).
    """

    def __init__(
        self,
        routes_path: str,
        max_body_bytes: int | None = None,
        shadow_max_inflight: int | None = None,
        shadow_sender: str | None = None,
        shadow_queue_bytes: int | None = None,
    ) -> None:
        self.routes = Routes(routes_path)
        self.max_body_bytes = max_body_bytes or int(
            os.environ.get("MLOPS_SERVE_MAX_BODY_BYTES") or DEFAULT_SERVING_MAX_BODY_BYTES
        )
        self.shadow_max_inflight = max(
            0,
            shadow_max_inflight
            if shadow_max_inflight is not None
            else int(os.environ.get("MLOPS_ROUTER_SHADOW_MAX_INFLIGHT") or DEFAULT_SHADOW_MAX_INFLIGHT),
        )
        self.inflight: Counter[str] = Counter()
        self.served = 0
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.shadow_sender_mode = shadow_sender or os.environ.get("MLOPS_ROUTER_SHADOW_SENDER") or "process"
        self.shadow_queue_bytes = shadow_queue_bytes or int(
            os.environ.get("MLOPS_ROUTER_SHADOW_QUEUE_BYTES") or DEFAULT_SHADOW_QUEUE_BYTES
        )
        #: copies sent from this loop (``inline``, or what the sender process cannot take)
        self.shadow_inline = ShadowCopies(self.client, self.shadow_max_inflight)
        self.shadow_sender: ShadowSender | None = None
        self._sender_failed = False
        self._sender_started = 0.0
        self.random = random.Random()
        self.split_generation: Any = None
        self.split_since = _now()
        self.split: dict[str, Counter[str]] = {}
        self.split_ms: dict[str, deque[float]] = {}

    def _split_for(self, routes: dict[str, Any]) -> None:
        """Start the per-backend figures afresh when the routes file changed (a new weight, a switch)."""
        generation = routes.get("generation", 0)
        if generation != self.split_generation:
            self.split_generation = generation
            self.split_since = _now()
            self.split = {}
            self.split_ms = {}

    def _count(self, backend: str, what: str) -> None:
        self.split.setdefault(backend, Counter())[what] += 1

    def _choose(self, routes: dict[str, Any]) -> str | None:
        """The backend of a new request: the canary for ``canary_weight`` percent of them, else the active."""
        active, canary = routes.get("active"), routes.get("canary")
        if canary and active and canary != active:
            try:
                weight = float(routes.get("canary_weight") or 0)
            except (TypeError, ValueError):
                weight = 0.0
            if weight > 0 and self.random.random() * 100 < weight:
                return canary
        return active

    def client(self, backend: str) -> httpx.AsyncClient:
        if backend not in self.clients:
            self.clients[backend] = httpx.AsyncClient(
                base_url=backend,
                timeout=httpx.Timeout(60.0, connect=5.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self.clients[backend]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == STATUS_PATH:
            await self._status(send)
            return
        # the body is buffered to be forwarded: never more of it than the servers behind would take
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        chunks: list[bytes] = []
        size = int(length) if length.isdigit() else 0
        more = size <= self.max_body_bytes
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += 0 if length else len(chunks[-1])
            more = message.get("more_body", False) and size <= self.max_body_bytes
        if size > self.max_body_bytes:
            await self._reply(send, 413, json.dumps({"error": self.too_large}).encode())
            return
        body = b"".join(chunks)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request_id = next((v for k, v in headers if k.lower() == REQUEST_ID_HEADER), None)
        if request_id is None:
            request_id = uuid.uuid4().hex.encode()
            headers.append((REQUEST_ID_HEADER, request_id))
        target = scope["path"] + (
            ("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else ""
        )
        routes = self.routes.current()
        self._split_for(routes)
        backend = self._choose(routes)
        if not backend:
            await self._reply(send, 503, b'{"error": "no backend is deployed behind this address yet."}')
            return
        started = time.perf_counter()
        for attempt in range(2):
            # charged to the backend the request is sent to, and given back to that same backend: a retry
            # below moves to another backend, and the drain of the old one waits on this count
            sent_to = backend
            self.inflight[sent_to] += 1
            self._count(sent_to, "requests")
            sent_at = time.perf_counter()
            try:
                response = await self.client(sent_to).request(
                    scope["method"], target, content=body, headers=headers
                )
            except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # the backend went away (refused the connection, or died with the request in flight): once,
                # the request goes to the backend that is active now, else to the standby the deployer
                # keeps alive during a switch (the version that served before)
                self._count(sent_to, "errors_connection")
                routes = self.routes.current()
                other = next(
                    (b for b in (routes.get("active"), routes.get("standby")) if b and b != sent_to), None
                )
                if attempt == 0 and other:
                    self._count(sent_to, "fallbacks")
                    backend = other
                    continue
                await self._reply(send, 502, b'{"error": "the active backend does not accept connections."}')
                return
            finally:
                self.inflight[sent_to] -= 1
                if not self.inflight[sent_to]:
                    del self.inflight[sent_to]
            if response.status_code >= 500:
                self._count(sent_to, "errors_5xx")
                active = self.routes.current().get("active")
                if attempt == 0 and sent_to == routes.get("canary") and active and active != sent_to:
                    # the canary is on probation: its server errors are the active's to answer
                    self._count(sent_to, "fallbacks")
                    backend = active
                    continue
            else:
                self.split_ms.setdefault(sent_to, deque(maxlen=SPLIT_LATENCY_SAMPLES)).append(
                    (time.perf_counter() - sent_at) * 1000
                )
            break
        self.served += 1
        took_ms = (time.perf_counter() - started) * 1000
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.encode("latin-1").lower() not in HOP_BY_HOP
        ]
        out_headers.append((b"content-length", str(len(response.content)).encode()))
        out_headers.append((b"x-mlops-backend", backend.encode("latin-1")))
        if not any(k.lower() == REQUEST_ID_HEADER for k, _ in out_headers):
            out_headers.append((REQUEST_ID_HEADER, request_id))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": response.content})
        shadow = routes.get("shadow")
        if shadow and shadow != backend and scope["method"] == "POST":
            self._mirror(shadow, scope["method"], target, body, headers, took_ms)

    @property
    def shadow_tasks(self) -> set[asyncio.Task[None]]:
        """Copies in flight from the router's own loop."""
        return self.shadow_inline.tasks

    def _mirror(
        self, shadow: str, method: str, target: str, body: bytes, headers: list, active_ms: float
    ) -> None:
        """Hand a copy of an answered request to the shadow sender (never waiting: dropped and counted when
        its queue is full), else send it from this loop in the background."""
        sender = self._sender()
        if sender is not None and sender.hand(
            marshal.dumps((shadow, method, target, headers, active_ms, body))
        ):
            return
        self.shadow_inline.submit(shadow, method, target, headers, active_ms, body)

    def _sender(self) -> ShadowSender | None:
        """The shadow sender process, started on the first copy (``None`` inline, or when it cannot run)."""
        if self.shadow_sender_mode != "process" or self._sender_failed:
            return None
        if self.shadow_sender is None or not self.shadow_sender.alive:
            if self.shadow_sender is not None and time.monotonic() - self._sender_started < 60:
                # it ended within a minute of its start: no restart loop on production's path
                log.warning(
                    "The shadow sender ended again; copies are sent from the router's loop from now on"
                )
                self._sender_failed = True
                return None
            try:
                self.shadow_sender = ShadowSender(self.shadow_max_inflight, self.shadow_queue_bytes)
            except OSError as err:
                log.warning(
                    "Cannot start the shadow sender (%s); copies are sent from the router's loop", err
                )
                self._sender_failed = True
                return None
            self._sender_started = time.monotonic()
        return self.shadow_sender

    def shadow_status(self, backend: str | None) -> dict[str, Any]:
        """The shadow copies' counts (see the module docstring), from the sender and this loop together."""
        inline = self.shadow_inline.status()
        remote = self.shadow_sender.status() if self.shadow_sender is not None else None
        both = [inline, remote] if remote else [inline]
        latency = remote["latency_ms"] if remote and (remote["latency_ms"] or {}).get("shadow") else None
        return {
            "backend": backend,
            **{
                k: sum(part.get(k, 0) for part in both)
                for k in ("sent", "skipped", "failed", "inflight", "queued")
            },
            "max_inflight": self.shadow_max_inflight,
            "sender": {
                "mode": "process" if self.shadow_sender is not None else "inline",
                "pid": self.shadow_sender.process.pid if self.shadow_sender is not None else None,
            },
            "latency_ms": latency or inline["latency_ms"],
        }

    @property
    def too_large(self) -> str:
        return (
            f"the request body is larger than the service's limit of {self.max_body_bytes} bytes "
            "([mlops] serving_max_body_bytes, MLOPS_SERVE_MAX_BODY_BYTES on the server); send fewer rows per "
            "request."
        )

    async def _status(self, send: Any) -> None:
        routes = self.routes.current()
        self._split_for(routes)
        body = json.dumps(
            {
                "active": routes.get("active"),
                "generation": routes.get("generation", 0),
                "version": routes.get("version"),
                "inflight": {k: v for k, v in self.inflight.items() if v},
                "served": self.served,
                "shadow": self.shadow_status(routes.get("shadow")),
                "canary": {
                    "backend": routes.get("canary"),
                    "version": routes.get("canary_version"),
                    "weight": routes.get("canary_weight"),
                }
                if routes.get("canary")
                else None,
                "split": self.split_status(),
                "pid": os.getpid(),
            }
        ).encode()
        await self._reply(send, 200, body)

    def split_status(self) -> dict[str, Any]:
        """The per-backend figures since the routes file last changed (see the module docstring)."""
        backends = {}
        for backend, counts in self.split.items():
            backends[backend] = {
                "requests": counts["requests"],
                "errors_5xx": counts["errors_5xx"],
                "errors_connection": counts["errors_connection"],
                "fallbacks": counts["fallbacks"],
                "latency_ms": _percentiles(self.split_ms.get(backend) or ()),
            }
        return {"generation": self.split_generation, "since": self.split_since, "backends": backends}

    @staticmethod
    async def _reply(send: Any, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.shadow_inline.cancel()
                if self.shadow_sender is not None:
                    self.shadow_sender.close()
                for client in self.clients.values():
                    await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _summary(values: deque[float]) -> dict[str, float] | None:
    """Mean and p99 of ``values`` (milliseconds), ``None`` when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "mean": round(sum(ordered) / len(ordered), 3), "p99": round(p99, 3)}


def _percentiles(values: Any) -> dict[str, float] | None:
    """``n``, p50 and p99 of ``values`` (milliseconds), ``None`` when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return {
        "n": n,
        "p50": round(ordered[min(n - 1, int(0.5 * n))], 3),
        "p99": round(ordered[min(n - 1, int(0.99 * n))], 3),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--routes", help="routes file written by the deployer")
    parser.add_argument("--shadow-sender", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument(
        "--shadow-max-inflight", type=int, default=DEFAULT_SHADOW_MAX_INFLIGHT, help=argparse.SUPPRESS
    )
    parser.add_argument("--frame-bytes", type=int, default=DEFAULT_SHADOW_QUEUE_BYTES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shadow_sender is not None:  # started by a router (ShadowSender)
        run_shadow_sender(args.shadow_sender, args.shadow_max_inflight, args.frame_bytes)
        return
    if args.port is None or not args.routes:
        parser.error("--port and --routes are required")
    uvicorn.run(
        RouterApp(args.routes),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
