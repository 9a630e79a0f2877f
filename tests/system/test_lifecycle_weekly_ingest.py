"""System test: the reference spec's weekly ingest, run through Airflow for real (``DAG.test()``).

``dags/flights.yaml`` lands one batch per week of data time; the ingest DAG the factory builds from it
validates the whole week with the flights suite and publishes it as seven daily ``date=`` partitions
(New York days), so everything downstream reads the same layout as with daily batches. A week holding
a flight of another week fails validation and goes to quarantine, leaving the offline store as it was.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlops_testing import asset_events, flights_dag

from airflow_mlops.config import load_settings

pytestmark = pytest.mark.system

WEEK = [f"2013-01-0{d}" for d in range(1, 8)]


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def daily_batch(day: str) -> Path:
    return local(load_settings().landing_root) / "flights" / f"date={day}" / "flights.parquet"


def weekly_batch(first: str) -> Path:
    return local(load_settings().landing_root) / "flights" / f"week={first}" / "flights.parquet"


def partition(day: str) -> Path:
    return local(load_settings().offline_root) / "flights" / f"date={day}" / "part-0.parquet"


def land_week(first: str, days: list[str], extra: pa.Table | None = None) -> None:
    tables = [pq.read_table(daily_batch(day)) for day in days] + ([extra] if extra is not None else [])
    target = weekly_batch(first)
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), target)


def run_week(dag, first: str):
    start = datetime.fromisoformat(first).replace(tzinfo=UTC)
    return dag.test(logical_date=start + timedelta(days=7))


@pytest.fixture(scope="module")
def weekly_ingest(airflow_db, landed_week):
    dag = flights_dag("flights_ingest", daily=False)
    assert dag.timetable.summary and "7 days" in str(dag.timetable.summary)
    return dag


def test_a_weekly_batch_is_validated_once_and_published_as_seven_daily_partitions(weekly_ingest):
    for day in WEEK:
        shutil.rmtree(partition(day).parent, ignore_errors=True)
    land_week(WEEK[0], WEEK)

    dag_run = run_week(weekly_ingest, WEEK[0])

    assert dag_run.state == "success", {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    for day in WEEK:
        landed = pq.read_table(daily_batch(day))
        published = pq.read_table(partition(day))
        assert published.num_rows == landed.num_rows > 600, day
        assert sorted(published["flight"].to_pylist()) == sorted(landed["flight"].to_pylist())
    events = [e for e in asset_events("flights_offline") if e["run_id"] == dag_run.run_id]
    assert len(events) == 1
    assert events[0]["extra"]["partitions"] == [f"date={day}" for day in WEEK]
    assert events[0]["extra"]["rows"] == sum(pq.read_table(daily_batch(d)).num_rows for d in WEEK)


def test_a_week_holding_another_weeks_flight_is_quarantined_and_publishes_nothing(weekly_ingest):
    import pyarrow.compute as pc

    from airflow_mlops.artifacts import as_path, sha256_of

    row = pq.read_table(daily_batch("2013-01-07")).slice(0, 1)
    later = row.set_column(
        row.schema.get_field_index("time_hour"),
        "time_hour",
        pc.add(row["time_hour"], pa.scalar(timedelta(days=7), pa.duration("us"))).cast(row["time_hour"].type),
    )  # the flight's hour moved into the next week
    land_week(WEEK[0], WEEK, extra=later)
    before = {day: partition(day).exists() and sha256_of(as_path(str(partition(day)))) for day in WEEK}

    dag_run = run_week(weekly_ingest, WEEK[0])

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert states["validate_batch"] == "failed" and states["publish_to_offline_store"] != "success"
    quarantine = load_settings().state_dir / "quarantine" / "flights" / f"week={WEEK[0]}"
    assert (quarantine / "flights.parquet").exists() and not weekly_batch(WEEK[0]).exists()
    assert "time_hour" in (quarantine / "flights.parquet.validation.json").read_text()
    after = {day: partition(day).exists() and sha256_of(as_path(str(partition(day)))) for day in WEEK}
    assert after == before
