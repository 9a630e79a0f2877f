"""Helpers shared by the test modules (a module of its own: several folders have a ``conftest.py``,
so importing from ``conftest`` would get whichever was loaded first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the DAG folder is on sys.path for Airflow's DAG processor and tasks (modules next to the DAG files, such
#: as the flights feature steps ``flights_features``, import from there): the same for the tests
DAGS = ROOT / "dags"
if str(DAGS) not in sys.path:
    sys.path.append(str(DAGS))


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv with the suite's environment (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


FLIGHTS_SPEC = ROOT / "dags" / "flights.yaml"
#: the flights lifecycle with daily batches (the reference spec's demo cadence is weekly)
DAILY_INGEST = {
    "ingest": {
        "cadence": "daily",
        "landing_path": "flights/date={{ data_interval_start | ds }}/flights.parquet",
    }
}


def flights_dag(dag_id: str, overrides: dict | None = None, *, daily: bool = True):
    """One DAG of the reference flights lifecycle (``dags/flights.yaml``), built by the factory.

    :param overrides: merged over the spec, e.g. ``{"serving": {"port": 3911}}``.
    :param daily: ingest daily batches (``flights/date=<day>/flights.parquet``), as the suite lands them.
    """
    from airflow_mlops.lifecycle import lifecycle_dags

    merged: dict = {}
    for part in (DAILY_INGEST if daily else {}, overrides or {}):
        for key, value in part.items():
            merged[key] = {**merged.get(key, {}), **value}
    return lifecycle_dags(FLIGHTS_SPEC, merged)[dag_id]


def run_day(dag, day):
    """Run ``dag`` through Airflow (``DAG.test()``) for the data interval [day, day + 1 day)."""
    from datetime import timedelta

    return dag.test(logical_date=day + timedelta(days=1))


def asset_events(asset_name: str) -> list[dict]:
    """Events recorded in Airflow's database for the Asset named ``asset_name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.source_run_id, AssetEvent.timestamp)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == asset_name)
            .order_by(AssetEvent.timestamp)
        ).all()
    return [{"extra": extra, "run_id": run_id, "timestamp": ts} for extra, run_id, ts in rows]


# ------------------------------------------------------------------------------------------ Seattle examples
def seattle_weather():
    """Seattle's daily weather 2012-2015 (``vega_datasets``), read by file path from the installed package
    (its module is never imported), dates as UTC midnights."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("vega_datasets")
    assert spec is not None and spec.submodule_search_locations, "vega_datasets is not installed"
    csv = Path(next(iter(spec.submodule_search_locations))) / "_data" / "seattle-weather.csv"
    frame = pd.read_csv(csv, parse_dates=["date"])
    frame["date"] = frame["date"].dt.tz_localize("UTC").astype("datetime64[us, UTC]")
    return frame


def land_seattle_week(frame, landing: Path, first) -> Path:
    """Land the week of ``frame`` starting on day ``first`` where the Seattle ingest waits for it."""
    import pandas as pd

    start = pd.Timestamp(first, tz="UTC")
    week = frame[(frame["date"] >= start) & (frame["date"] < start + pd.Timedelta(days=7))]
    target = landing / "seattle" / f"week={start.date().isoformat()}" / "weather.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    week.to_parquet(target, index=False)
    return target


def utc_midnight(day):
    """``day`` (a date) at 00:00 UTC, as a logical date for ``dag.test``."""
    from datetime import UTC, datetime

    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def task_states(dag_run) -> dict[str, str]:
    """``{task_id: state}`` of a finished DAG run."""
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def task_xcom(dag_run, task_id: str):
    """The return value of ``task_id`` in ``dag_run``."""
    ti = next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id)
