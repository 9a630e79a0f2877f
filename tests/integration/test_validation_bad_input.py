"""Bad landed batches against the real flights suite (Great Expectations 1.x, imported once per session).

Every case of issue 3's list: the operator fails with an error naming the file and the problem (the
column, the expectation), and the batch is moved to quarantine with its result beside it, never deleted
(except a file that is not there, which has nothing to move). The offline store is untouched; the ingest
DAG's publish task runs only after validation succeeds, shown end to end in
tests/system/test_flights_ingest_validation.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlops_testing import ROOT

from airflow_mlops.config import load_settings
from airflow_mlops.demo.data import flights_schema
from airflow_mlops.exceptions import DataValidationError
from airflow_mlops.operators.validation import QUARANTINE_RESULT_SUFFIX, GXValidateOperator

pytestmark = pytest.mark.integration

DAY = "2013-01-02"
SUITE = ROOT / "dags" / "expectations" / "flights_batch.json"


class FakeTI:
    def __init__(self, run_id: str) -> None:
        self.dag_id, self.run_id, self.task_id = "bad_input", run_id, "validate_batch"
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@pytest.fixture(scope="module")
def good_day(landed_week: dict) -> pd.DataFrame:
    path = (
        Path(load_settings().landing_root.removeprefix("file://"))
        / "flights"
        / f"date={DAY}"
        / "flights.parquet"
    )
    return pq.read_table(path).to_pandas()


def offline_partitions() -> list[str]:
    root = Path(load_settings().offline_root.removeprefix("file://")) / "flights"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def validate(data: Path, quarantine: Path, run_id: str, **kwargs: Any) -> dict[str, Any]:
    op = GXValidateOperator(
        task_id="validate_batch",
        data_uri=str(data),
        expectation_suite=str(SUITE),
        batch_date=DAY,
        batch_timezone="America/New_York",
        quarantine_uri=str(quarantine),
        **kwargs,
    )
    return op.execute({"ti": FakeTI(run_id)})


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def strings_in_numeric(f: pd.DataFrame) -> pd.DataFrame:
    f["dep_delay"] = f["dep_delay"].astype(object)
    f.loc[f.index[:3], "dep_delay"] = "late"
    f["dep_delay"] = f["dep_delay"].astype(str)
    return f


def delays_of_a_million(f: pd.DataFrame) -> pd.DataFrame:
    f.loc[f.index[:4], "dep_delay"] = 1e6
    return f


def time_of_another_day(f: pd.DataFrame) -> pd.DataFrame:
    f["time_hour"] = f["time_hour"] + pd.Timedelta(days=2)
    return f


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (case, file name, how to spoil the good day, a post-write step, what the message must name)
CASES: list[
    tuple[str, str, Callable[[pd.DataFrame], pd.DataFrame], Callable[[Path], None] | None, list[str]]
] = [
    (
        "missing_column",
        "flights.parquet",
        lambda f: f.drop(columns=["arr_delay"]),
        None,
        ["expect_table_columns_to_match_set", "missing_columns", "arr_delay"],
    ),
    (
        "extra_column",
        "flights.parquet",
        lambda f: f.assign(seat_pitch=31),
        None,
        ["expect_table_columns_to_match_set", "unexpected_columns", "seat_pitch"],
    ),
    (
        "strings_in_numeric",
        "flights.parquet",
        strings_in_numeric,
        None,
        ["expect_column_values_to_be_in_type_list on column 'dep_delay'", "late"],
    ),
    (
        "column_all_null",
        "flights.parquet",
        lambda f: f.assign(arr_delay=float("nan")),
        None,
        ["expect_column_values_to_not_be_null on column 'arr_delay'", "(100.0%)"],
    ),
    (
        "zero_rows",
        "flights.parquet",
        lambda f: f.iloc[:0],
        None,
        ["expect_table_row_count_to_be_between", "observed_value 0"],
    ),
    ("corrupt_parquet", "flights.parquet", lambda f: f, truncate, ["is not readable parquet"]),
    (
        "duplicated_flights",
        "flights.parquet",
        lambda f: pd.concat([f, f.iloc[:5]]),
        None,
        [
            "expect_compound_columns_to_be_unique on columns ['carrier', 'flight', 'time_hour']",
            "10 unexpected",
        ],
    ),
    (
        "delays_of_a_million",
        "flights.parquet",
        delays_of_a_million,
        None,
        ["expect_column_values_to_be_between on column 'dep_delay'", "4 unexpected", "1000000"],
    ),
    (
        "timestamps_of_another_day",
        "flights.parquet",
        time_of_another_day,
        None,
        ["expect_column_values_to_be_between on column 'time_hour'", "2013-01-04"],
    ),
    (
        "naive_timestamps",
        "flights.parquet",
        lambda f: f.assign(time_hour=f["time_hour"].dt.tz_convert(None)),
        None,
        ["expect_column_values_to_be_of_type on column 'time_hour'", "datetime64"],
    ),
    (
        "csv_wrong_delimiter",
        "flights.csv",
        lambda f: f,
        None,
        ["delimited by ';', not by ','", "one single column"],
    ),
]


@pytest.mark.parametrize(("case", "name", "spoil", "after", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_batch_fails_naming_the_problem_and_is_quarantined(
    tmp_path: Path,
    good_day: pd.DataFrame,
    case: str,
    name: str,
    spoil: Callable[[pd.DataFrame], pd.DataFrame],
    after: Callable[[Path], None] | None,
    named: list[str],
) -> None:
    before = offline_partitions()
    data = tmp_path / "landing" / f"date={DAY}" / name
    data.parent.mkdir(parents=True)
    frame = spoil(good_day.copy())
    if name.endswith(".csv"):
        frame.to_csv(data, sep=";", index=False)
    else:
        write_parquet(frame, data)
    if after:
        after(data)
    landed_bytes = data.read_bytes()
    quarantine = tmp_path / "quarantine" / f"date={DAY}"

    with pytest.raises(DataValidationError) as err:
        validate(data, quarantine, run_id=case)

    message = str(err.value)
    assert str(data) in message, message
    for part in named:
        assert part in message, f"{part!r} not in: {message}"
    assert "moved to quarantine" in message
    # nothing lost: the very same bytes are in quarantine, with the result beside them
    assert not data.exists()
    assert (quarantine / name).read_bytes() == landed_bytes
    beside = json.loads((quarantine / f"{name}{QUARANTINE_RESULT_SUFFIX}").read_text())
    assert beside["success"] is False and beside["data_uri"] == f"file://{data}"
    assert Path(beside["docs_uri"].removeprefix("file://")).stat().st_size > 0
    assert offline_partitions() == before


def test_a_file_that_is_not_there(tmp_path: Path, landed_week: dict) -> None:
    data = tmp_path / "landing" / f"date={DAY}" / "flights.parquet"
    quarantine = tmp_path / "quarantine"
    with pytest.raises(DataValidationError, match=rf"batch 'file://{data}' does not exist"):
        validate(data, quarantine, run_id="missing")
    assert not quarantine.exists()


def test_the_untouched_day_passes_as_parquet_and_as_csv(tmp_path: Path, good_day: pd.DataFrame) -> None:
    """The control for every case above: the same day unspoiled passes, read from parquet or CSV."""
    parquet = tmp_path / "flights.parquet"
    pq.write_table(pa.Table.from_pandas(good_day, schema=flights_schema(), preserve_index=False), parquet)
    out = validate(parquet, tmp_path / "q", run_id="good_parquet")
    assert (out["success"], out["rows"], out["failed"], out["evaluated"]) == (True, 943, 0, 59)
    assert parquet.exists() and not (tmp_path / "q").exists()
    report = Path(out["docs_uri"].removeprefix("file://")).read_text()
    assert "flights_batch" in report and "<html" in report

    csv = tmp_path / "flights.csv"
    good_day.to_csv(csv, index=False)
    out = validate(csv, tmp_path / "q", run_id="good_csv", csv_options={"parse_dates": ["time_hour"]})
    assert (out["success"], out["rows"]) == (True, 943), out["failed_expectations"]
