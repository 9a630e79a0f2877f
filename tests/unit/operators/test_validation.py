"""Unit tests of GXValidateOperator: arguments, template fields, suite handling and the result shape.

Great Expectations itself is patched out here (its import alone takes seconds); the real library runs
in tests/integration/test_validation_bad_input.py and test_flights_suite.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlops_testing import ROOT, run_python

from airflow_mlops.exceptions import DataValidationError, MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators import validation
from airflow_mlops.operators.validation import GXValidateOperator, ValidationReportLink

SUITE = ROOT / "dags" / "expectations" / "flights_batch.json"
HEAVY = ("ray", "feast", "great_expectations", "evidently", "bentoml", "sklearn", "lightgbm", "pandas")


class FakeTI:
    """The part of a task instance the operator uses: ids for the artifact path, and XCom push."""

    def __init__(self, run_id: str) -> None:
        self.dag_id, self.run_id, self.task_id = "unit_dag", run_id, "validate"
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def make_op(**kwargs: Any) -> GXValidateOperator:
    args = {"task_id": "validate", "data_uri": "x.parquet", "expectation_suite": str(SUITE)}
    return GXValidateOperator(**{**args, **kwargs})


def write_suite(path: Path, expectations: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"name": "tiny", "expectations": expectations}))
    return path


def test_template_fields_and_link() -> None:
    op = make_op(
        data_uri="flights/date={{ ds }}/f.parquet", quarantine_uri="q/{{ ds }}", batch_date="{{ ds }}"
    )
    assert set(GXValidateOperator.template_fields) == {
        "data_uri",
        "quarantine_uri",
        "batch_date",
        "batch_days",
        "expectation_parameters",
    }
    # templated values are kept as given; rendering happens later, in the worker
    assert op.data_uri == "flights/date={{ ds }}/f.parquet"
    assert op.batch_date == "{{ ds }}"
    assert [link.name for link in op.operator_extra_links] == ["Validation report"]
    assert ValidationReportLink().xcom_key == "_link_ValidationReportLink"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"expectation_suite": "expectations/flights.txt"}, "flights.txt"),
        ({"data_format": "xlsx"}, "xlsx"),
        ({"result_format": "COMPLETE"}, "COMPLETE"),
    ],
)
def test_bad_arguments_fail_at_definition(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(MLOpsArgumentError, match=named) as err:
        make_op(**kwargs)
    assert "validate" in str(err.value)  # names the task


def test_suite_file_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MLOpsArgumentError, match="broken.json.*not valid JSON"):
        validation.load_suite_spec(broken)
    empty = write_suite(tmp_path / "empty.json", [])
    with pytest.raises(MLOpsArgumentError, match="no list 'expectations'"):
        validation.load_suite_spec(empty)
    no_type = write_suite(tmp_path / "notype.json", [{"kwargs": {}}])
    with pytest.raises(MLOpsArgumentError, match="expectation #0"):
        validation.load_suite_spec(no_type)
    with pytest.raises(MLOpsArgumentError, match="missing.yaml.*cannot be read"):
        validation.load_suite_spec(tmp_path / "missing.yaml")


def test_yaml_suite_is_read(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "expectations:\n  - type: expect_table_row_count_to_be_between\n    kwargs: {min_value: 1}\n"
    )
    spec = validation.load_suite_spec(suite)
    assert spec["name"] == "s"
    assert spec["expectations"][0]["kwargs"] == {"min_value": 1}


def test_flights_suite_parameters_come_from_batch_date() -> None:
    spec = validation.load_suite_spec(SUITE)
    assert validation.suite_parameter_names(spec) == {
        *(f"batch_{part}_{bound}" for part in ("year", "month", "day") for bound in ("min", "max")),
        "batch_start",
        "batch_end",
    }
    op = make_op(batch_date="2013-03-10", batch_timezone="America/New_York")
    params = op.suite_parameters(spec, SUITE)
    # the New York day in UTC; 2013-03-10 is the spring-forward day, 23 hours long
    assert params["batch_start"] == "2013-03-10T05:00:00+00:00"
    assert params["batch_end"] == "2013-03-11T04:00:00+00:00"
    assert (params["batch_year"], params["batch_month"], params["batch_day"]) == (2013, 3, 10)
    with pytest.raises(MLOpsArgumentError, match=r"batch_day_max.*batch_end"):
        make_op().suite_parameters(spec, SUITE)
    with pytest.raises(MLOpsArgumentError, match="not a YYYY-MM-DD"):
        validation.batch_date_parameters("Jan 1st")
    with pytest.raises(MLOpsArgumentError, match="Mars/Olympus"):
        validation.batch_date_parameters("2013-01-01", "Mars/Olympus")


def test_summary_names_expectation_column_and_observation() -> None:
    result = {
        "success": False,
        "results": [
            {
                "success": True,
                "expectation_config": {
                    "type": "expect_column_values_to_not_be_null",
                    "kwargs": {"column": "carrier"},
                },
                "result": {},
            },
            {
                "success": False,
                "expectation_config": {
                    "type": "expect_column_values_to_be_between",
                    "kwargs": {"column": "dep_delay"},
                },
                "result": {
                    "unexpected_count": 7,
                    "unexpected_percent": 0.83,
                    "partial_unexpected_list": [1e6] * 7,
                },
            },
            {
                "success": False,
                "expectation_config": {"type": "expect_table_columns_to_match_set", "kwargs": {}},
                "result": {"observed_value": ["a"], "details": {"mismatched": {"missing": ["arr_delay"]}}},
            },
            {
                "success": False,
                "expectation_config": {
                    "type": "expect_column_values_to_be_in_set",
                    "kwargs": {"column": "nope"},
                },
                "exception_info": {
                    "raised_exception": True,
                    "exception_message": "column nope does not exist",
                },
            },
        ],
    }
    summary = validation.summarize(result)
    assert (summary["success"], summary["evaluated"], summary["failed"]) == (False, 4, 3)
    between, columns, missing = summary["failed_expectations"]
    assert between["column"] == "dep_delay"
    assert between["observed"]["unexpected_count"] == 7
    assert len(between["observed"]["sample"]) == 6  # five values and "... 2 more"
    assert columns["observed"]["missing_columns"] == ["arr_delay"]
    assert missing["observed"]["error"] == "column nope does not exist"
    text = validation._failure_text(between)
    assert "expect_column_values_to_be_between on column 'dep_delay': 7 unexpected values" in text
    json.dumps(summary)


class FakeGXResult:
    def __init__(self, success: bool) -> None:
        self.success = success

    def to_json_dict(self) -> dict[str, Any]:
        item = {
            "success": self.success,
            "expectation_config": {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": "origin"},
            },
            "result": {
                "unexpected_count": 0 if self.success else 2,
                "unexpected_percent": 50.0,
                "partial_unexpected_list": ["XXX", "YYY"],
            },
        }
        return {"success": self.success, "results": [item]}


@pytest.fixture
def fake_gx(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_validate(frame, suite, parameters, result_format):
        calls.append({"rows": len(frame), "parameters": parameters, "result_format": result_format})
        return FakeGXResult(success=set(frame["origin"]) <= {"EWR", "JFK", "LGA"})

    monkeypatch.setattr(validation, "validate_frame", fake_validate)
    monkeypatch.setattr(validation, "build_suite", lambda spec, source: spec["name"])
    monkeypatch.setattr(validation, "render_report", lambda result: "<html>report</html>")
    return calls


def land_tiny(path: Path, origins: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"origin": origins}), path)
    return path


def test_execute_returns_small_json_summary(tmp_path: Path, fake_gx: list[dict[str, Any]]) -> None:
    data = land_tiny(tmp_path / "landing" / "good.parquet", ["EWR", "JFK"])
    ti = FakeTI("run_good")
    op = make_op(
        data_uri=str(data),
        batch_date="2013-01-01",
        expectation_parameters={"extra": 1},
        quarantine_uri=str(tmp_path / "quarantine"),
    )
    out = op.execute({"ti": ti})
    assert set(out) == {
        "success",
        "data_uri",
        "suite",
        "rows",
        "evaluated",
        "failed",
        "failed_expectations",
        "result_uri",
        "docs_uri",
        "quarantine_uri",
    }
    assert (
        out["success"] is True and out["rows"] == 2 and out["failed"] == 0 and out["quarantine_uri"] is None
    )
    assert json.loads(json.dumps(out)) == out
    assert fake_gx[0]["parameters"]["extra"] == 1 and fake_gx[0]["parameters"]["batch_day"] == 1
    assert "unit_dag/run_good/validate/validation_report.html" in out["docs_uri"]
    assert json.loads(Path(out["result_uri"].removeprefix("file://")).read_text())["success"] is True
    assert ti.xcom[ValidationReportLink().xcom_key].endswith("/run_good/validate/validation_report.html")
    assert data.exists()  # a good batch stays where it landed


def test_a_relative_quarantine_uri_is_kept_under_the_quarantine_root(
    tmp_path: Path, fake_gx: list[dict[str, Any]], monkeypatch
) -> None:
    monkeypatch.setenv("AIRFLOW__MLOPS__QUARANTINE_ROOT", f"file://{tmp_path}/held")
    data = land_tiny(tmp_path / "landing" / "bad.parquet", ["EWR", "XXX"])
    op = make_op(data_uri=str(data), batch_date="2013-01-01", quarantine_uri="orders/date=2013-01-01")
    with pytest.raises(DataValidationError):
        op.execute({"ti": FakeTI("run_bad")})
    assert (tmp_path / "held" / "orders" / "date=2013-01-01" / "bad.parquet").exists() and not data.exists()


def test_failed_batch_is_moved_to_quarantine(tmp_path: Path, fake_gx: list[dict[str, Any]]) -> None:
    data = land_tiny(tmp_path / "landing" / "bad.parquet", ["EWR", "XXX"])
    quarantine = tmp_path / "quarantine" / "date=2013-01-01"
    op = make_op(data_uri=str(data), batch_date="2013-01-01", quarantine_uri=str(quarantine))
    with pytest.raises(DataValidationError) as err:
        op.execute({"ti": FakeTI("run_bad")})
    message = str(err.value)
    assert "bad.parquet" in message and "'origin'" in message and "XXX" in message
    assert "quarantine" in message
    assert isinstance(err.value, MLOpsInputError)  # fails the task without retries
    assert not data.exists()
    assert (quarantine / "bad.parquet").exists()
    beside = json.loads((quarantine / "bad.parquet.validation.json").read_text())
    assert beside["result"]["success"] is False and beside["failed"] == 1

    # a second bad batch of the same name never overwrites the first one
    land_tiny(data, ["ZZZ"])
    with pytest.raises(DataValidationError):
        op.execute({"ti": FakeTI("run_bad_again")})
    assert len(list(quarantine.glob("*bad.parquet"))) == 2


def test_fail_on_failure_false_returns_the_result(tmp_path: Path, fake_gx: list[dict[str, Any]]) -> None:
    data = land_tiny(tmp_path / "bad.parquet", ["XXX"])
    out = make_op(data_uri=str(data), batch_date="2013-01-01", fail_on_failure=False).execute(
        {"ti": FakeTI("r")}
    )
    assert out["success"] is False and out["failed"] == 1
    assert out["failed_expectations"][0]["column"] == "origin"
    assert data.exists()  # no quarantine_uri: left in place


def test_missing_batch_names_the_file(tmp_path: Path, fake_gx: list[dict[str, Any]]) -> None:
    op = make_op(data_uri=str(tmp_path / "nowhere.parquet"), batch_date="2013-01-01")
    with pytest.raises(DataValidationError, match="nowhere.parquet.*does not exist"):
        op.execute({"ti": FakeTI("r")})
    assert fake_gx == []


def test_relative_quarantine_goes_under_state_dir() -> None:
    op = make_op(quarantine_uri="flights/date=2013-01-01")
    assert str(op.quarantine_dir()).endswith("/mlops/quarantine/flights/date=2013-01-01")


def test_imports_stay_light() -> None:
    code = (
        "import sys, importlib.util\n"
        "import airflow_mlops, airflow_mlops.operators.validation, airflow_mlops.sensors.landing\n"
        "import airflow_mlops.triggers.landing\n"
        "from airflow_mlops.lifecycle import lifecycle_dags\n"
        "assert 'flights_ingest' in lifecycle_dags('dags/flights.yaml')\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_provider_registers_validation_modules() -> None:
    from airflow_mlops.get_provider_info import get_provider_info

    info = get_provider_info()
    modules = [
        m for group in ("operators", "sensors", "triggers") for e in info[group] for m in e["python-modules"]
    ]
    assert {
        "airflow_mlops.operators.validation",
        "airflow_mlops.sensors.landing",
        "airflow_mlops.triggers.landing",
    } <= set(modules)
    assert "airflow_mlops.operators.validation.ValidationReportLink" in info["extra-links"]
    assert all(e["integration-name"] == "airflow-mlops" for g in ("sensors", "triggers") for e in info[g])


def test_a_weekly_batch_bounds_its_seven_local_days_across_a_month_end() -> None:
    from airflow_mlops.operators.validation import batch_date_parameters

    week = batch_date_parameters("2013-01-29", "America/New_York", 7)
    assert week["batch_start"] == "2013-01-29T05:00:00+00:00"
    assert week["batch_end"] == "2013-02-05T05:00:00+00:00"
    assert (week["batch_month_min"], week["batch_month_max"]) == (1, 2)
    assert (week["batch_day_min"], week["batch_day_max"]) == (1, 31)
    day = batch_date_parameters("2013-01-29", "America/New_York")
    assert day["batch_day_min"] == day["batch_day_max"] == day["batch_day"] == 29
    with pytest.raises(MLOpsArgumentError, match="batch_days 0"):
        batch_date_parameters("2013-01-29", "UTC", 0)
