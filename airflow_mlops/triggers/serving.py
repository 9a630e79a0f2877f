"""Async trigger that waits until a served model endpoint is ready (HTTP 200 from its readiness path).

Used by :class:`airflow_mlops.sensors.serving.BentoEndpointSensor` and by
:class:`airflow_mlops.operators.serving.BentoDeployOperator` in deferrable mode: a freshly started Bento
loads its model for a few seconds, and that wait runs in the triggerer, not in a worker slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class BentoEndpointTrigger(BaseTrigger):
    """Fire once ``GET <url><ready_path>`` answers 200, or when ``timeout`` seconds have passed.

    Polls with ``httpx.AsyncClient`` (no blocking call on the triggerer's event loop).

    Events: ``{"status": "ready", "url": ..., "body": ...}``; ``{"status": "timeout", "url": ...,
    "message": ...}`` naming the last answer or connection error.

    :param url: base URL of the endpoint, e.g. ``http://127.0.0.1:3101``.
    :param ready_path: readiness path (BentoML's ``/readyz``; the service's ``/ready`` also says why not).
    :param timeout: seconds to wait in total.
    :param poll_interval: seconds between two checks.
    """

    def __init__(
        self, url: str, ready_path: str = "/readyz", timeout: float = 300.0, poll_interval: float = 1.0
    ) -> None:
        super().__init__()
        self.url = url
        self.ready_path = ready_path
        self.timeout = timeout
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "url": self.url,
                "ready_path": self.ready_path,
                "timeout": self.timeout,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        deadline = time.monotonic() + self.timeout
        last = "no answer yet"
        target = self.url.rstrip("/") + self.ready_path
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                try:
                    response = await client.get(target)
                    if response.status_code == 200:
                        self.log.info("Endpoint %s is ready", self.url)
                        yield TriggerEvent({"status": "ready", "url": self.url, "body": response.text[:2000]})
                        return
                    last = f"HTTP {response.status_code}: {response.text[:500]}"
                except httpx.HTTPError as err:
                    last = f"{type(err).__name__}: {err}"
                if time.monotonic() >= deadline:
                    yield TriggerEvent(
                        {
                            "status": "timeout",
                            "url": self.url,
                            "message": f"{target} was not ready after {self.timeout:g} s; last answer: {last}",
                        }
                    )
                    return
                await asyncio.sleep(self.poll_interval)
