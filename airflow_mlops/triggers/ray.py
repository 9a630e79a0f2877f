"""Async trigger that waits for a Ray Job to end, used by the deferrable :class:`RayTuneOperator`.

It asks the cluster's Jobs REST API over async HTTP (:class:`~airflow_mlops.hooks.ray.RayJobsApi`):
the triggerer never imports Ray and its event loop is never blocked. Only reading the Airflow
connection, once, runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

LOG_TAIL_CHARS = 4000


class RayJobTrigger(BaseTrigger):
    """Poll a Ray Job until it is ``SUCCEEDED``, ``FAILED`` or ``STOPPED``.

    Events: ``{"status": "success", "job_id", "job_status", "result_uri"}`` when the job succeeded;
    ``{"status": "error", "job_id", "job_status", "result_uri", "message"}`` otherwise (the message ends
    with the tail of the job's log), also when the cluster cannot be asked.

    :param job_id: the Ray Job submission id.
    :param ray_conn_id: the ``ray`` connection of the cluster.
    :param result_uri: where the job writes its ``result.json`` (handed back in the event).
    :param poll_interval: seconds between two status requests.

    When a user clears the deferred task or marks it failed or succeeded, Airflow (3.3+) calls
    :meth:`on_kill` in the triggerer, which stops the job: ``BaseOperator.on_kill`` is not called for a
    deferred task, and a job left running would keep writing into the tune state the next try uses.
    :meth:`cleanup` (run on every exit, also when the triggerer restarts or hands the trigger to another
    triggerer) leaves the job alone.
    """

    def __init__(self, job_id: str, ray_conn_id: str, result_uri: str, poll_interval: float = 10.0) -> None:
        super().__init__()
        self.job_id = job_id
        self.ray_conn_id = ray_conn_id
        self.result_uri = result_uri
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "ray_conn_id": self.ray_conn_id,
                "result_uri": self.result_uri,
                "poll_interval": self.poll_interval,
            },
        )

    def _jobs_api(self) -> Any:
        from airflow_mlops.hooks.ray import RayHook

        return RayHook(ray_conn_id=self.ray_conn_id).jobs_api()

    async def _log_tail(self, api: Any) -> str:
        try:
            return (await api.logs(self.job_id))[-LOG_TAIL_CHARS:]
        except Exception as err:
            return f"(job log not available: {err})"

    def _event(self, status: str, job_status: str, message: str | None = None) -> TriggerEvent:
        payload = {
            "status": status,
            "job_id": self.job_id,
            "job_status": job_status,
            "result_uri": self.result_uri,
        }
        if message is not None:
            payload["message"] = message
        return TriggerEvent(payload)

    async def on_kill(self) -> None:
        """Stop the job: the user cleared the deferred task or marked it failed or succeeded."""
        try:
            api = await asyncio.to_thread(self._jobs_api)
            async with api:
                stopped = await api.stop(self.job_id)
        except Exception as err:  # logged, never raised: the task's new state stands
            self.log.warning("Could not stop Ray Job %s: %s: %s", self.job_id, type(err).__name__, err)
            return
        self.log.info("Ray Job %s %s", self.job_id, "stopped" if stopped else "had already ended")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_mlops.hooks.ray import TERMINAL_JOB_STATES

        try:  # the connection is read by the synchronous hook: off the event loop
            api = await asyncio.to_thread(self._jobs_api)
        except Exception as err:
            yield self._event(
                "error",
                "UNKNOWN",
                f"cannot ask the Ray cluster about job {self.job_id}: {type(err).__name__}: {err}",
            )
            return
        previous = None
        async with api:
            while True:
                try:
                    job_status = await api.status(self.job_id)
                except Exception as err:  # unreachable cluster, unknown job: end with a readable event
                    yield self._event(
                        "error",
                        "UNKNOWN",
                        f"cannot get the status of Ray Job {self.job_id}: {type(err).__name__}: {err}",
                    )
                    return
                if job_status != previous:
                    self.log.info("Ray Job %s is %s", self.job_id, job_status)
                    previous = job_status
                if job_status in TERMINAL_JOB_STATES:
                    if job_status == "SUCCEEDED":
                        yield self._event("success", job_status)
                    else:
                        tail = await self._log_tail(api)
                        yield self._event(
                            "error",
                            job_status,
                            f"Ray Job {self.job_id} ended {job_status}. Last lines of its log:\n{tail}",
                        )
                    return
                await asyncio.sleep(self.poll_interval)
