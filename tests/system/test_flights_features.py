"""System test: the reference DAG ``flights_features`` run through Airflow for real (``DAG.test()``)
after ``flights_ingest`` published a day, checked on the online store and the Asset events it
produced; a rerun changes nothing."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pandas as pd
import pytest
from mlops_testing import ROOT, asset_events, flights_dag, run_day

from airflow_mlops.config import load_settings
from airflow_mlops.demo.data import read_table
from airflow_mlops.hooks.feast import FeastHook

pytestmark = pytest.mark.system

DAY = "2013-01-02"
STATS_KNOWN_AT = pd.Timestamp("2013-01-03T06:00:00", tz="America/New_York")  # 06:00 the next morning


def _online_snapshot() -> dict:
    with sqlite3.connect(load_settings().state_dir / "feast" / "online_store.db") as con:
        tables = [
            r[0] for r in con.execute("select name from sqlite_master where type='table' order by name")
        ]
        return {t: sorted(con.execute(f'select * from "{t}"').fetchall()) for t in tables}


@pytest.fixture(scope="module")
def first_run(airflow_db, landed_week):
    ingest = run_day(flights_dag("flights_ingest"), datetime(2013, 1, 2, tzinfo=UTC))
    assert ingest.state == "success"
    dag_run = flights_dag("flights_features").test(run_conf={"day": DAY})
    return dag_run


def _offline_flights() -> pd.DataFrame:
    """The flights partitions of the 7-day window ending on DAY that are in the offline store."""
    root = load_settings().offline_root.removeprefix("file://")
    days = pd.date_range(end=DAY, periods=7).strftime("%Y-%m-%d")
    frames = [
        pd.read_parquet(f"{root}/flights/date={d}/part-0.parquet")
        for d in days
        if (pd.io.common.file_exists(f"{root}/flights/date={d}/part-0.parquet"))
    ]
    return pd.concat(frames, ignore_index=True)


def test_the_flights_feature_step_comes_from_next_to_the_spec_not_from_the_provider(first_run):
    daily_stats = flights_dag("flights_features").task_dict["daily_stats"]
    assert type(daily_stats).__module__ == "flights_features"  # dags/flights_features.py
    import airflow_mlops.operators.features as provider

    assert not hasattr(provider, "FlightDailyStatsOperator")
    labelled = load_settings().offline_root.removeprefix("file://") + f"/flights_labelled/date={DAY}"
    assert set(pd.read_parquet(labelled)["delayed"].dropna().unique()) == {0, 1}


def test_the_day_reaches_the_online_store(first_run):
    assert first_run.state == "success"
    hook = FeastHook(repo_path=str(ROOT / "feature_repo"))
    online = hook.online_features("delay_model", [{"origin": "JFK", "carrier": "UA", "tailnum": "N14228"}])

    flights = _offline_flights()
    ua = flights[flights["carrier"] == "UA"]
    assert online["carrier_daily__flights_7d"] == [len(ua)]
    assert online["carrier_daily__arr_delay_mean_7d"][0] == pytest.approx(ua["arr_delay"].mean())
    assert online["carrier_daily__as_of"] == [STATS_KNOWN_AT.tz_convert("UTC").to_pydatetime()]
    jfk = flights[flights["origin"] == "JFK"]
    assert online["origin_daily__cancel_rate_7d"][0] == pytest.approx(jfk["dep_time"].isna().mean())

    weather = read_table("weather")
    known = weather[(weather["origin"] == "JFK") & (weather["time_hour"] <= STATS_KNOWN_AT)]
    latest = known.sort_values("time_hour").iloc[-1]
    assert online["weather_hourly__as_of"] == [latest["time_hour"].to_pydatetime()]
    assert online["weather_hourly__temp"] == [latest["temp"]]
    assert online["plane__seats"] == [149]  # N14228, a Boeing 737-824


def test_each_feature_view_asset_gets_the_rows_written(first_run):
    planes = read_table("planes")["tailnum"].nunique()
    expected = {"weather_hourly": 3, "origin_daily": 3, "plane": planes}
    for view, rows in expected.items():
        events = [e for e in asset_events(f"feast_{view}") if e["run_id"] == first_run.run_id]
        assert len(events) == 1, view
        assert events[0]["extra"]["rows"] == rows, view
        assert events[0]["extra"]["feature_view"] == view
    carrier_events = [e for e in asset_events("feast_carrier_daily") if e["run_id"] == first_run.run_id]
    assert carrier_events[0]["extra"]["rows"] == _offline_flights()["carrier"].nunique()


def test_a_rerun_changes_nothing(first_run):
    before = _online_snapshot()
    stats = load_settings().offline_root.removeprefix("file://") + f"/carrier_daily/date={DAY}/part-0.parquet"
    stats_before = pd.read_parquet(stats)
    rerun = flights_dag("flights_features").test(run_conf={"day": DAY})
    assert rerun.state == "success"
    assert _online_snapshot() == before
    pd.testing.assert_frame_equal(pd.read_parquet(stats), stats_before)


def test_days_whose_events_started_no_run_are_materialized_by_the_next_run_and_then_nothing_is(first_run):
    """Airflow 3.3 can leave the last offline-store events of a burst without a run (apache/airflow#56050):
    3 and 4 January are published, their events start nothing, and the next features run (one that
    names no day: a run started by another event, or the follow-up run) materializes both."""
    from mlops_testing import task_states, task_xcom

    for day in (3, 4):
        assert run_day(flights_dag("flights_ingest"), datetime(2013, 1, day, tzinfo=UTC)).state == "success"
    run = flights_dag("flights_features").test()
    assert run.state == "success", task_states(run)
    assert task_xcom(run, "feature_window")["days"] == ["2013-01-03", "2013-01-04"]
    offline = load_settings().offline_root.removeprefix("file://")
    for day in ("2013-01-03", "2013-01-04"):
        assert len(pd.read_parquet(f"{offline}/flights_labelled/date={day}")) > 0, day
    hook = FeastHook(repo_path=str(ROOT / "feature_repo"))
    online = hook.online_features("delay_model", [{"origin": "JFK", "carrier": "UA", "tailnum": "N14228"}])
    known = pd.Timestamp("2013-01-05T06:00:00", tz="America/New_York")  # 4 January's statistics
    assert online["carrier_daily__as_of"] == [known.tz_convert("UTC").to_pydatetime()]

    # nothing new: the next run (a duplicate event, say) does nothing at all
    before = _online_snapshot()
    again = flights_dag("flights_features").test()
    states = task_states(again)
    assert again.state == "success" and set(states.values()) == {"skipped"}, states
    assert _online_snapshot() == before
