"""Feature-store operators without Feast: templating, intervals, Asset outlets, the daily statistics on
small hand-made data, the training-set manifest (hook patched) and the features DAG's day macro."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flights_features import FlightDailyStatsOperator  # dags/flights_features.py (dags/ is on sys.path)

from airflow_mlops.demo.data import flights_schema
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.operators.features import (
    FeastApplyOperator,
    FeastMaterializeOperator,
    FeastTrainingDatasetOperator,
    FeatureSourceSnapshotOperator,
    parse_timestamp,
)

ROOT = Path(__file__).resolve().parents[3]


class _Events(dict):
    def __missing__(self, key):
        self[key] = event = SimpleNamespace(extra=None)
        return event


def _context(**extra):
    return {"ti": SimpleNamespace(dag_id="d", run_id="r", task_id="t"), "outlet_events": _Events(), **extra}


def test_templated_arguments_are_kept_as_given():
    template = "{{ data_interval_start }}"
    op = FeastMaterializeOperator(task_id="m", repo_path="{{ var.value.repo }}", start=template, end=template)
    assert (op.repo_path, op.start, op.end) == ("{{ var.value.repo }}", template, template)
    assert set(FeastMaterializeOperator.template_fields) == {"repo_path", "start", "end", "feature_views"}
    assert set(FeastTrainingDatasetOperator.template_fields) >= {
        "entity_uri",
        "feature_service",
        "start",
        "end",
    }
    assert FlightDailyStatsOperator(task_id="s", start_day="{{ ds }}").start_day == "{{ ds }}"
    assert FeastApplyOperator.template_fields == ("repo_path",)


def test_listed_feature_views_get_one_asset_outlet_each():
    op = FeastMaterializeOperator(task_id="m", feature_views=["weather_hourly", "plane"])
    assert [o.name for o in op.outlets] == ["feast_weather_hourly", "feast_plane"]
    assert FeastMaterializeOperator(task_id="n", feature_views="{{ params.views }}").outlets == []


def test_the_interval_is_the_data_interval_minus_the_overlap(monkeypatch):
    calls = []

    def fake_materialize(self, start, end, views):
        calls.append((start, end, views))
        return {"weather_hourly": 3}

    monkeypatch.setattr(FeastHook, "materialize", fake_materialize)
    monkeypatch.setattr(FeastHook, "online_store_type", property(lambda self: "sqlite"))
    op = FeastMaterializeOperator(task_id="m", feature_views=["weather_hourly"], overlap=timedelta(hours=6))
    context = _context(
        data_interval_start=datetime(2013, 1, 2, tzinfo=UTC),
        data_interval_end=datetime(2013, 1, 3, tzinfo=UTC),
    )
    result = op.execute(context)
    assert calls == [
        (datetime(2013, 1, 1, 18, tzinfo=UTC), datetime(2013, 1, 3, tzinfo=UTC), ["weather_hourly"])
    ]
    assert result["rows"] == {"weather_hourly": 3}
    assert context["outlet_events"][op.outlets[0]].extra == {
        "feature_view": "weather_hourly",
        "rows": 3,
        "start": "2013-01-01T18:00:00+00:00",
        "end": "2013-01-03T00:00:00+00:00",
    }


def test_bad_intervals_are_refused_with_the_fix():
    with pytest.raises(MLOpsArgumentError, match="has no time zone"):
        parse_timestamp("2013-01-02T00:00:00", "start")
    with pytest.raises(MLOpsArgumentError, match="is not an ISO-8601 timestamp"):
        parse_timestamp("yesterday", "start")
    assert parse_timestamp("2013-01-02T01:00:00+01:00", "start") == datetime(2013, 1, 2, tzinfo=UTC)
    op = FeastMaterializeOperator(
        task_id="m", start="2013-01-02T00:00:00+00:00", end="2013-01-01T00:00:00+00:00"
    )
    with pytest.raises(MLOpsArgumentError, match="is not after start"):
        op._interval(_context())
    with pytest.raises(MLOpsArgumentError, match="no interval to materialize"):
        FeastMaterializeOperator(task_id="m")._interval(_context())


def test_a_snapshot_needs_exactly_one_time_source():
    with pytest.raises(MLOpsArgumentError, match="exactly one of timestamp_column and as_of"):
        FeatureSourceSnapshotOperator(task_id="s", source_uri="x", table="t")


def test_a_snapshot_refuses_naive_timestamps_naming_the_column(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    path = tmp_path / "w.parquet"
    pd.DataFrame({"origin": ["JFK"], "time_hour": [pd.Timestamp("2013-01-01 05:00")]}).to_parquet(path)
    op = FeatureSourceSnapshotOperator(
        task_id="s", source_uri=str(path), table="weather", timestamp_column="time_hour"
    )
    with pytest.raises(MLOpsInputError, match="column 'time_hour' of table .* not a tz-aware timestamp"):
        op.execute(_context())


def _flights(day: str, rows: list[tuple]) -> pa.Table:
    """Flights of one day: (carrier, origin, arr_delay, dep_delay, cancelled, hour, minute)."""
    frame = pd.DataFrame(
        [
            {
                "year": 2013,
                "month": int(day[5:7]),
                "day": int(day[8:]),
                "dep_time": None if cancelled else 900.0,
                "sched_dep_time": hour * 100 + minute,
                "dep_delay": None if cancelled else dep,
                "arr_time": None if cancelled else 1100.0,
                "sched_arr_time": 1100,
                "arr_delay": arr,
                "carrier": carrier,
                "flight": 1,
                "tailnum": "N1",
                "origin": origin,
                "dest": "ORD",
                "air_time": 100.0,
                "distance": 700.0,
                "hour": hour,
                "minute": minute,
                "time_hour": pd.Timestamp(f"{day} {hour:02d}:00", tz="America/New_York").tz_convert("UTC"),
            }
            for carrier, origin, arr, dep, cancelled, hour, minute in rows
        ]
    )
    return pa.Table.from_pandas(frame, schema=flights_schema(), preserve_index=False)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    root = tmp_path / "offline"
    days = {
        "2013-03-08": [("AA", "JFK", 30.0, 20.0, False, 9, 15), ("AA", "JFK", None, None, True, 10, 0)],
        "2013-03-09": [("AA", "JFK", -10.0, 0.0, False, 9, 5), ("UA", "EWR", 16.0, 10.0, False, 18, 30)],
    }
    for day, rows in days.items():
        (root / "flights" / f"date={day}").mkdir(parents=True)
        pq.write_table(_flights(day, rows), root / "flights" / f"date={day}" / "part-0.parquet")
    return root


def test_daily_statistics_roll_over_the_window_and_are_known_the_next_morning(offline):
    result = FlightDailyStatsOperator(task_id="s", start_day="2013-03-09", window_days=2).execute(_context())
    assert result["rows"] == {"carrier_daily": 2, "origin_daily": 2, "flights_labelled": 2}
    stats = pd.read_parquet(offline / "carrier_daily" / "date=2013-03-09" / "part-0.parquet").set_index(
        "carrier"
    )
    aa = stats.loc["AA"]
    assert aa["flights_7d"] == 3
    assert aa["arr_delay_mean_7d"] == pytest.approx(10.0)  # (30 - 10) / 2, the cancelled flight has none
    assert aa["delayed_rate_7d"] == pytest.approx(0.5)
    assert aa["cancel_rate_7d"] == pytest.approx(1 / 3)
    # 06:00 New York time on 10 March 2013, the first day of daylight saving time: 10:00 UTC
    assert aa["event_timestamp"] == pd.Timestamp("2013-03-10T10:00:00Z")
    assert aa["as_of"] == aa["event_timestamp"]
    labelled = pd.read_parquet(offline / "flights_labelled" / "date=2013-03-09" / "part-0.parquet")
    assert labelled["event_timestamp"].tolist() == [
        pd.Timestamp("2013-03-09T14:05:00Z"),  # 09:05 EST
        pd.Timestamp("2013-03-09T23:30:00Z"),  # 18:30 EST
    ]
    assert labelled["delayed"].tolist() == [0, 1]


def test_daily_statistics_need_the_day_itself(offline):
    with pytest.raises(
        MLOpsInputError, match=r"offline partition .*flights/date=2013-03-10/part-0.parquet' does not"
    ):
        FlightDailyStatsOperator(task_id="s", start_day="2013-03-10").execute(_context())
    with pytest.raises(MLOpsArgumentError, match="is not a YYYY-MM-DD day"):
        FlightDailyStatsOperator(task_id="s", start_day="10/03/2013").execute(_context())


def test_the_training_set_manifest(offline, monkeypatch, tmp_path):
    FlightDailyStatsOperator(task_id="s", start_day="2013-03-08", end_day="2013-03-09").execute(_context())
    service = SimpleNamespace(
        feature_view_projections=[
            SimpleNamespace(
                name_to_use=lambda: "carrier_daily", features=[SimpleNamespace(name="flights_7d")]
            )
        ]
    )
    monkeypatch.setattr(FeastHook, "feature_service", lambda self, name: service)

    def joined(self, entity_df, name):
        assert str(entity_df["event_timestamp"].dtype).endswith("UTC]")
        return entity_df.assign(carrier_daily__flights_7d=1.0)

    monkeypatch.setattr(FeastHook, "historical_features", joined)
    op = FeastTrainingDatasetOperator(
        task_id="t",
        repo_path=str(ROOT / "feature_repo"),
        entity_uri="flights_labelled",
        feature_service="svc",
        label_column="delayed",
        task="binary",
    )
    manifest = op.execute(_context())
    assert manifest["rows"] == 3 and manifest["dropped_unlabelled"] == 1  # the cancelled flight
    assert (manifest["task"], manifest["classes"]) == ("binary", [0, 1])
    assert manifest["label_balance"] == {"positive": 2, "negative": 1, "positive_rate": round(2 / 3, 6)}
    assert manifest["feature_refs"] == ["carrier_daily:flights_7d"]
    assert manifest["time_range"] == {
        "start": "2013-03-08T14:15:00+00:00",
        "end": "2013-03-09T23:30:00+00:00",
    }
    data = Path(manifest["data_uri"].removeprefix("file://")).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert Path(manifest["manifest_uri"].removeprefix("file://")).exists()

    missing = FeastTrainingDatasetOperator(
        task_id="t",
        repo_path=str(ROOT / "feature_repo"),
        entity_uri="nowhere",
        feature_service="svc",
        label_column="delayed",
    )
    with pytest.raises(MLOpsInputError, match="entity dataframe .*nowhere' does not exist"):
        missing.execute(_context())


def _labelled_rows(tmp_path, monkeypatch, labels: list) -> FeastTrainingDatasetOperator:
    """Entity rows with the given labels in the offline store, the Feast join patched to add one feature;
    returns a training-set operator over them (set its ``task``)."""
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    rows = tmp_path / "offline" / "rows"
    rows.mkdir(parents=True)
    stamps = pd.date_range("2013-03-01", periods=len(labels), freq="h", tz="UTC").astype(
        "datetime64[us, UTC]"
    )
    pd.DataFrame({"event_timestamp": stamps, "key": range(len(labels)), "target": labels}).to_parquet(
        rows / "part-0.parquet"
    )
    service = SimpleNamespace(
        feature_view_projections=[
            SimpleNamespace(name_to_use=lambda: "stats", features=[SimpleNamespace(name="mean_7d")])
        ]
    )
    monkeypatch.setattr(FeastHook, "feature_service", lambda self, name: service)
    monkeypatch.setattr(
        FeastHook, "historical_features", lambda self, entity_df, name: entity_df.assign(stats__mean_7d=1.0)
    )
    return FeastTrainingDatasetOperator(
        task_id="t",
        repo_path=str(ROOT / "feature_repo"),
        entity_uri="rows",
        feature_service="svc",
        label_column="target",
    )


def _written(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("training_set*"))


@pytest.mark.parametrize(
    ("task", "labels", "message"),
    [
        (
            "binary",
            [1, 1, 1, None],
            r"label column 'target' .* has 1 distinct values \(1\.0\); a binary model",
        ),
        ("multiclass", ["rain", "sun", "rain"], r"has 2 distinct values \('rain', 'sun'\); a multiclass"),
        (
            "regression",
            ["rain", "sun", "fog"],
            r"holds object values .*'fog'.* regression model needs numbers",
        ),
        ("binary", [0.5, 1.5, 0.5], r"holds fractional numbers \(0.5, 1.5\); a binary model"),
    ],
)
def test_a_label_that_does_not_fit_the_task_leaves_no_training_set(
    tmp_path, monkeypatch, task, labels, message
):
    op = _labelled_rows(tmp_path, monkeypatch, labels)
    op.task = task
    with pytest.raises(MLOpsInputError, match=message) as refused:
        op.execute(_context())
    assert refused.value.fix  # names what to do (e.g. set task: multiclass)
    assert _written(tmp_path) == []  # neither the data nor the manifest


def test_an_unknown_task_is_refused_when_the_dag_is_parsed():
    with pytest.raises(MLOpsArgumentError, match="task 'clasification' is not known") as refused:
        FeastTrainingDatasetOperator(
            task_id="t", entity_uri="rows", feature_service="svc", label_column="y", task="clasification"
        )
    assert "binary, multiclass, regression" in refused.value.fix
    # the older name of a binary model is still understood
    assert (
        FeastTrainingDatasetOperator(
            task_id="t", entity_uri="rows", feature_service="svc", label_column="y", task="classification"
        ).task
        == "binary"
    )


def test_the_manifest_describes_multiclass_and_regression_labels(tmp_path, monkeypatch):
    op = _labelled_rows(tmp_path, monkeypatch, ["rain", "sun", "fog", "rain"])
    op.task = "multiclass"
    manifest = op.execute(_context())
    assert (manifest["task"], manifest["classes"]) == ("multiclass", ["fog", "rain", "sun"])
    assert manifest["label_balance"] == {"classes": {"fog": 1, "rain": 2, "sun": 1}}

    op = _labelled_rows(tmp_path / "regression", monkeypatch, [1.5, 2.5, 4.0, 4.0])
    op.task = "regression"
    manifest = op.execute(_context())
    assert (manifest["task"], manifest["classes"]) == ("regression", [])
    assert manifest["label_balance"] == {"mean": 3.0, "std": pytest.approx(1.224745), "min": 1.5, "max": 4.0}


def test_the_features_dag_processes_the_days_named_by_the_asset_events():
    from functools import partial

    from airflow_mlops.lifecycle import lifecycle_dags
    from airflow_mlops.lifecycle.factory import feature_window

    dag = lifecycle_dags(ROOT / "dags" / "flights.yaml")["flights_features"]
    window_of = partial(
        feature_window, timezone="America/New_York", available_after_hours=6, dag_id="flights_features"
    )
    assert dag.user_defined_macros["feature_window"].keywords == window_of.keywords
    events = {"flights_offline": [SimpleNamespace(extra={"partition": f"date=2013-01-0{d}"}) for d in (3, 2)]}
    window = window_of(events, SimpleNamespace(conf={}))
    assert window == {
        "first": "2013-01-02",
        "last": "2013-01-03",
        "start": "2013-01-02T05:00:00+00:00",  # midnight in New York
        "end": "2013-01-04T11:00:00+00:00",  # 06:00 New York time after the last day
    }
    assert window_of({}, SimpleNamespace(conf={"day": "2013-07-04"}))["end"] == "2013-07-05T10:00:00+00:00"
    with pytest.raises(MLOpsArgumentError, match="names no day"):
        window_of({}, SimpleNamespace(conf={}))
    assert {t.task_id for t in dag.tasks} == {
        "feature_window",
        "publish_weather",
        "publish_planes",
        "daily_stats",
        "feast_apply",
        "materialize",
        "materialize_planes",
        "record_materialized",
    }
    # the steps take their days from the run's first task, not from the events
    assert dag.task_dict["daily_stats"].start_day == "{{ ti.xcom_pull(task_ids='feature_window').first }}"
    assert dag.task_dict["feature_window"].downstream_task_ids == {
        "publish_weather",
        "publish_planes",
        "daily_stats",
        "record_materialized",  # it records the versions the first task saw
    }
    assert dag.task_dict["record_materialized"].upstream_task_ids == {"feature_window", "materialize_planes"}


# ------------------------------------------------------------------ days due to a features run
def _publish_days(offline: Path, days: list[str], rows: int = 3) -> None:
    for day in days:
        folder = offline / "flights" / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        flights = [("UA", "JFK", 10.0 + i, 5.0, False, 9, i) for i in range(rows)]
        pq.write_table(_flights(day, flights), folder / "part-0.parquet")


def _features_run(offline: Path, key: str, events_days: list[str], conf: dict | None = None):
    """The two ends of a features run: the days due, then (the steps having run) their record."""
    from airflow.sdk.exceptions import AirflowSkipException

    from airflow_mlops.operators.features import FeatureDaysRecordOperator, FeaturePendingDaysOperator

    events = {"flights_offline": [SimpleNamespace(extra={"partition": f"date={d}"}) for d in events_days]}
    pending = FeaturePendingDaysOperator(
        task_id="feature_window",
        table="flights",
        timezone="America/New_York",
        available_after_hours=6,
        state_key=key,
        offline_root=str(offline),
    )
    context = _context(triggering_asset_events=events, dag_run=SimpleNamespace(conf=conf or {}))
    try:
        window = pending.execute(context)
    except AirflowSkipException:
        return None, None
    record = FeatureDaysRecordOperator(
        task_id="record_materialized",
        window=window,
        table="flights",
        state_key=key,
        offline_root=str(offline),
    )
    return window, record.execute(_context())


def test_a_features_run_takes_every_published_day_not_yet_materialized_not_only_the_event_s(tmp_path):
    offline = tmp_path / "offline"
    _publish_days(offline, ["2013-03-08", "2013-03-09", "2013-03-10"])
    # the events of 9 and 10 March were never queued (apache/airflow#56050): the run names 8 March only
    window, recorded = _features_run(offline, "one", ["2013-03-08"])
    assert window["days"] == ["2013-03-08", "2013-03-09", "2013-03-10"]
    assert (window["first"], window["last"]) == ("2013-03-08", "2013-03-10")
    assert window["end"] == "2013-03-11T10:00:00+00:00"  # 06:00 New York time after the last day
    assert recorded == {"recorded": window["days"], "published_meanwhile": []}
    # a second run with nothing new (a duplicate event) does nothing
    assert _features_run(offline, "one", ["2013-03-10"]) == (None, None)


def test_a_day_republished_with_other_rows_is_due_again_and_an_identical_rewrite_is_not(tmp_path):
    offline = tmp_path / "offline"
    _publish_days(offline, ["2013-03-08", "2013-03-09"])
    _features_run(offline, "two", ["2013-03-08"])
    _publish_days(offline, ["2013-03-09"])  # the same rows written again
    assert _features_run(offline, "two", []) == (None, None)
    _publish_days(offline, ["2013-03-09"], rows=5)  # a later batch added rows of 9 March
    window, _ = _features_run(offline, "two", [])
    assert window["days"] == ["2013-03-09"]
    # a manual run rebuilds the days of its conf even when they are materialized
    window, _ = _features_run(offline, "two", [], conf={"day": "2013-03-08"})
    assert window["days"] == ["2013-03-08"]
    with pytest.raises(MLOpsArgumentError, match="not a YYYY-MM-DD date"):
        _features_run(offline, "two", [], conf={"day": "8 March"})


def test_a_failed_run_records_nothing_and_days_published_during_a_run_are_reported(tmp_path):
    from airflow_mlops.operators.features import FeatureDaysRecordOperator, FeaturePendingDaysOperator

    offline = tmp_path / "offline"
    _publish_days(offline, ["2013-03-08"])
    common = {"table": "flights", "state_key": "three", "offline_root": str(offline)}
    pending = FeaturePendingDaysOperator(task_id="feature_window", **common)
    window = pending.execute(_context(triggering_asset_events={}, dag_run=SimpleNamespace(conf={})))
    # the run's steps fail: record_materialized never runs, the next run takes the day again
    assert pending.execute(_context(triggering_asset_events={}, dag_run=None))["days"] == ["2013-03-08"]
    _publish_days(offline, ["2013-03-09"])  # published while the run ran
    recorded = FeatureDaysRecordOperator(task_id="record_materialized", window=window, **common).execute(
        _context()
    )
    assert recorded == {"recorded": ["2013-03-08"], "published_meanwhile": ["2013-03-09"]}
