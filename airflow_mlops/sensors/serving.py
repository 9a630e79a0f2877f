"""Sensor that waits until a served model endpoint answers its readiness probe."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.configuration import conf

from airflow_mlops.exceptions import ServingError
from airflow_mlops.triggers.serving import BentoEndpointTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


def probe(url: str, ready_path: str = "/readyz", timeout: float = 5.0) -> tuple[bool, str]:
    """One readiness check: (ready?, what was seen)."""
    import httpx

    target = url.rstrip("/") + ready_path
    try:
        response = httpx.get(target, timeout=timeout)
    except httpx.HTTPError as err:
        return False, f"{type(err).__name__}: {err}"
    return response.status_code == 200, f"HTTP {response.status_code}: {response.text[:500]}"


class BentoEndpointSensor(BaseSensorOperator):
    """Wait until ``GET <url><ready_path>`` answers 200 (a Bento has loaded its model).

    :param url: base URL of the endpoint (templated).
    :param ready_path: readiness path, BentoML's ``/readyz`` by default (templated).
    :param deferrable: wait in the triggerer (:class:`BentoEndpointTrigger`); default
        ``[operators] default_deferrable``.
    """

    template_fields: Sequence[str] = ("url", "ready_path")

    def __init__(
        self,
        *,
        url: str,
        ready_path: str = "/readyz",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 1.0)
        kwargs.setdefault("timeout", 300.0)
        super().__init__(**kwargs)
        self.url = url
        self.ready_path = ready_path
        self.deferrable = deferrable

    def poke(self, context: Context) -> PokeReturnValue:
        ready, seen = probe(self.url, self.ready_path)
        self.log.info("Endpoint %s: %s", self.url, seen)
        return PokeReturnValue(is_done=ready, xcom_value={"url": self.url, "ready": ready})

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if probe(self.url, self.ready_path)[0]:
            return {"url": self.url, "ready": True}
        self.defer(
            trigger=BentoEndpointTrigger(
                url=self.url,
                ready_path=self.ready_path,
                timeout=float(self.timeout),
                poll_interval=float(self.poke_interval),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout) + 60),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "ready":
            raise ServingError(
                event.get("message") or f"endpoint {event.get('url')} did not become ready.",
                fix="read the server log of the deployment (<state_dir>/deployments/logs/) for the cause.",
            )
        return {"url": event["url"], "ready": True}
