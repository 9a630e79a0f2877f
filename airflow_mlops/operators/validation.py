"""Validate a landed batch with Great Expectations 1.x and quarantine what fails.

:class:`GXValidateOperator` reads one batch (parquet or CSV on any ``ObjectStoragePath``), validates it
against an expectation suite kept as a JSON or YAML file next to the DAGs, writes the full result
(JSON) and its Data Docs page (HTML) to the artifact store, and returns a small JSON-able summary.
A batch that fails, or cannot even be read, is moved (never deleted) to the quarantine location with
its result beside it, and the task fails with a message naming the file, each failed expectation and
its column.

Great Expectations and pandas are imported only inside the functions that need them: importing this
module (and so parsing a DAG that uses the operator) stays cheap.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from airflow_mlops.artifacts import ArtifactStore, as_path, is_local, reaching, staged
from airflow_mlops.exceptions import DataValidationError, MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.offline_store import read_parquet_batch, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context, ObjectStoragePath
    from airflow.sdk.definitions._internal.abstractoperator import TaskInstanceKey
    from great_expectations.core import ExpectationSuite

SUITE_SUFFIXES = (".json", ".yaml", ".yml")
DATA_FORMATS = ("auto", "parquet", "csv")
RESULT_FORMATS = ("BOOLEAN_ONLY", "BASIC", "SUMMARY")
RESULT_NAME = "validation_result.json"
REPORT_NAME = "validation_report.html"
#: Suffix of the result file written beside a quarantined batch.
QUARANTINE_RESULT_SUFFIX = ".validation.json"
_OTHER_DELIMITERS = (";", "\t", "|")
_SAMPLE = 5


# --------------------------------------------------------------------------- the suite file


def load_suite_spec(path: str | Path) -> dict[str, Any]:
    """Read an expectation suite file (JSON or YAML) and check its shape.

    The format is GX's own serialized suite: ``{"name": ..., "expectations": [{"type": ...,
    "kwargs": {...}, "meta": {...}}, ...], "meta": {...}}``; ``name`` defaults to the file's stem.

    :raises MLOpsArgumentError: the file is missing, not JSON/YAML, or not shaped like a suite.
    """
    path = Path(path)
    fix = "keep the suite as GX's JSON/YAML form: a mapping with 'name' and a list 'expectations' of {type, kwargs}."
    if path.suffix.lower() not in SUITE_SUFFIXES:
        raise MLOpsArgumentError(f"expectation suite {str(path)!r} is neither .json nor .yaml/.yml.", fix=fix)
    try:
        text = path.read_text()
    except OSError as err:
        raise MLOpsArgumentError(
            f"expectation suite file {str(path)!r} cannot be read ({err.strerror}).",
            fix="give the path of a suite file kept with the DAGs, absolute or relative to the DAG file's folder.",
        ) from err
    if path.suffix.lower() == ".json":
        try:
            spec = json.loads(text)
        except ValueError as err:
            raise MLOpsArgumentError(
                f"expectation suite {str(path)!r} is not valid JSON ({err}).", fix=fix
            ) from err
    else:
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise MLOpsArgumentError(
                f"expectation suite {str(path)!r} is not valid YAML ({err}).", fix=fix
            ) from err
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("expectations"), list)
        or not spec["expectations"]
    ):
        raise MLOpsArgumentError(f"expectation suite {str(path)!r} has no list 'expectations'.", fix=fix)
    for index, item in enumerate(spec["expectations"]):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("type"), str)
            or not isinstance(item.get("kwargs", {}), dict)
        ):
            raise MLOpsArgumentError(
                f"expectation #{index} of suite {str(path)!r} is not a mapping with 'type' and 'kwargs'.",
                fix=fix,
            )
    spec.setdefault("name", path.stem)
    return spec


def suite_parameter_names(spec: dict[str, Any]) -> set[str]:
    """Names of the ``{"$PARAMETER": name}`` placeholders used anywhere in the suite's kwargs."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            if isinstance(value.get("$PARAMETER"), str):
                yield value["$PARAMETER"]
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    return {name for item in spec["expectations"] for name in walk(item.get("kwargs", {}))}


def batch_date_parameters(
    batch_date: str, batch_timezone: str = "UTC", batch_days: int = 1
) -> dict[str, Any]:
    """Suite parameters describing the batch's date.

    A batch covers ``batch_days`` local days from ``batch_date`` (1: a daily batch, 7: a weekly one).
    ``batch_start`` / ``batch_end`` are the UTC instants at which those days begin and end in
    ``batch_timezone`` (a day is 23 or 25 hours on daylight-saving days); ``batch_date``, ``batch_year``,
    ``batch_month`` and ``batch_day`` are the first day; ``batch_{year,month,day}_{min,max}`` bound the
    date parts over all the batch's days (equal to the day itself for a daily batch).

    :raises MLOpsArgumentError: the date or the time zone is not valid.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        day = date.fromisoformat(str(batch_date).strip()[:10])
    except ValueError as err:
        raise MLOpsArgumentError(
            f"batch_date {batch_date!r} is not a YYYY-MM-DD date.",
            fix="pass e.g. batch_date='{{ data_interval_start | ds }}'.",
        ) from err
    try:
        zone = ZoneInfo(batch_timezone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise MLOpsArgumentError(
            f"batch_timezone {batch_timezone!r} is not a known IANA time zone.",
            fix="pass a name such as 'UTC' or 'America/New_York'.",
        ) from err
    try:
        count = int(batch_days)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise MLOpsArgumentError(
            f"batch_days {batch_days!r} is not a positive number of days.",
            fix="pass 1 for daily batches, 7 for weekly ones.",
        )
    days = [day + timedelta(days=n) for n in range(count)]
    start = datetime.combine(day, time(), zone).astimezone(UTC)
    end = datetime.combine(days[-1] + timedelta(days=1), time(), zone).astimezone(UTC)
    bounds = {
        f"batch_{part}_{agg.__name__}": agg(getattr(d, part) for d in days)
        for part in ("year", "month", "day")
        for agg in (min, max)
    }
    return {
        "batch_date": day.isoformat(),
        "batch_year": day.year,
        "batch_month": day.month,
        "batch_day": day.day,
        **bounds,
        "batch_days": count,
        "batch_start": start.isoformat(),
        "batch_end": end.isoformat(),
    }


# --------------------------------------------------------------------------- Great Expectations


@lru_cache(maxsize=1)
def _batch_definition() -> Any:
    """One ephemeral GX context per process, with a pandas data source whose batch is a whole dataframe.

    Cached: importing GX and building the context is the expensive part, validating is not.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("airflow_mlops").add_dataframe_asset("batch")
    return asset.add_batch_definition_whole_dataframe("whole_batch")


def build_suite(spec: dict[str, Any], source: str = "suite") -> ExpectationSuite:
    """A GX ``ExpectationSuite`` from a checked spec (see :func:`load_suite_spec`).

    GX drops an invalid expectation from a suite with only a log line; here it is an error naming it.

    :raises MLOpsArgumentError: an expectation is unknown to GX or has invalid arguments.
    """
    from great_expectations.core import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = []
    for index, item in enumerate(spec["expectations"]):
        try:
            config = ExpectationConfiguration(
                type=item["type"], kwargs=dict(item.get("kwargs", {})), meta=item.get("meta") or {}
            )
            expectations.append(config.to_domain_obj())
        except Exception as err:  # GX raises several unrelated types for a bad configuration
            raise MLOpsArgumentError(
                f"expectation #{index} ({item['type']}) of suite {source!r} is not valid for Great "
                f"Expectations: {err}",
                fix="check the expectation's name and kwargs against the GX 1.x expectation gallery.",
            ) from err
    return ExpectationSuite(name=str(spec["name"]), expectations=expectations, meta=spec.get("meta") or {})


def validate_frame(
    frame: pd.DataFrame,
    suite: ExpectationSuite,
    parameters: dict[str, Any] | None = None,
    result_format: str = "SUMMARY",
) -> Any:
    """Validate ``frame`` against ``suite``; returns GX's ``ExpectationSuiteValidationResult``."""
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, expectation_parameters=parameters or {}, result_format=result_format)


def render_report(result: Any) -> str:
    """The Data Docs HTML page of a validation result (the page a GX Data Docs site shows for it)."""
    from great_expectations.render.renderer.page_renderer import ValidationResultsPageRenderer
    from great_expectations.render.view.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))


def _short(value: Any, limit: int = 200) -> Any:
    """A JSON value cut to a readable size."""
    if isinstance(value, list) and len(value) > _SAMPLE:
        value = [*value[:_SAMPLE], f"... {len(value) - _SAMPLE} more"]
    text = json.dumps(value, default=str)
    return value if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(item: dict[str, Any]) -> str | None:
    info = item.get("exception_info") or {}
    infos = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [i.get("exception_message") for i in infos if i.get("raised_exception")]
    return "; ".join(str(m) for m in messages if m) or None


def describe_failure(item: dict[str, Any]) -> dict[str, Any]:
    """The summary of one failed expectation result (JSON form): type, column and what was observed."""
    config = item.get("expectation_config") or {}
    kwargs = config.get("kwargs") or {}
    result = item.get("result") or {}
    column = kwargs.get("column") or kwargs.get("column_list") or kwargs.get("column_A")
    observed: dict[str, Any] = {}
    error = _exception_message(item)
    if error:
        observed["error"] = error
    if "observed_value" in result:
        observed["observed_value"] = _short(result["observed_value"])
    mismatched = (result.get("details") or {}).get("mismatched")
    if isinstance(mismatched, dict):
        observed.update({f"{k}_columns": v for k, v in mismatched.items() if v})
    if result.get("unexpected_count"):
        observed["unexpected_count"] = result["unexpected_count"]
        observed["unexpected_percent"] = round(float(result.get("unexpected_percent") or 0.0), 3)
        observed["sample"] = _short(result.get("partial_unexpected_list") or [])
    return {"expectation": config.get("type"), "column": column, "observed": observed}


def _failure_text(failure: dict[str, Any]) -> str:
    column = failure["column"]
    where = (
        f" on column {column!r}" if isinstance(column, str) else (f" on columns {column}" if column else "")
    )
    observed = failure["observed"]
    if "error" in observed:
        what = f"error: {observed['error']}"
    elif "unexpected_count" in observed:
        what = (
            f"{observed['unexpected_count']} unexpected values ({observed['unexpected_percent']}%), "
            f"e.g. {observed['sample']}"
        )
    else:
        what = ", ".join(f"{k} {v}" for k, v in observed.items()) or "failed"
    return f"{failure['expectation']}{where}: {what}"


def summarize(result_json: dict[str, Any]) -> dict[str, Any]:
    """Counts and failed expectations of a validation result (JSON form)."""
    results = result_json.get("results") or []
    failed = [describe_failure(item) for item in results if not item.get("success")]
    return {
        "success": bool(result_json.get("success")),
        "evaluated": len(results),
        "failed": len(failed),
        "failed_expectations": failed,
    }


# --------------------------------------------------------------------------- reading a batch


def detect_format(path: ObjectStoragePath, data_format: str) -> str:
    if data_format != "auto":
        return data_format
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".txt")):
        return "csv"
    return "parquet"


def read_batch(
    path: ObjectStoragePath, data_format: str = "auto", csv_options: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Read a batch into a DataFrame: parquet (a file or a folder of files) or CSV.

    :raises DataValidationError: the file cannot be read as that format, naming it; for a CSV read as
        one single column, names the delimiter it seems to use instead.
    """
    fmt = detect_format(path, data_format)
    if fmt == "parquet":
        try:
            return read_parquet_batch(path).to_pandas()
        except MLOpsInputError as err:
            raise DataValidationError(err.problem, fix=err.fix) from err
    import pandas as pd

    options = {"sep": ",", **(csv_options or {})}
    try:
        with reaching(path), path.open("rb") as handle:  # a store not reached is not a bad file
            frame = pd.read_csv(handle, **options)
    except (
        ValueError,
        OSError,
        UnicodeDecodeError,
    ) as err:  # pandas' ParserError/EmptyDataError are ValueErrors
        raise DataValidationError(
            f"landed file {str(path)!r} is not readable CSV ({err}).",
            fix="re-land the file from its source, or pass csv_options matching its dialect.",
        ) from err
    if len(frame.columns) == 1:
        header = str(frame.columns[0])
        other = next((d for d in _OTHER_DELIMITERS if d in header), None)
        if other is not None:
            raise DataValidationError(
                f"landed file {str(path)!r} parsed as one single column {header[:80]!r}: it looks delimited by "
                f"{other!r}, not by {options['sep']!r}.",
                fix=f"re-land the file delimited by {options['sep']!r}, or pass csv_options={{'sep': {other!r}}}.",
            )
    return frame


# --------------------------------------------------------------------------- quarantine


def quarantine_batch(source: ObjectStoragePath, target_dir: ObjectStoragePath, result: dict[str, Any]) -> str:
    """Move ``source`` (a file or folder) into ``target_dir`` and write ``result`` beside it as JSON.

    Nothing is deleted: an earlier quarantined batch of the same name is kept and the new one gets a
    time-stamped name. On a local file system the move is a rename; across stores the data is copied
    and the source removed only after the copy is complete.

    :return: the URI of the quarantined batch.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.name
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = target_dir / f"{stamp}-{source.name}"
    if is_local(source) and is_local(target):
        shutil.move(source.path, target.path)
    else:
        source.move(target, recursive=source.is_dir())
    with staged(target_dir / f"{target.name}{QUARANTINE_RESULT_SUFFIX}") as tmp:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return str(target)


# --------------------------------------------------------------------------- Airflow


class ValidationReportLink(BaseOperatorLink):
    """Extra link "Validation report": the Data Docs page of the run, through the airflow-mlops UI plugin.

    The operator stores the URL in XCom under :attr:`xcom_key` as soon as the report is written, also
    when the validation fails, which is when the report matters most.
    """

    name = "Validation report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""


class GXValidateOperator(BaseOperator):
    """Validate a batch with a Great Expectations 1.x suite; quarantine it and fail when it does not pass.

    The batch is read with pandas and validated in an ephemeral GX context (nothing to configure, no
    GX project folder). The full result (JSON) and its Data Docs page (HTML) go to the artifact store;
    XCom gets only the summary below. A batch that fails its suite, or cannot be read (corrupt parquet,
    CSV with another delimiter, empty file), is moved to ``quarantine_uri`` with the result beside it.

    Returns ``{"success", "data_uri", "suite", "rows", "evaluated", "failed", "failed_expectations":
    [{"expectation", "column", "observed"}], "result_uri", "docs_uri", "quarantine_uri"}``.

    :param data_uri: the batch: parquet file (or folder of parquet files) or CSV file, as a URI on any
        ``ObjectStoragePath`` store; a relative path is taken under ``[mlops] landing_root`` (templated).
    :param expectation_suite: path of the suite file (GX's JSON or YAML form), absolute or relative to
        the DAG file's folder (then to ``[core] dags_folder``). Its expectations may use
        ``{"$PARAMETER": name}`` placeholders, filled from ``batch_date`` and ``expectation_parameters``.
    :param batch_date: the batch's day, ``YYYY-MM-DD``; provides the suite parameters ``batch_date``,
        ``batch_year``, ``batch_month``, ``batch_day``, ``batch_start`` and ``batch_end`` (templated).
    :param batch_timezone: IANA time zone in which ``batch_date`` is a local day; ``batch_start`` and
        ``batch_end`` are that day's bounds in UTC.
    :param batch_days: local days the batch covers from ``batch_date`` (7 for weekly batches); the
        parameters then bound the whole span (``batch_{year,month,day}_{min,max}``) (templated).
    :param expectation_parameters: further suite parameters; they override the date ones (templated).
    :param fail_on_failure: fail the task when the suite fails (the default); with False the summary is
        returned with ``success: false`` (the batch is still quarantined when ``quarantine_uri`` is set).
    :param quarantine_uri: folder a failed batch is moved to, with ``<file>.validation.json`` beside it; a
        relative path is taken under ``[mlops] quarantine_root`` (default: ``quarantine`` beside
        ``[mlops] landing_root``, so on the object store the batches landed on); None leaves a failed batch in
        place (templated).
    :param data_format: ``auto`` (by file suffix: ``.csv`` is CSV, anything else parquet), ``parquet``
        or ``csv``.
    :param csv_options: keyword arguments for ``pandas.read_csv`` (e.g. ``{"parse_dates": ["time_hour"]}``).
    :param result_format: GX result format: ``BOOLEAN_ONLY``, ``BASIC`` or ``SUMMARY`` (the default,
        which keeps a sample of unexpected values).
    :param data_conn_id: Airflow connection for a remote ``data_uri`` / ``quarantine_uri``.
    """

    template_fields: Sequence[str] = (
        "data_uri",
        "quarantine_uri",
        "batch_date",
        "batch_days",
        "expectation_parameters",
    )
    template_fields_renderers = {"expectation_parameters": "json"}
    operator_extra_links = (ValidationReportLink(),)
    ui_color = "#fbe8c8"

    def __init__(
        self,
        *,
        data_uri: str,
        expectation_suite: str,
        batch_date: str | None = None,
        batch_timezone: str = "UTC",
        batch_days: int | str = 1,
        expectation_parameters: dict[str, Any] | None = None,
        fail_on_failure: bool = True,
        quarantine_uri: str | None = None,
        data_format: str = "auto",
        csv_options: dict[str, Any] | None = None,
        result_format: str = "SUMMARY",
        data_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(expectation_suite, str) or not expectation_suite.lower().endswith(SUITE_SUFFIXES):
            raise MLOpsArgumentError(
                f"expectation_suite {expectation_suite!r} of task {self.task_id!r} is not a .json or .yaml file path.",
                fix="pass the path of the suite file kept with the DAGs, e.g. 'expectations/orders_batch.json'.",
            )
        if data_format not in DATA_FORMATS:
            raise MLOpsArgumentError(
                f"data_format {data_format!r} of task {self.task_id!r} is not one of "
                f"{', '.join(DATA_FORMATS)}.",
                fix="pick one of those.",
            )
        if result_format not in RESULT_FORMATS:
            raise MLOpsArgumentError(
                f"result_format {result_format!r} of task {self.task_id!r} is not one of "
                f"{', '.join(RESULT_FORMATS)}.",
                fix="pick one of those.",
            )
        self.data_uri = data_uri
        self.expectation_suite = expectation_suite
        self.batch_date = batch_date
        self.batch_timezone = batch_timezone
        self.batch_days = batch_days
        self.expectation_parameters = expectation_parameters
        self.fail_on_failure = fail_on_failure
        self.quarantine_uri = quarantine_uri
        self.data_format = data_format
        self.csv_options = csv_options
        self.result_format = result_format
        self.data_conn_id = data_conn_id

    @cached_property
    def artifact_store(self) -> ArtifactStore:
        return ArtifactStore()

    def suite_path(self) -> Path:
        """The suite file: absolute, else next to the DAG file, else under ``[core] dags_folder``."""
        path = Path(self.expectation_suite)
        if path.is_absolute():
            return path
        candidates = []
        if self.has_dag() and getattr(self.dag, "fileloc", None):
            candidates.append(Path(self.dag.fileloc).parent / path)
        from airflow.sdk.configuration import conf

        candidates.append(Path(conf.get("core", "dags_folder")) / path)
        return next((c for c in candidates if c.exists()), candidates[0])

    def suite_parameters(self, spec: dict[str, Any], suite_file: Path) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.batch_date:
            params.update(batch_date_parameters(self.batch_date, self.batch_timezone, self.batch_days))
        if self.expectation_parameters is not None:
            if not isinstance(self.expectation_parameters, dict):
                raise MLOpsArgumentError(
                    f"expectation_parameters of task {self.task_id!r} rendered to "
                    f"{self.expectation_parameters!r}, not a mapping.",
                    fix="pass a dict of parameter name to value.",
                )
            params.update(self.expectation_parameters)
        missing = sorted(suite_parameter_names(spec) - set(params))
        if missing:
            raise MLOpsArgumentError(
                f"suite {str(suite_file)!r} uses the parameters {missing}, which task {self.task_id!r} does not set.",
                fix="pass batch_date= (for the batch_* parameters) or expectation_parameters={name: value}.",
            )
        return params

    def quarantine_dir(self) -> ObjectStoragePath | None:
        if not self.quarantine_uri:
            return None
        root = self.artifact_store.settings.quarantine
        return as_path(resolve_uri(str(self.quarantine_uri), root), conn_id=self.data_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        store = self.artifact_store
        source = as_path(
            resolve_uri(str(self.data_uri), store.settings.landing_root), conn_id=self.data_conn_id
        )
        suite_file = self.suite_path()
        spec = load_suite_spec(suite_file)
        parameters = self.suite_parameters(spec, suite_file)
        quarantine_dir = self.quarantine_dir()

        with reaching(source):
            landed = source.exists()
        if not landed:
            where = ""
            if quarantine_dir is not None and (quarantine_dir / source.name).exists():
                where = f" A batch of that name is in quarantine at {str(quarantine_dir / source.name)!r}."
            raise DataValidationError(
                f"batch {str(source)!r} does not exist.{where}",
                fix="check that the batch for this data interval has landed (re-land a corrected batch "
                "after a quarantine), then clear the task to rerun it.",
            )

        result_target = store.for_task(context, RESULT_NAME)
        report_target = store.for_task(context, REPORT_NAME)
        try:
            frame = read_batch(source, self.data_format, self.csv_options)
        except DataValidationError as err:
            result_json = {
                "success": False,
                "data_uri": str(source),
                "suite": spec["name"],
                "read_error": err.problem,
            }
            summary = {"success": False, "evaluated": 0, "failed": 0, "failed_expectations": []}
            page = (
                f"<html><body><h1>Batch could not be read</h1><p>{html.escape(str(source))}</p>"
                f"<pre>{html.escape(str(err))}</pre></body></html>"
            )
            outcome = self._publish(
                context,
                source,
                spec,
                None,
                summary,
                result_json,
                page,
                result_target,
                report_target,
                quarantine_dir,
            )
            raise DataValidationError(f"{err.problem}{self._quarantine_note(outcome)}", fix=err.fix) from err

        self.log.info(
            "Validating %d rows of %s against suite %s (%s)", len(frame), source, spec["name"], suite_file
        )
        gx_result = validate_frame(frame, build_suite(spec, str(suite_file)), parameters, self.result_format)
        result_json = gx_result.to_json_dict()
        summary = summarize(result_json)
        outcome = self._publish(
            context,
            source,
            spec,
            len(frame),
            summary,
            result_json,
            render_report(gx_result),
            result_target,
            report_target,
            quarantine_dir,
        )
        self.log.info(
            "Suite %s on %s: %d of %d expectations failed; report %s",
            spec["name"],
            source,
            summary["failed"],
            summary["evaluated"],
            outcome["docs_uri"],
        )
        if summary["success"]:
            return outcome
        for failure in summary["failed_expectations"]:
            self.log.error("Failed: %s", _failure_text(failure))
        if not self.fail_on_failure:
            return outcome
        raise DataValidationError(
            f"batch {str(source)!r} failed {summary['failed']} of {summary['evaluated']} expectations of suite "
            f"{spec['name']!r} ({suite_file}): "
            + "; ".join(_failure_text(f) for f in summary["failed_expectations"])
            + f".{self._quarantine_note(outcome)}",
            fix=f"see the report {outcome['docs_uri']}; correct the batch at its source, re-land it and clear "
            "this task (or change the suite if the expectation is wrong).",
        )

    @staticmethod
    def _quarantine_note(outcome: dict[str, Any]) -> str:
        if outcome.get("quarantine_uri"):
            return f" The batch was moved to quarantine: {outcome['quarantine_uri']!r}."
        return " The batch was left in place (no quarantine_uri)."

    def _publish(
        self,
        context: Context,
        source: ObjectStoragePath,
        spec: dict[str, Any],
        rows: int | None,
        summary: dict[str, Any],
        result_json: dict[str, Any],
        page: str,
        result_target: ObjectStoragePath,
        report_target: ObjectStoragePath,
        quarantine_dir: ObjectStoragePath | None,
    ) -> dict[str, Any]:
        """Write the result and the report, store the report link, quarantine a failed batch."""
        store = self.artifact_store
        result_uri = store.write_json(result_target, result_json).uri
        docs_uri = store.write_bytes(report_target, page.encode()).uri
        from airflow_mlops.plugins.mlops_plugin import artifact_url

        context["ti"].xcom_push(key=ValidationReportLink().xcom_key, value=artifact_url(docs_uri) or docs_uri)
        outcome = {
            "success": summary["success"],
            "data_uri": str(source),
            "suite": spec["name"],
            "rows": rows,
            **{k: summary[k] for k in ("evaluated", "failed", "failed_expectations")},
            "result_uri": result_uri,
            "docs_uri": docs_uri,
            "quarantine_uri": None,
        }
        if not summary["success"] and quarantine_dir is not None:
            outcome["quarantine_uri"] = quarantine_batch(
                source, quarantine_dir, {**outcome, "result": result_json}
            )
            self.log.warning("Moved failed batch %s to quarantine %s", source, outcome["quarantine_uri"])
        from airflow_mlops.hooks.history import record_validation

        record_validation({**outcome, "read_error": result_json.get("read_error")}, context)  # docs/ui.md
        return outcome
