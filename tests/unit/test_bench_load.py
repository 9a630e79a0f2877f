"""The benchmarks' load generator (``benchmarks/bench_serving.py``): its open loop counts queueing.

A closed-loop client waits for each answer before sending the next request, so a server stall delays the
requests that would have been sent meanwhile and only one slow latency is recorded (coordinated omission).
The open loop sends on a fixed schedule and counts each latency from the request's scheduled send time:
every request due during the stall shows the wait a user would have seen.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_serving  # noqa: E402

STALL = 0.4


async def _against_stalling_server(rate: float | None) -> dict:
    """``_load`` for 1 s against a server answering one request at a time whose first answer takes ``STALL`` s."""
    from aiohttp import web

    lock = asyncio.Lock()
    answered = 0

    async def predict(request: web.Request) -> web.Response:
        nonlocal answered
        await request.read()
        async with lock:
            if answered == 0:
                await asyncio.sleep(STALL)
            answered += 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await bench_serving._load(
            f"http://127.0.0.1:{port}",
            "/predict",
            [{"row": {"x": 1}}],
            clients=1,
            start_at=time.time() + 0.2,
            warmup=0.0,
            seconds=1.0,
            rate=rate,
        )
    finally:
        await runner.cleanup()


@pytest.mark.timeout(60)
def test_open_loop_keeps_its_schedule_and_charges_a_stall_to_every_request_due_during_it():
    result = asyncio.run(_against_stalling_server(rate=100))
    # the schedule holds whatever the answers: 100 requests in the 1 s window, none failed
    assert len(result["latencies"]) == 100
    assert result["errors"] == 0
    # the requests due in the first 0.2 s of the 0.4 s stall each waited at least 0.2 s from their send time
    assert sum(latency >= 0.2 for latency in result["latencies"]) >= 15

    closed = asyncio.run(_against_stalling_server(rate=None))
    # the closed loop sees the same stall as a single slow request
    assert sum(latency >= 0.2 for latency in closed["latencies"]) == 1
