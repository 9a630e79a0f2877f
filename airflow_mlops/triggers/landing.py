"""Async trigger that waits for a batch to land: polls an ``ObjectStoragePath`` until it exists.

Used by :class:`airflow_mlops.sensors.landing.LandedBatchSensor` in deferrable mode, so a day whose
batch is late waits in the triggerer instead of holding a worker slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class LandedBatchTrigger(BaseTrigger):
    """Fire once the file or folder at ``uri`` exists.

    The existence check is blocking I/O (local stat or an object-store request), so it runs in a
    worker thread (``asyncio.to_thread``) and never blocks the triggerer's event loop.

    Events: ``{"status": "success", "uri": ...}`` when the batch is there; ``{"status": "error",
    "uri": ..., "message": ...}`` when the store cannot be asked (bad connection, permissions).

    :param uri: full URI of the batch (``file://``, ``s3://``, ``gs://``).
    :param poke_interval: seconds between two checks.
    :param conn_id: Airflow connection for a remote store.
    """

    def __init__(self, uri: str, poke_interval: float = 60.0, conn_id: str | None = None) -> None:
        super().__init__()
        self.uri = uri
        self.poke_interval = poke_interval
        self.conn_id = conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"uri": self.uri, "poke_interval": self.poke_interval, "conn_id": self.conn_id},
        )

    def _exists(self) -> bool:
        from airflow_mlops.artifacts import as_path, reaching

        path = as_path(self.uri, conn_id=self.conn_id)
        with reaching(path):
            return path.exists()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        checks = 0
        while True:
            checks += 1
            try:
                found = await asyncio.to_thread(self._exists)
            except Exception as err:  # any store error ends the wait with a readable event
                yield TriggerEvent(
                    {"status": "error", "uri": self.uri, "message": f"{type(err).__name__}: {err}"}
                )
                return
            if found:
                self.log.info("Batch %s has landed (check %d)", self.uri, checks)
                yield TriggerEvent({"status": "success", "uri": self.uri})
                return
            self.log.debug(
                "Batch %s not there yet (check %d); next in %s s", self.uri, checks, self.poke_interval
            )
            await asyncio.sleep(self.poke_interval)
