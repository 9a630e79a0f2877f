"""Feast definitions of the Seattle lifecycles (tests/lifecycle/seattle/): the weather station entity, the
daily weather features written by ``seattle_features.daily_features`` and one feature service per model:
``rain_model`` (binary: rain on the day), ``sky_model`` (multiclass: the day's weather) and ``temp_model``
(regression: the day's highest temperature). The three models share this repository, its offline tables
and its online store; each registers its own service, so its signature names it.

The offline store location comes from ``MLOPS_OFFLINE_ROOT`` (set by ``FeastHook``) or Airflow's
``[mlops] offline_root``; never from the working directory.
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64, UnixTimestamp
from feast.value_type import ValueType


def _offline_root() -> str:
    root = os.environ.get("MLOPS_OFFLINE_ROOT")
    if not root:
        from airflow_mlops.config import load_settings

        root = load_settings().offline_root
    return root.removeprefix("file://").rstrip("/")


station = Entity(
    name="station",
    join_keys=["station"],
    value_type=ValueType.STRING,
    description="weather station (SEA: Seattle-Tacoma airport)",
)

seattle_daily = FeatureView(
    name="seattle_daily",
    entities=[station],
    # the features of day D serve the prediction for D+1; a missing day leaves them empty, not stale
    ttl=timedelta(days=1),
    schema=[
        Field(name="precipitation", dtype=Float64),
        Field(name="temp_max", dtype=Float64),
        Field(name="temp_min", dtype=Float64),
        Field(name="temp_range", dtype=Float64),
        Field(name="wind", dtype=Float64),
        Field(name="rained", dtype=Int64),
        Field(name="rain_days_7d", dtype=Float64),
        Field(name="precipitation_7d", dtype=Float64),
        Field(name="temp_max_mean_7d", dtype=Float64),
        Field(name="wind_mean_7d", dtype=Float64),
        Field(name="days_7d", dtype=Int64),
        Field(name="as_of", dtype=UnixTimestamp),
    ],
    source=FileSource(
        name="seattle_daily_source",
        path=f"{_offline_root()}/seattle_daily/date=*/*.parquet",
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        description="offline-store table 'seattle_daily'",
    ),
    online=True,
    description="a day's weather at the station and its rolling 7-day statistics, known at midnight after it",
)

rain_model = FeatureService(
    name="rain_model",
    features=[seattle_daily],
    description="features of the Seattle rain model (label: precipitation on the next day > 0)",
)

sky_model = FeatureService(
    name="sky_model",
    features=[seattle_daily],
    description="features of the Seattle sky model (label: the weather of the next day, one of five classes)",
)

temp_model = FeatureService(
    name="temp_model",
    features=[seattle_daily],
    description="features of the Seattle temperature model (label: the highest temperature of the next day)",
)
