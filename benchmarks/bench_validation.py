"""Benchmark: the flights suite with Great Expectations vs the same checks written in pandas.

Two batches: one real day (2013-06-14) and the whole year in one batch (336,776 flights). Each
measurement includes reading the parquet file (with the operator's own reader) and validating; the GX
import and context creation (once per worker process) are reported separately. The pandas baseline
interprets the very same suite file, expectation by expectation, with plain pandas operations.

For the whole-year batch, the three expectations tying year/month/day to one date are widened to the
year and the row-count ceiling is lifted, in the suite both sides run, so that the batch passes.

Run: ``.venv/bin/python benchmarks/bench_validation.py [--repeat N]``. Targets (issue 3): whole year
< 20 s with GX, and GX <= 5x the pandas baseline.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "dags" / "expectations" / "flights_batch.json"
DAY = "2013-06-14"
TZ = "America/New_York"


def scratch_env(folder: Path) -> None:
    """Keep Airflow and airflow-mlops state of this script in a scratch folder."""
    os.environ.setdefault("AIRFLOW_HOME", str(folder / "airflow"))
    os.environ.setdefault("AIRFLOW__MLOPS__STATE_DIR", str(folder / "mlops"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def year_spec(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    widen = {"year": (2013, 2013), "month": (1, 12), "day": (1, 31)}
    for item in spec["expectations"]:
        kwargs = item["kwargs"]
        if item["type"] == "expect_column_values_to_be_between" and kwargs.get("column") in widen:
            kwargs["min_value"], kwargs["max_value"] = widen[kwargs["column"]]
        if item["type"] == "expect_table_row_count_to_be_between":
            kwargs["max_value"] = 1_000_000
    return spec


def resolve(value: Any, params: dict[str, Any]) -> Any:
    return params[value["$PARAMETER"]] if isinstance(value, dict) and "$PARAMETER" in value else value


def pandas_check(frame, spec: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The suite's expectations in plain pandas; returns the failed ones as ``type:column``."""
    import pandas as pd

    failed = []
    for item in spec["expectations"]:
        kind, kw = item["type"], {k: resolve(v, params) for k, v in item["kwargs"].items()}
        column = kw.get("column")
        s = frame[column] if column in frame.columns else None
        if kind == "expect_table_columns_to_match_set":
            ok = set(frame.columns) == set(kw["column_set"])
        elif kind == "expect_table_row_count_to_be_between":
            ok = kw["min_value"] <= len(frame) <= kw["max_value"]
        elif kind == "expect_compound_columns_to_be_unique":
            ok = not frame.duplicated(kw["column_list"], keep=False).any()
        elif s is None:
            ok = False
        elif kind == "expect_column_values_to_be_in_type_list":
            if s.dtype == object:
                types = {"str": str}
                allowed = tuple(types[t] for t in kw["type_list"] if t in types)
                ok = bool(s.dropna().map(lambda v, a=allowed: isinstance(v, a)).all())
            else:
                ok = s.dtype.name in kw["type_list"] or type(s.dtype).__name__ in kw["type_list"]
        elif kind == "expect_column_values_to_be_of_type":
            ok = (
                isinstance(s.dtype, pd.DatetimeTZDtype)
                if kw["type_"] == "Timestamp"
                else s.dtype.name == kw["type_"]
            )
        elif kind == "expect_column_values_to_not_be_null":
            ok = s.notna().mean() >= kw.get("mostly", 1.0) if len(s) else True
        elif kind == "expect_column_values_to_be_between":
            values = s.dropna()
            low, high = kw.get("min_value"), kw.get("max_value")
            if isinstance(s.dtype, pd.DatetimeTZDtype):
                low, high = pd.Timestamp(low), pd.Timestamp(high)
            inside = (values >= low) & ((values < high) if kw.get("strict_max") else (values <= high))
            ok = bool(inside.all())
        elif kind == "expect_column_values_to_be_in_set":
            ok = bool(s.dropna().isin(kw["value_set"]).all())
        elif kind == "expect_column_values_to_match_regex":
            ok = bool(s.dropna().str.match(re.compile(kw["regex"])).all())
        else:
            raise SystemExit(f"the pandas baseline does not know {kind}; add it to keep the comparison fair")
        if not ok:
            failed.append(f"{kind}:{column}")
    return failed


def best_of(repeat: int, func) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    scratch_env(scratch)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.artifacts import as_path
    from airflow_mlops.demo.data import FLIGHTS_TABLE, flights_schema, read_table
    from airflow_mlops.operators import validation

    flights = read_table(FLIGHTS_TABLE)
    table = pa.Table.from_pandas(flights, schema=flights_schema(), preserve_index=False)
    year_file, day_file = scratch / "year.parquet", scratch / "day.parquet"
    pq.write_table(table, year_file)
    y, m, d = (int(p) for p in DAY.split("-"))
    pq.write_table(
        pa.Table.from_pandas(
            flights[(flights.year == y) & (flights.month == m) & (flights.day == d)],
            schema=flights_schema(),
            preserve_index=False,
        ),
        day_file,
    )

    spec = validation.load_suite_spec(SUITE)
    day_params = validation.batch_date_parameters(DAY, TZ)
    year_params = {
        **validation.batch_date_parameters("2013-01-01", TZ),
        "batch_end": validation.batch_date_parameters("2013-12-31", TZ)["batch_end"],
    }

    started = time.perf_counter()
    import great_expectations  # noqa: F401  (the one-off cost, reported on its own)

    gx_import = time.perf_counter() - started
    started = time.perf_counter()
    validation._batch_definition()
    suites = {"day": validation.build_suite(spec), "year": validation.build_suite(year_spec(spec))}
    gx_setup = time.perf_counter() - started

    cases = [
        ("one day " + DAY, "day", day_file, spec, day_params),
        ("whole year 2013", "year", year_file, year_spec(spec), year_params),
    ]
    print(
        f"GX import {gx_import:.2f} s, context + suites {gx_setup:.2f} s (once per worker process, not below)"
    )
    print(f"{'batch':<22}{'rows':>9}{'GX s':>9}{'pandas s':>10}{'ratio':>8}  result")
    worst_ratio, year_gx = 0.0, 0.0
    for label, key, path, case_spec, params in cases:
        uri = as_path(str(path))

        def with_gx(uri=uri, key=key, params=params):
            frame = validation.read_batch(uri)
            return len(frame), validation.validate_frame(frame, suites[key], params, "SUMMARY")

        def with_pandas(uri=uri, case_spec=case_spec, params=params):
            frame = validation.read_batch(uri)
            return len(frame), pandas_check(frame, case_spec, params)

        gx_time, (rows, gx_result) = best_of(args.repeat, with_gx)
        pd_time, (_, pd_failed) = best_of(args.repeat, with_pandas)
        ratio = gx_time / pd_time
        worst_ratio = max(worst_ratio, ratio)
        year_gx = gx_time if key == "year" else year_gx
        verdict = (
            "both pass"
            if gx_result.success and not pd_failed
            else f"GX {gx_result.success}, pandas {pd_failed}"
        )
        print(f"{label:<22}{rows:>9}{gx_time:>9.3f}{pd_time:>10.3f}{ratio:>7.1f}x  {verdict}")
    print(
        f"targets: whole year < 20 s with GX: {'met' if year_gx < 20 else 'MISSED'} ({year_gx:.2f} s); "
        f"GX <= 5x pandas: {'met' if worst_ratio <= 5 else 'MISSED'} (worst {worst_ratio:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
