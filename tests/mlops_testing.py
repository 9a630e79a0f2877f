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
