"""EvidentlyDriftOperator on the real flights of 2013, with the real Evidently 0.7.

Reference: January-March flights joined with their origin's weather. The current windows are written
as offline-store partitions (``<offline_root>/flights/date=YYYY-MM-DD/part-0.parquet``) and joined with
the weather table at check time, as the monitor DAG does. A spring week is calm, a July week drifts
(its weather is far outside the winter reference), and only the drifted run emits the Asset event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_mlops.artifacts import ArtifactStore, as_path
from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.operators.drift import (
    FLIGHTS_DRIFT_COLUMNS,
    FLIGHTS_DRIFT_SHARE,
    EvidentlyDriftOperator,
    drift_alias,
)

WEATHER = ["temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
SPRING = ("2013-05-01", "2013-05-07")
JULY = ("2013-07-15", "2013-07-21")


class FakeTI:
    def __init__(self, run_id: str) -> None:
        self.dag_id, self.run_id, self.task_id = "monitor", run_id, "drift"
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@pytest.fixture(scope="module")
def flights_store(tmp_path_factory) -> dict[str, str]:
    """Reference parquet (Jan-Mar with weather) and offline partitions of the spring and July weeks."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.demo.data import read_table

    root = tmp_path_factory.mktemp("drift")
    flights = read_table("flights")
    weather = read_table("weather")[["origin", "time_hour", *WEATHER]]
    day = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    reference = flights[day < "2013-04-01"].merge(weather, on=["origin", "time_hour"], how="left")
    reference_uri = root / "reference.parquet"
    reference.to_parquet(reference_uri, index=False)
    offline = root / "offline"
    for start, end in (SPRING, JULY):
        for date in pd.date_range(start, end).strftime("%Y-%m-%d"):
            part = offline / "flights" / f"date={date}" / "part-0.parquet"
            part.parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(flights[day == date], preserve_index=False), part)
    (offline / "weather").mkdir()
    weather.to_parquet(offline / "weather" / "weather.parquet", index=False)
    return {"reference_uri": f"file://{reference_uri}", "offline_root": f"file://{offline}"}


def run_check(store: dict[str, str], window_end: str, run_id: str, **kwargs: Any) -> tuple[dict, Any, FakeTI]:
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    asset = Asset(name="flight_delay_drift", uri="mlops://models/flight_delay/drift")
    op = EvidentlyDriftOperator(
        task_id="drift",
        model_name="flight_delay",
        reference_uri=store["reference_uri"],
        offline_root=store["offline_root"],
        joins=[{"uri": "weather/weather.parquet", "on": ["origin", "time_hour"], "columns": WEATHER}],
        columns=FLIGHTS_DRIFT_COLUMNS,
        drift_share=FLIGHTS_DRIFT_SHARE,
        window_end=window_end,
        window_days=7,
        drift_asset=asset,
        **kwargs,
    )
    ti = FakeTI(run_id)
    events = OutletEventAccessors()
    result = op.execute({"ti": ti, "outlet_events": events, "run_id": run_id})
    return result, events[drift_alias(asset)], ti


def test_spring_week_is_calm_and_emits_nothing(flights_store: dict[str, str]) -> None:
    result, alias_events, ti = run_check(flights_store, SPRING[1], "spring")

    assert result["drift_detected"] is False
    assert result["window"] == {
        "start": SPRING[0],
        "end": SPRING[1],
        "rows": result["window"]["rows"],
        "source": "offline_store",
    }
    assert 6000 < result["window"]["rows"] < 8000
    assert result["drift_share"] < FLIGHTS_DRIFT_SHARE
    assert set(result["columns"]) == set(FLIGHTS_DRIFT_COLUMNS)
    # spring is warmer than winter, but within what the thresholds accept
    assert 1.0 < result["columns"]["temp"]["score"] < FLIGHTS_DRIFT_COLUMNS["temp"]["threshold"]
    assert alias_events.asset_alias_events == []
    assert Path(as_path(result["report_uri"]).path).stat().st_size > 10_000
    assert ti.xcom["_link_DriftReportLink"].endswith("drift_report.html")


def test_july_week_drifts_writes_report_and_emits_event_with_figures(flights_store: dict[str, str]) -> None:
    result, alias_events, _ = run_check(flights_store, JULY[1], "july")

    assert result["drift_detected"] is True
    assert result["drift_share"] >= FLIGHTS_DRIFT_SHARE
    assert {"temp", "dewp"} <= set(result["drifted_columns"])
    assert result["drifted_columns"]["temp"] >= FLIGHTS_DRIFT_COLUMNS["temp"]["threshold"]
    # network and schedule columns did not move: the drift is the weather
    assert not {"carrier", "origin", "hour"} & set(result["drifted_columns"])

    report = Path(as_path(result["report_uri"]).path)
    assert report.name == "drift_report.html" and "monitor/july/drift" in str(report)
    assert "temp" in report.read_text(errors="replace")
    summary = json.loads(Path(as_path(result["summary_uri"]).path).read_text())
    assert summary["drifted_columns"] == result["drifted_columns"]

    [event] = alias_events.asset_alias_events
    assert event.dest_asset_key.name == "flight_delay_drift"
    assert event.extra["drift_share"] == result["drift_share"]
    assert event.extra["drifted_columns"] == result["drifted_columns"]
    assert event.extra["window_end"] == JULY[1] and event.extra["data_time"] == JULY[1]
    assert event.extra["event_id"] == result["event_id"]
    json.dumps(event.extra)  # the figures are plain JSON


def test_reference_statistics_are_cached_once(flights_store: dict[str, str]) -> None:
    first, _, _ = run_check(flights_store, SPRING[1], "cache-1")
    stats = Path(as_path(first["reference"]["stats_uri"]).path)
    written = stats.stat().st_mtime_ns
    second, _, _ = run_check(flights_store, JULY[1], "cache-2")
    assert second["reference"]["key"] == first["reference"]["key"]
    assert stats.stat().st_mtime_ns == written
    body = json.loads(stats.read_text())
    assert body["meta"]["rows"] == first["reference"]["rows"] > 80_000
    assert abs(sum(body["columns"]["temp"]["shares"]) - 1) < 1e-9
    assert ArtifactStore().settings.artifact_root in first["reference"]["stats_uri"]


def test_empty_window_fails_clearly(flights_store: dict[str, str]) -> None:
    with pytest.raises(MLOpsInputError, match=r"drift window 2013-09-01\.\.2013-09-07 is empty"):
        run_check(flights_store, "2013-09-07", "empty")
