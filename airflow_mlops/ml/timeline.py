"""Drift-to-retrained time: how long the platform took from a drifted batch landing to the retrained
model being served, read from Airflow's REST API (v2, Airflow 3) after the fact.

The moments, all from Airflow's own records:

1. ``landed_at``: the drifted batch was seen landed: the end of ``landed_task`` (the ingest DAG's
   landing sensor) in the ingest run whose data interval starts on the event's ``data_time`` day;
2. ``drift_event_at``: the drift Asset event was recorded (by the monitor, or by an ``AssetWatcher``);
3. ``retraining_started_at``: the train run the event triggered started;
4. ``served_at``: ``served_task`` of that run (the blue/green deploy with its health check) ended
   successfully: the retrained model answers on the endpoint.

Of the runs the event triggered (watchers are at-least-once; several events can share a run) the one
that reached ``served_task`` counts; a run the retraining gate held back never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.ml.retraining import event_figures


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)


def timeline(
    event: Mapping[str, Any],
    *,
    landed_at: datetime | None,
    train_run: Mapping[str, Any] | None,
    served: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The moments and durations of one drift-to-retrained path (pure: no I/O).

    :param event: the drift Asset event (REST shape: ``id``, ``timestamp``, ``extra``).
    :param landed_at: when the drifted batch was seen landed (None: unknown).
    :param train_run: the train DAG run that retrained (REST shape: ``dag_run_id``, ``start_date``).
    :param served: the task instance that served the retrained model (``end_date``).
    """
    figures = event_figures(event.get("extra"))
    moments = {
        "landed_at": landed_at,
        "drift_event_at": _time(event.get("timestamp")),
        "retraining_started_at": _time((train_run or {}).get("start_date")),
        "served_at": _time((served or {}).get("end_date")),
    }
    return {
        "event_id": figures.get("event_id"),
        "data_time": figures.get("data_time"),
        "retraining_run_id": (train_run or {}).get("dag_run_id"),
        **{k: v.isoformat() if v else None for k, v in moments.items()},
        "seconds": {
            "landing_to_drift_event": _seconds(moments["landed_at"], moments["drift_event_at"]),
            "drift_event_to_served": _seconds(moments["drift_event_at"], moments["served_at"]),
            "landing_to_served": _seconds(moments["landed_at"], moments["served_at"]),
        },
        "served": moments["served_at"] is not None,
    }


def drift_to_retrained(
    api: Any,
    event_id: str,
    *,
    drift_asset: str,
    train_dag: str,
    served_task: str = "deploy",
    ingest_dag: str | None = None,
    landed_task: str = "wait_for_batch",
) -> dict[str, Any]:
    """Drift-to-retrained time of the drift event ``event_id`` (see the module docstring).

    :param api: an ``httpx.Client`` whose ``base_url`` is the REST API (``http://host:port/api/v2``),
        with whatever authentication the deployment needs.
    :param drift_asset: name of the drift Asset the event is on.
    :param train_dag: the DAG scheduled on that Asset (a lifecycle's ``<dag_prefix>_train``).
    :param served_task: the task of ``train_dag`` whose successful end means the model is served.
    :param ingest_dag: the DAG that ingests each day's batch, e.g. ``<dag_prefix>_ingest`` (default
        None: no landing time).
    :param landed_task: the task of ``ingest_dag`` that sees the batch landed.
    :return: :func:`timeline`'s dict.
    :raises MLOpsInputError: the Asset or the event does not exist.
    """

    def get(path: str, **params: Any) -> Any:
        response = api.get(path, params=params)
        if response.status_code != 200:
            raise MLOpsInputError(
                f"Airflow REST API answered {response.status_code} to GET {path}: {response.text[:300]}",
                fix="check the API URL and credentials of the client.",
            )
        return response.json()

    assets = [
        a for a in get("/assets", name_pattern=drift_asset, limit=100)["assets"] if a["name"] == drift_asset
    ]
    if not assets:
        raise MLOpsInputError(f"Asset {drift_asset!r} does not exist.", fix="check drift_asset=.")
    events = get("/assets/events", asset_id=assets[0]["id"], limit=100, order_by="-timestamp")["asset_events"]
    matching = [e for e in events if event_figures(e.get("extra")).get("event_id") == event_id]
    if not matching:
        raise MLOpsInputError(
            f"no event with event_id {event_id!r} on Asset {drift_asset!r} (among its newest {len(events)}).",
            fix="pass the event_id the drift check returned or the watcher fired.",
        )
    event = min(matching, key=lambda e: e["timestamp"])  # the first delivery counts

    landed_at = None
    day = str(event_figures(event.get("extra")).get("data_time") or "")[:10]
    if ingest_dag and day:
        start = date.fromisoformat(day)
        runs = get(
            f"/dags/{ingest_dag}/dagRuns",
            logical_date_gte=f"{start}T00:00:00Z",
            logical_date_lte=f"{start + timedelta(days=1)}T00:00:00Z",
        )["dag_runs"]
        runs = [r for r in runs if str(r.get("data_interval_start") or "")[:10] == day]
        if runs:
            ti = get(f"/dags/{ingest_dag}/dagRuns/{runs[0]['dag_run_id']}/taskInstances/{landed_task}")
            landed_at = _time(ti.get("end_date"))

    train_run = served = None
    candidates = get(f"/dags/{train_dag}/dagRuns", run_type=["asset_triggered"], order_by="-id", limit=100)
    for run in candidates["dag_runs"]:
        response = api.get(f"/dags/{train_dag}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")
        if response.status_code != 200:  # Airflow 3.3.2 answers 500 while the run is still queued
            continue
        if not any(e["id"] == event["id"] for e in response.json()["asset_events"]):
            continue
        ti = get(f"/dags/{train_dag}/dagRuns/{run['dag_run_id']}/taskInstances/{served_task}")
        if ti.get("state") == "success":
            train_run, served = run, ti
            break
        train_run = train_run or run  # triggered, not (yet) served
    return timeline(event, landed_at=landed_at, train_run=train_run, served=served)
