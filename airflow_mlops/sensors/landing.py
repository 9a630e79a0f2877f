"""Wait for a raw batch to land in the landing zone before the ingest DAG validates it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.configuration import conf

from airflow_mlops.artifacts import as_path, reaching
from airflow_mlops.config import load_settings
from airflow_mlops.exceptions import MLOpsError
from airflow_mlops.operators.offline_store import resolve_uri
from airflow_mlops.triggers.landing import LandedBatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class LandedBatchSensor(BaseSensorOperator):
    """Wait until a batch (file or folder) exists; returns its full URI.

    Deferrable: the wait then runs in the triggerer (:class:`LandedBatchTrigger`) and holds no worker
    slot. It checks once in the worker first, so a batch that is already there costs no deferral.

    :param uri: the batch, as a URI or a path relative to ``[mlops] landing_root`` (templated).
    :param conn_id: Airflow connection for a remote store.
    :param deferrable: wait in the triggerer; default ``[operators] default_deferrable``.
    """

    template_fields: Sequence[str] = ("uri",)
    ui_color = "#e8e4f8"

    def __init__(
        self,
        *,
        uri: str,
        conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.uri = uri
        self.conn_id = conn_id
        self.deferrable = deferrable

    def resolved_uri(self) -> str:
        return resolve_uri(str(self.uri), load_settings().landing_root)

    def poke(self, context: Context) -> PokeReturnValue:
        uri = self.resolved_uri()
        path = as_path(uri, conn_id=self.conn_id)
        with reaching(path):
            found = path.exists()
        self.log.info("Batch %s %s", uri, "has landed" if found else "has not landed yet")
        return PokeReturnValue(is_done=found, xcom_value=uri if found else None)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        uri = self.resolved_uri()
        if self.poke(context):
            return uri
        self.defer(
            trigger=LandedBatchTrigger(
                uri=uri, poke_interval=float(self.poke_interval), conn_id=self.conn_id
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)) if self.timeout is not None else None,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> str:
        """Resume after the trigger fired; all state comes from ``event``."""
        if event.get("status") != "success":
            raise MLOpsError(
                f"waiting for batch {event.get('uri')!r} failed: {event.get('message')}.",
                fix="check the store's connection and permissions, then clear the task.",
            )
        self.log.info("Batch %s has landed", event["uri"])
        return event["uri"]
