"""System test: ``flights_ingest`` with validation, run through Airflow for real (``DAG.test()``).

Good days are validated and published with their Asset events; a bad day fails in ``validate_batch``,
ends in quarantine (moved, with its result beside it) and leaves the offline store untouched, while the
next good day still lands; a day whose batch lands late waits deferred in the (inline) triggerer.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlops_testing import asset_events, flights_dag, run_day

from airflow_mlops.config import load_settings
from airflow_mlops.demo.data import land
from airflow_mlops.operators.validation import ValidationReportLink
from airflow_mlops.triggers.landing import LandedBatchTrigger

pytestmark = pytest.mark.system


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def landed(day: str) -> Path:
    return local(load_settings().landing_root) / "flights" / f"date={day}" / "flights.parquet"


def partition(day: str) -> Path:
    return local(load_settings().offline_root) / "flights" / f"date={day}" / "part-0.parquet"


def quarantined(day: str) -> Path:
    return load_settings().state_dir / "quarantine" / "flights" / f"date={day}"


def xcom(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id,
                XComModel.key == key,
            )
        )
    if not isinstance(value, str | bytes):
        return value
    try:
        return json.loads(value)
    except ValueError:  # a plain string is stored as it is
        return value


def states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def day_of(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def dag(airflow_db, landed_week):
    dag = flights_dag("flights_ingest")
    sensor = dag.get_task("wait_for_batch")
    sensor.poke_interval = 0.5  # the DAG's 60 s would slow the late-batch test
    sensor.timeout = 120  # and its 6 hours would hide a batch that never comes
    return dag


def test_good_days_are_validated_and_published(dag) -> None:
    for day, rows in (("2013-01-05", 720), ("2013-01-06", 832)):
        dag_run = run_day(dag, day_of(day))
        assert states(dag_run) == {
            "wait_for_batch": "success",
            "validate_batch": "success",
            "publish_to_offline_store": "success",
        }
        assert dag_run.state == "success"
        summary = xcom(dag_run, "validate_batch")
        assert (summary["success"], summary["rows"], summary["failed"], summary["evaluated"]) == (
            True,
            rows,
            0,
            59,
        )
        assert local(summary["docs_uri"]).read_text().startswith("<!DOCTYPE html>")
        # the plugin's report URL under Airflow's [api] base_url (the components run with one set)
        assert "/mlops/reports/" in xcom(dag_run, "validate_batch", ValidationReportLink().xcom_key)
        assert pq.read_table(partition(day)).equals(pq.read_table(landed(day)))
        events = [e for e in asset_events("flights_offline") if e["run_id"] == dag_run.run_id]
        assert [(e["extra"]["partition"], e["extra"]["rows"]) for e in events] == [(f"date={day}", rows)]


def test_a_bad_day_is_quarantined_and_the_next_good_day_still_lands(dag) -> None:
    land(start="2013-01-08", end="2013-01-09")
    bad = landed("2013-01-08")
    table = pq.read_table(bad)
    pq.write_table(pa.concat_tables([table, table.slice(0, 3)]), bad)  # three flights delivered twice
    bad_bytes = bad.read_bytes()

    dag_run = run_day(dag, day_of("2013-01-08"))
    assert dag_run.state == "failed"
    assert states(dag_run) == {
        "wait_for_batch": "success",
        "validate_batch": "failed",
        "publish_to_offline_store": "upstream_failed",
    }
    assert not partition("2013-01-08").exists()
    assert not [e for e in asset_events("flights_offline") if e["run_id"] == dag_run.run_id]
    assert not bad.exists()
    assert (quarantined("2013-01-08") / "flights.parquet").read_bytes() == bad_bytes
    beside = json.loads((quarantined("2013-01-08") / "flights.parquet.validation.json").read_text())
    assert [(f["expectation"], f["column"]) for f in beside["failed_expectations"]] == [
        ("expect_compound_columns_to_be_unique", ["carrier", "flight", "time_hour"])
    ]
    # the report link is there even though the task failed: that is when it is needed
    assert xcom(dag_run, "validate_batch", ValidationReportLink().xcom_key).endswith("validation_report.html")

    dag_run = run_day(dag, day_of("2013-01-09"))
    assert dag_run.state == "success"
    assert pq.read_table(partition("2013-01-09")).num_rows == pq.read_table(landed("2013-01-09")).num_rows
    events = [e for e in asset_events("flights_offline") if e["run_id"] == dag_run.run_id]
    assert [e["extra"]["partition"] for e in events] == ["date=2013-01-09"]


def test_a_late_batch_is_awaited_in_the_triggerer(
    dag, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    day = "2013-01-10"
    land(start=day, end=day)
    held = tmp_path / "held"
    shutil.move(landed(day).parent, held)
    checks: list[str] = []
    real_exists = LandedBatchTrigger._exists

    def exists_landing_on_second_check(trigger: LandedBatchTrigger) -> bool:
        # the batch arrives while the task is deferred: the trigger's first check misses it
        checks.append(trigger.uri)
        if len(checks) == 2:
            shutil.move(held, landed(day).parent)
        return real_exists(trigger)

    monkeypatch.setattr(LandedBatchTrigger, "_exists", exists_landing_on_second_check)
    dag_run = run_day(dag, day_of(day))
    assert checks == [f"file://{landed(day)}"] * 2
    assert dag_run.state == "success"
    assert xcom(dag_run, "wait_for_batch") == f"file://{landed(day)}"
    assert pq.read_table(partition(day)).num_rows == pq.read_table(landed(day)).num_rows
