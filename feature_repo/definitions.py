"""Feast definitions for the flights demo: entities, parquet sources in the offline store, feature views
and the feature service the delay model trains and serves with.

Every source reads a table that an upstream task wrote into the offline store with a tz-aware UTC
``event_timestamp`` (when the row became known) and the same instant again as the feature ``as_of``,
so every joined training row says how old each of its features was (see docs/features.md).

The offline store location comes from ``MLOPS_OFFLINE_ROOT`` (set by ``FeastHook``) or, when the
repository is used from the ``feast`` CLI, from Airflow's ``[mlops] offline_root``; never from the
working directory.
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64, String, UnixTimestamp
from feast.value_type import ValueType


def _offline_root() -> str:
    root = os.environ.get("MLOPS_OFFLINE_ROOT")
    if not root:
        from airflow_mlops.config import load_settings

        root = load_settings().offline_root
    return root.removeprefix("file://").rstrip("/")


OFFLINE_ROOT = _offline_root()


def _source(table: str, path: str) -> FileSource:
    return FileSource(
        name=f"{table}_source",
        path=f"{OFFLINE_ROOT}/{path}",
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        description=f"offline-store table {table!r}",
    )


origin = Entity(
    name="origin",
    join_keys=["origin"],
    value_type=ValueType.STRING,
    description="New York departure airport (EWR, JFK, LGA)",
)
carrier = Entity(
    name="carrier", join_keys=["carrier"], value_type=ValueType.STRING, description="two-letter airline code"
)
plane = Entity(
    name="tailnum", join_keys=["tailnum"], value_type=ValueType.STRING, description="aircraft tail number"
)

weather_hourly = FeatureView(
    name="weather_hourly",
    entities=[origin],
    ttl=timedelta(hours=3),
    schema=[
        Field(name="temp", dtype=Float64),
        Field(name="dewp", dtype=Float64),
        Field(name="humid", dtype=Float64),
        Field(name="wind_speed", dtype=Float64),
        Field(name="wind_gust", dtype=Float64),
        Field(name="precip", dtype=Float64),
        Field(name="pressure", dtype=Float64),
        Field(name="visib", dtype=Float64),
        Field(name="as_of", dtype=UnixTimestamp),
    ],
    source=_source("weather", "weather/*.parquet"),
    online=True,
    description="hourly weather observation at the departure airport (origin x hour)",
)

plane_features = FeatureView(
    name="plane",
    entities=[plane],
    ttl=timedelta(0),
    schema=[
        Field(name="year_built", dtype=Float64),
        Field(name="engines", dtype=Int64),
        Field(name="seats", dtype=Int64),
        Field(name="type", dtype=String),
        Field(name="as_of", dtype=UnixTimestamp),
    ],
    source=_source("planes", "planes/*.parquet"),
    online=True,
    description="aircraft registry data (a snapshot; ttl 0: never expires)",
)

_DAILY = [
    Field(name="flights_7d", dtype=Int64),
    Field(name="arr_delay_mean_7d", dtype=Float64),
    Field(name="dep_delay_mean_7d", dtype=Float64),
    Field(name="delayed_rate_7d", dtype=Float64),
    Field(name="cancel_rate_7d", dtype=Float64),
    Field(name="as_of", dtype=UnixTimestamp),
]

carrier_daily = FeatureView(
    name="carrier_daily",
    entities=[carrier],
    ttl=timedelta(days=3),
    schema=list(_DAILY),
    source=_source("carrier_daily", "carrier_daily/date=*/*.parquet"),
    online=True,
    description="rolling 7-day delay statistics per airline, known the morning after each day",
)

origin_daily = FeatureView(
    name="origin_daily",
    entities=[origin],
    ttl=timedelta(days=3),
    schema=list(_DAILY),
    source=_source("origin_daily", "origin_daily/date=*/*.parquet"),
    online=True,
    description="rolling 7-day delay statistics per departure airport, known the morning after each day",
)

delay_model = FeatureService(
    name="delay_model",
    features=[weather_hourly, plane_features, carrier_daily, origin_daily],
    description="features of the arrival-delay model (label: arrival delay > 15 min)",
)
