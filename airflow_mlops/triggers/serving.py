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

#: fewest requests the canary must have had in a step before its error rate can end the step early
EARLY_MIN_REQUESTS = 10


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


class CanaryStepTrigger(BaseTrigger):
    """Wait out one step of a canary deploy; fire early when the canary's error rate already breaches.

    Until ``until`` (a UNIX time) it reads the router's ``/__router__`` every ``poll_interval`` seconds and
    compares the canary's error rate with the active version's (:func:`airflow_mlops.ml.canary.error_breach`
    with ``guardrails``), so a version that fails its requests is rolled back within seconds, not at the end
    of the step (once it had :data:`EARLY_MIN_REQUESTS` requests). The deploy task evaluates every guardrail when it resumes, whichever event woke it.

    Events: ``{"status": "step_done", ...}`` at ``until``; ``{"status": "breach", "message": ...}`` early.
    Each carries ``router_url``, ``canary_url`` and ``generation`` (the routes' generation of the step).

    :param router_url: the deployment's stable address (its router).
    :param active_url: the live version's backend.
    :param canary_url: the canary's backend.
    :param generation: the routes' generation this step's weight was written with.
    :param until: when the step ends (UNIX time, seconds).
    :param guardrails: the canary's guardrails (a dict of :class:`~airflow_mlops.ml.canary.Guardrails`).
    :param poll_interval: seconds between two reads of the router.
    """

    def __init__(
        self,
        router_url: str,
        active_url: str,
        canary_url: str,
        generation: int,
        until: float,
        guardrails: dict[str, Any] | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self.router_url = router_url
        self.active_url = active_url
        self.canary_url = canary_url
        self.generation = generation
        self.until = until
        self.guardrails = guardrails
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "router_url": self.router_url,
                "active_url": self.active_url,
                "canary_url": self.canary_url,
                "generation": self.generation,
                "until": self.until,
                "guardrails": self.guardrails,
                "poll_interval": self.poll_interval,
            },
        )

    def _event(self, status: str, **extra: Any) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "router_url": self.router_url,
                "canary_url": self.canary_url,
                "generation": self.generation,
                **extra,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        from airflow_mlops.ml.canary import Guardrails, backend_figures, error_breach

        guardrails = Guardrails.parse(self.guardrails)
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                left = self.until - time.time()
                if left <= 0:
                    yield self._event("step_done")
                    return
                try:
                    response = await client.get(self.router_url.rstrip("/") + "/__router__")
                    split = response.json().get("split") or {} if response.status_code == 200 else {}
                except (httpx.HTTPError, ValueError):
                    split = {}
                if split.get("generation") == self.generation:
                    old = backend_figures(split, self.active_url)
                    new = backend_figures(split, self.canary_url)
                    why = (
                        error_breach(old, new, guardrails) if new["requests"] >= EARLY_MIN_REQUESTS else None
                    )
                    if why:
                        self.log.info("Canary %s breaches early: %s", self.canary_url, why)
                        yield self._event("breach", message=why)
                        return
                await asyncio.sleep(max(0.05, min(self.poll_interval, left)))
