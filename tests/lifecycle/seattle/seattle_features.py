"""Feature steps of the Seattle lifecycles (tests/lifecycle/seattle/), run by the ``seattle_features`` DAG
of ``seattle.yaml`` as ``callable:`` steps: plain functions whose keyword arguments come from the spec's
``args``. The three Seattle models train on the tables they write: ``seattle_rain`` (binary, label
``rain``), ``seattle_sky`` (multiclass, label ``weather``) and ``seattle_temp`` (regression, label
``temp_max``).

Both read the validated daily partitions ``seattle_weather/date=YYYY-MM-DD`` of the offline store and
write one parquet partition per day, atomically (staged, then renamed), so a rerun of a day replaces
its rows and never adds any:

- :func:`daily_features` -> ``seattle_daily/date=D``: the weather of day D and rolling statistics of the
  ``window_days`` days up to D for the station ``SEA``, known at midnight (UTC) after D;
- :func:`labelled_days` -> ``seattle_labelled/date=D``: the entity row of day D, stamped at midnight
  starting D (when the features of D-1 become known), with the weather observed on D: ``rain``
  (precipitation > 0, 0/1), ``weather`` (drizzle, fog, rain, snow or sun), ``temp_max`` (degrees C) and
  the other observations. They are the labels of the three models and the columns the monitor compares;
  never features (a model's spec lists its features, all of them known before D).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from airflow_mlops.artifacts import as_path, staged
from airflow_mlops.config import load_settings
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.offline_store import PARTITION_FILE, read_parquet_batch, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

STATION = "SEA"
OBSERVED = ["precipitation", "temp_max", "temp_min", "wind", "weather"]


def _days(first_day: str, last_day: str | None) -> list[date]:
    try:
        first = date.fromisoformat(str(first_day).strip())
        last = date.fromisoformat(str(last_day or first_day).strip())
    except ValueError:
        raise MLOpsArgumentError(
            f"days {first_day!r} .. {last_day!r} are not YYYY-MM-DD.",
            fix="pass first_day='{{ window.first }}' and last_day='{{ window.last }}'.",
        ) from None
    if last < first:
        raise MLOpsArgumentError(f"last_day {last} is before first_day {first}.", fix="swap the days.")
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _root(offline_root: str | None) -> ObjectStoragePath:
    settings = load_settings()
    return as_path(resolve_uri(offline_root or settings.offline_root, settings.offline_root))


def _reader(root: ObjectStoragePath, table: str):
    """``read(day)``: the day's validated rows (None when the day was not ingested), read once each."""
    cache: dict[date, pd.DataFrame | None] = {}

    def read(day: date) -> pd.DataFrame | None:
        if day not in cache:
            path = root.joinpath(table, f"date={day.isoformat()}", PARTITION_FILE)
            cache[day] = read_parquet_batch(path).to_pandas() if path.exists() else None
        return cache[day]

    return read


def _required(frame: pd.DataFrame | None, table: str, day: date) -> pd.DataFrame:
    if frame is None or frame.empty:
        raise MLOpsInputError(
            f"offline partition {table}/date={day.isoformat()} does not exist or is empty.",
            fix="ingest the week holding that day first (DAG seattle_ingest), then rerun this task.",
        )
    return frame


def _publish(root: ObjectStoragePath, table: str, day: date, frame: pd.DataFrame) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with staged(root.joinpath(table, f"date={day.isoformat()}", PARTITION_FILE)) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    return len(frame)


def daily_features(
    *,
    first_day: str,
    last_day: str | None = None,
    window_days: int = 7,
    table: str = "seattle_weather",
    features_table: str = "seattle_daily",
    offline_root: str | None = None,
) -> dict[str, Any]:
    """Write ``<features_table>/date=D`` for each day D in [first_day, last_day]: the day's weather and
    its rolling ``window_days`` statistics (the days of the window that were ingested; D must be).

    :return: ``{"days", "rows", "table"}``.
    """
    import pandas as pd

    root = _root(offline_root)
    read = _reader(root, table)
    rows = 0
    days = _days(first_day, last_day)
    for day in days:
        today = _required(read(day), table, day)
        window = [read(day - timedelta(days=k)) for k in range(int(window_days))]
        recent = pd.concat([w for w in window if w is not None], ignore_index=True)
        known_at = pd.Timestamp(day + timedelta(days=1), tz="UTC")
        wet = recent["precipitation"] > 0
        frame = pd.DataFrame(
            {
                "station": [STATION],
                "precipitation": [float(today["precipitation"].iloc[0])],
                "temp_max": [float(today["temp_max"].iloc[0])],
                "temp_min": [float(today["temp_min"].iloc[0])],
                "temp_range": [float((today["temp_max"] - today["temp_min"]).iloc[0])],
                "wind": [float(today["wind"].iloc[0])],
                "rained": [int(today["precipitation"].iloc[0] > 0)],
                "rain_days_7d": [float(wet.mean())],
                "precipitation_7d": [float(recent["precipitation"].sum())],
                "temp_max_mean_7d": [float(recent["temp_max"].mean())],
                "wind_mean_7d": [float(recent["wind"].mean())],
                "days_7d": [len(recent)],
                "event_timestamp": [known_at],
            }
        )
        frame["event_timestamp"] = frame["event_timestamp"].astype("datetime64[us, UTC]")
        frame["as_of"] = frame["event_timestamp"]
        rows += _publish(root, features_table, day, frame)
    return {"days": [days[0].isoformat(), days[-1].isoformat()], "rows": rows, "table": features_table}


def labelled_days(
    *,
    first_day: str,
    last_day: str | None = None,
    table: str = "seattle_weather",
    labelled_table: str = "seattle_labelled",
    offline_root: str | None = None,
) -> dict[str, Any]:
    """Write ``<labelled_table>/date=D`` for each day D: one entity row (station ``SEA``) stamped at
    midnight UTC starting D, with D's observed weather (``precipitation``, ``temp_max``, ``temp_min``,
    ``wind``, ``weather``) and ``rain`` (precipitation on D > 0): the labels of the Seattle models.

    :return: ``{"days", "rows", "table", "positive"}``.
    """
    import pandas as pd

    root = _root(offline_root)
    read = _reader(root, table)
    rows = positive = 0
    days = _days(first_day, last_day)
    for day in days:
        today = _required(read(day), table, day)
        frame = pd.DataFrame(
            {
                "event_timestamp": pd.Series([pd.Timestamp(day, tz="UTC")]).astype("datetime64[us, UTC]"),
                "station": [STATION],
                "day_of_year": [day.timetuple().tm_yday],
                **{column: [today[column].iloc[0]] for column in OBSERVED},
                "rain": [int(today["precipitation"].iloc[0] > 0)],
            }
        )
        positive += int(frame["rain"].iloc[0])
        rows += _publish(root, labelled_table, day, frame)
    return {
        "days": [days[0].isoformat(), days[-1].isoformat()],
        "rows": rows,
        "table": labelled_table,
        "positive": positive,
    }
