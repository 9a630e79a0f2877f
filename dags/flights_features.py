"""Keep the Feast feature store up to date after each ingested day of flights.

Runs whenever the ``flights_offline`` Asset receives events (``flights_ingest`` published one or more
days), for the days named in those events (``extra.partition`` = ``date=YYYY-MM-DD``); a manual run
takes ``{"day": "YYYY-MM-DD"}`` (optionally ``"last_day"``) as its conf.

1. ``publish_weather`` / ``publish_planes`` publish the hourly weather and the aircraft registry as
   Feast source tables (UTC ``event_timestamp`` and ``as_of`` columns) in the offline store;
2. ``daily_stats`` computes the rolling 7-day delay statistics per carrier and per origin for each day
   (known at 06:00 New York time the next morning) and the labelled flight rows;
3. ``feast_apply`` registers ``feature_repo/`` (a no-op when nothing changed);
4. ``materialize`` loads the days (plus one day of overlap for late rows) of ``weather_hourly``,
   ``carrier_daily`` and ``origin_daily`` into the online store, ``materialize_planes`` the aircraft
   snapshot; each feature view's ``feast_<view>`` Asset receives an event with the rows written.

Every task replaces what it wrote for its days, so a rerun or a duplicate Asset event changes nothing.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from airflow.sdk import DAG, Asset

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.operators.features import (
    FeastApplyOperator,
    FeastMaterializeOperator,
    FeatureSourceSnapshotOperator,
    FlightDailyStatsOperator,
)

# Name-only, as flights_ingest declares it: an Asset with a URI scheme would make every parse of this
# file discover the providers (about a second).
FLIGHTS_OFFLINE = Asset(name="flights_offline")
FEATURE_REPO = os.environ.get("MLOPS_FEATURE_REPO") or str(
    Path(__file__).resolve().parents[1] / "feature_repo"
)
LOCAL_TZ = ZoneInfo("America/New_York")
#: the aircraft registry shipped with the data is a snapshot stamped before the first flight of 2013.
PLANES_AS_OF = "2013-01-01T00:00:00+00:00"
STATS_AVAILABLE_AFTER = timedelta(hours=6)
WEATHER_COLUMNS = [
    "origin",
    "temp",
    "dewp",
    "humid",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
]


def feature_window(triggering_asset_events, dag_run) -> dict[str, str]:
    """The days this run processes and the interval to materialize for them (a template macro).

    :return: ``first`` and ``last`` day (``YYYY-MM-DD``), ``start`` (local midnight of the first day)
        and ``end`` (local midnight after the last day plus the statistics' delay), ISO with offset.
    """
    days = sorted(
        {
            str(event.extra["partition"]).removeprefix("date=")
            for events in (triggering_asset_events or {}).values()
            for event in events
            if (event.extra or {}).get("partition")
        }
    )
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if not days and conf.get("day"):
        days = [str(conf["day"]), str(conf.get("last_day") or conf["day"])]
    if not days:
        raise MLOpsArgumentError(
            "this run of flights_features names no day: no flights_offline event with extra.partition "
            "triggered it and its conf has no 'day'.",
            fix='trigger it with conf {"day": "YYYY-MM-DD"} or let flights_ingest trigger it.',
        )
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    start = datetime.combine(first, time(), LOCAL_TZ)
    end = (datetime.combine(last + timedelta(days=1), time()) + STATS_AVAILABLE_AFTER).replace(
        tzinfo=LOCAL_TZ
    )
    return {
        "first": first.isoformat(),
        "last": last.isoformat(),
        "start": start.astimezone(UTC).isoformat(),
        "end": end.astimezone(UTC).isoformat(),
    }


WINDOW = "feature_window(triggering_asset_events, dag_run)"

with DAG(
    dag_id="flights_features",
    description="Daily delay statistics, feast apply and materialization after each ingested day.",
    schedule=[FLIGHTS_OFFLINE],
    start_date=datetime(2013, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    user_defined_macros={"feature_window": feature_window},
    tags=["mlops", "flights", "features"],
    doc_md=__doc__,
) as dag:
    publish_weather = FeatureSourceSnapshotOperator(
        task_id="publish_weather",
        source_uri="weather/weather.parquet",
        table="weather",
        timestamp_column="time_hour",
        columns=[*WEATHER_COLUMNS, "time_hour"],
    )
    publish_planes = FeatureSourceSnapshotOperator(
        task_id="publish_planes",
        source_uri="planes/planes.parquet",
        table="planes",
        as_of=PLANES_AS_OF,
        rename={"year": "year_built"},
        columns=["tailnum", "year_built", "engines", "seats", "type"],
    )
    daily_stats = FlightDailyStatsOperator(
        task_id="daily_stats",
        start_day=f"{{{{ {WINDOW}['first'] }}}}",
        end_day=f"{{{{ {WINDOW}['last'] }}}}",
        available_after=STATS_AVAILABLE_AFTER,
    )
    apply = FeastApplyOperator(task_id="feast_apply", repo_path=FEATURE_REPO)
    materialize = FeastMaterializeOperator(
        task_id="materialize",
        repo_path=FEATURE_REPO,
        start=f"{{{{ {WINDOW}['start'] }}}}",
        end=f"{{{{ {WINDOW}['end'] }}}}",
        overlap=timedelta(days=1),
        feature_views=["weather_hourly", "carrier_daily", "origin_daily"],
    )
    materialize_planes = FeastMaterializeOperator(
        task_id="materialize_planes",
        repo_path=FEATURE_REPO,
        start=PLANES_AS_OF,
        end=f"{{{{ {WINDOW}['end'] }}}}",
        feature_views=["plane"],
    )
    [publish_weather, publish_planes, daily_stats] >> apply >> [materialize, materialize_planes]
