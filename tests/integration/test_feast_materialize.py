"""Materializing the real data into the SQLite online store: rows written, idempotence, late rows,
and errors that name the feature view or repository at fault."""

from __future__ import annotations

import shutil
import sqlite3

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_mlops.demo.data import read_table
from airflow_mlops.exceptions import FeatureRepoError
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.operators.features import FeastApplyOperator, FeastMaterializeOperator

pytestmark = pytest.mark.integration

JAN_START, JAN_END = "2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00"


def _online_tables(db) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as con:
        tables = [
            r[0] for r in con.execute("select name from sqlite_master where type='table' order by name")
        ]
        return {
            t: sorted(con.execute(f'select entity_key, feature_name, value, event_ts from "{t}"').fetchall())
            for t in tables
        }


def _materialize(feast_env, task_context, **kwargs) -> dict:
    operator = FeastMaterializeOperator(task_id="materialize", repo_path=str(feast_env.repo), **kwargs)
    context = task_context("materialize")
    context["outlet_events"] = _Events()
    result = operator.execute(context)
    result["events"] = {getattr(o, "name", None): context["outlet_events"][o].extra for o in operator.outlets}
    return result


class _Events(dict):
    def __missing__(self, key):
        self[key] = event = type("Event", (), {"extra": None})()
        return event


def test_a_month_materialized_twice_gives_identical_online_values_and_no_duplicates(feast_env, task_context):
    views = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
    first = _materialize(feast_env, task_context, start=JAN_START, end=JAN_END, feature_views=views)
    snapshot = _online_tables(feast_env.online_db)
    second = _materialize(feast_env, task_context, start=JAN_START, end=JAN_END, feature_views=views)
    assert _online_tables(feast_env.online_db) == snapshot
    assert first["rows"] == second["rows"]

    # one row per (entity, feature) and as many entities as the operator says it wrote
    carriers = pd.read_parquet(feast_env.offline / "carrier_daily")
    jan = carriers[carriers["event_timestamp"] <= pd.Timestamp(JAN_END)]
    expected = {
        "carrier_daily": jan["carrier"].nunique(),
        "origin_daily": 3,
        "plane": read_table("planes")["tailnum"].nunique(),
        "weather_hourly": 3,
    }
    assert first["rows"] == expected
    for view, rows in expected.items():
        table = next(rows_ for name, rows_ in snapshot.items() if name.endswith(f"_{view}"))
        keys = [(entity, feature) for entity, feature, _, _ in table]
        assert len(keys) == len(set(keys)), f"{view}: duplicate online rows"
        assert len({entity for entity, _ in keys}) == rows, view

    # each feature view's Asset got the rows written
    assert first["events"]["feast_weather_hourly"]["rows"] == 3
    assert second["events"]["feast_plane"] == {
        "feature_view": "plane",
        "rows": expected["plane"],
        "start": JAN_START,
        "end": JAN_END,
    }


def test_online_values_are_the_latest_rows_of_the_interval(feast_env, task_context):
    _materialize(feast_env, task_context, start=JAN_START, end=JAN_END, feature_views=["weather_hourly"])
    weather = read_table("weather")
    weather = weather[weather["time_hour"] <= pd.Timestamp(JAN_END)].sort_values("time_hour")
    latest = weather.groupby("origin").tail(1).set_index("origin")
    hook = FeastHook(repo_path=str(feast_env.repo))
    online = hook.online_features(
        ["weather_hourly:temp", "weather_hourly:as_of"], [{"origin": o} for o in ("EWR", "JFK", "LGA")]
    )
    assert online["weather_hourly__temp"] == [latest.loc[o, "temp"] for o in ("EWR", "JFK", "LGA")]
    assert online["weather_hourly__as_of"] == [
        latest.loc[o, "time_hour"].to_pydatetime() for o in ("EWR", "JFK", "LGA")
    ]


def test_the_overlap_picks_up_rows_that_arrived_after_their_interval_was_materialized(
    feast_env, task_context
):
    late_dir = feast_env.offline / "carrier_daily" / "date=2013-01-20-late"
    hook = FeastHook(repo_path=str(feast_env.repo))

    def zz_flights():
        return hook.online_features(["carrier_daily:flights_7d"], [{"carrier": "ZZ"}])[
            "carrier_daily__flights_7d"
        ]

    _materialize(
        feast_env,
        task_context,
        start="2013-01-20T00:00:00+00:00",
        end="2013-01-21T00:00:00+00:00",
        feature_views=["carrier_daily"],
    )
    assert zz_flights() == [None]
    stamp = pd.Timestamp("2013-01-20T12:00:00Z").as_unit("us")
    late = pd.DataFrame(
        {
            "carrier": ["ZZ"],
            "flights_7d": [42],
            "arr_delay_mean_7d": [1.5],
            "dep_delay_mean_7d": [2.5],
            "delayed_rate_7d": [0.1],
            "cancel_rate_7d": [0.0],
            "day": ["2013-01-19"],
            "event_timestamp": [stamp],
            "as_of": [stamp],
        }
    )
    late_dir.mkdir()
    try:
        pq.write_table(pa.Table.from_pandas(late, preserve_index=False), late_dir / "part-0.parquet")
        next_day = {"start": "2013-01-21T00:00:00+00:00", "end": "2013-01-22T00:00:00+00:00"}
        without = _materialize(feast_env, task_context, feature_views=["carrier_daily"], **next_day)
        assert zz_flights() == [None], "a late row outside the interval was not expected to be written"
        with_overlap = _materialize(
            feast_env, task_context, feature_views=["carrier_daily"], overlap=2 * 86400, **next_day
        )
        assert with_overlap["start"] == "2013-01-19T00:00:00+00:00"
        assert with_overlap["rows"]["carrier_daily"] == without["rows"]["carrier_daily"] + 1
        assert zz_flights() == [42]
    finally:
        shutil.rmtree(late_dir, ignore_errors=True)


def test_an_unknown_feature_view_fails_naming_it(feast_env, task_context):
    with pytest.raises(FeatureRepoError) as err:
        _materialize(
            feast_env,
            task_context,
            start=JAN_START,
            end=JAN_END,
            feature_views=["weather_hourly", "wether_daily"],
        )
    message = str(err.value)
    assert "unknown feature view(s) 'wether_daily'" in message
    assert str(feast_env.repo) in message and "weather_hourly" in message  # the registered ones are listed


def test_a_malformed_repository_fails_naming_the_file(feast_env, task_context, tmp_path):
    broken = tmp_path / "broken_repo"
    shutil.copytree(feast_env.repo, broken, ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "late_additions.py").write_text(
        "from feast import FeatureView\n\nbad = FeatureView(name='bad', entities=['nope'], source=None)\n"
    )
    with pytest.raises(FeatureRepoError) as err:
        FeastApplyOperator(task_id="apply", repo_path=str(broken)).execute(task_context("apply"))
    assert f"the definitions of Feast repository {str(broken)!r} do not load" in str(err.value)
    assert "feast plan" in str(err.value)

    (broken / "feature_store.yaml").write_text("project: flights\nregistry: [unclosed\n")
    with pytest.raises(FeatureRepoError, match=r"feature_store.yaml is not valid YAML"):
        FeastApplyOperator(task_id="apply", repo_path=str(broken)).execute(task_context("apply"))


def test_apply_is_idempotent(feast_env, task_context):
    result = FeastApplyOperator(task_id="apply", repo_path=str(feast_env.repo)).execute(task_context("apply"))
    assert result["changes"] == 0 and result["changed"] == []
    registry = feast_env.settings.state_dir / "feast" / "registry.db"
    before = registry.stat().st_mtime_ns
    FeastApplyOperator(task_id="apply", repo_path=str(feast_env.repo)).execute(task_context("apply"))
    assert registry.stat().st_mtime_ns == before, "an apply without changes rewrote the registry"
