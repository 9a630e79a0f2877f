"""The flights suite passes on every real day of 2013 (365 batches, 336,776 flights).

Each day is validated as its own batch, exactly as the ingest DAG does (same suite file, same
parameters from the New York date), in one GX context. The loop asks GX for ``BOOLEAN_ONLY`` results:
pass or fail is computed the same way in every result format (``mostly`` included), only the detail
differs; a day that fails is validated again with ``SUMMARY`` to name what failed.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from mlops_testing import ROOT

from airflow_mlops.demo.data import FLIGHTS_TABLE, flights_schema, read_table
from airflow_mlops.operators import validation

pytestmark = pytest.mark.integration

SUITE = ROOT / "dags" / "expectations" / "flights_batch.json"
TZ = "America/New_York"


@pytest.fixture(scope="module")
def days() -> dict[str, object]:
    """The year split into daily batches with the landed schema (what the DAG reads)."""
    flights = read_table(FLIGHTS_TABLE)
    frame = pa.Table.from_pandas(flights, schema=flights_schema(), preserve_index=False).to_pandas()
    key = (
        frame["year"].astype(str)
        + "-"
        + frame["month"].astype(str).str.zfill(2)
        + "-"
        + frame["day"].astype(str).str.zfill(2)
    )
    return {day: batch.reset_index(drop=True) for day, batch in frame.groupby(key, sort=True)}


@pytest.fixture(scope="module")
def suite():
    return validation.build_suite(validation.load_suite_spec(SUITE), str(SUITE))


def test_suite_passes_on_every_day_of_2013(days: dict, suite) -> None:
    assert len(days) == 365
    assert sum(len(b) for b in days.values()) == 336_776
    failures = {}
    for day, batch in days.items():
        params = validation.batch_date_parameters(day, TZ)
        if not validation.validate_frame(batch, suite, params, "BOOLEAN_ONLY").success:
            detail = validation.validate_frame(batch, suite, params, "SUMMARY").to_json_dict()
            failures[day] = [
                validation._failure_text(f) for f in validation.summarize(detail)["failed_expectations"]
            ]
    assert failures == {}


def test_a_real_day_checked_as_another_day_fails(days: dict, suite) -> None:
    """The date parameters bite: 1 January's flights are not a batch of 2 January."""
    result = validation.validate_frame(
        days["2013-01-01"], suite, validation.batch_date_parameters("2013-01-02", TZ), "SUMMARY"
    )
    failed = {
        (f["expectation"], f["column"])
        for f in validation.summarize(result.to_json_dict())["failed_expectations"]
    }
    assert failed == {
        ("expect_column_values_to_be_between", "day"),
        ("expect_column_values_to_be_between", "time_hour"),
    }
