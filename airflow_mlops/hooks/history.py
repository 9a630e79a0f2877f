"""The history of drift checks and batch validations, kept in the shared state database for the UI.

Each :class:`~airflow_mlops.operators.drift.EvidentlyDriftOperator` run and each
:class:`~airflow_mlops.operators.validation.GXValidateOperator` run records one small summary document
(:class:`~airflow_mlops.hooks.state.MLOpsStateHook`), so the model pages of the UI plugin draw a year of
drift checks or every batch's verdict with one query instead of opening a JSON artifact per run:

- namespace ``drift_checks``, key ``<model or dag_id>/<run_id>/<task_id>``;
- namespace ``validations``, key ``<dag_id>/<run_id>/<task_id>``;

(``:<map_index>`` appended for a mapped task). A rerun of the task replaces its document: the history
holds one row per check, the last try's. The full results stay in the artifact store (``report_uri``,
``summary_uri``, ``result_uri``); the documents' fields are listed in ``docs/ui.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_mlops.hooks.state import MLOpsStateHook

#: namespace of the drift checks' summaries
DRIFT_CHECKS = "drift_checks"
#: namespace of the batch validations' summaries
VALIDATIONS = "validations"


def _state(state: MLOpsStateHook | None) -> MLOpsStateHook:
    if state is not None:
        return state
    from airflow_mlops.hooks.state import MLOpsStateHook

    return MLOpsStateHook()


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()
    return str(value)


def _task_of(context: Context | Mapping[str, Any]) -> dict[str, Any]:
    """Who ran: dag, run, task, map index and the run's data interval."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "map_index": -1 if map_index is None else int(map_index),
        "at": datetime.now(UTC).isoformat(),
        "data_interval_start": _iso(context.get("data_interval_start")),
        "data_interval_end": _iso(context.get("data_interval_end")),
    }


def record_key(owner: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """``<owner>/<run_id>/<task_id>``, with ``:<map_index>`` for a mapped task."""
    key = f"{owner}/{run_id}/{task_id}"
    return f"{key}:{map_index}" if map_index is not None and map_index >= 0 else key


def quality_threshold(metric: str | None, holdout: Any, max_decay: Any) -> float | None:
    """The value of ``metric`` at which decay is reported: ``holdout - max_decay`` for a score,
    ``holdout * (1 + max_decay)`` for a loss (None when a figure is missing)."""
    from airflow_mlops.ml.metrics import METRICS

    if metric not in METRICS or holdout is None or max_decay is None:
        return None
    if METRICS[metric].decay == "drop":
        return float(holdout) - float(max_decay)
    return float(holdout) * (1.0 + float(max_decay))


def drift_check_summary(result: Mapping[str, Any], context: Context | Mapping[str, Any]) -> dict[str, Any]:
    """The document recorded for one drift check (``result``: what the drift operator returns)."""
    quality = result.get("quality") or {}
    recorded_quality = None
    if quality.get("metric"):
        recorded_quality = {
            "metric": quality["metric"],
            "value": quality.get("score"),
            "holdout": quality.get("holdout_score"),
            "decay": quality.get("decay"),
            "max_decay": quality.get("max_decay"),
            "threshold": quality_threshold(
                quality["metric"], quality.get("holdout_score"), quality.get("max_decay")
            ),
            "labelled_rows": quality.get("labelled_rows"),
            "model_version": quality.get("model_version"),
        }
    window = result.get("window") or {}
    task = _task_of(context)
    if task["data_interval_start"] is None and window.get("start"):
        task["data_interval_start"] = f"{window['start']}T00:00:00+00:00"
    predictions = result.get("prediction_drift") or None
    return {
        "model": result.get("model"),
        "model_version": result.get("model_version"),
        **task,
        "window": {k: window.get(k) for k in ("start", "end", "rows", "source")},
        "drift_detected": bool(result.get("drift_detected")),
        "decay_detected": bool(result.get("decay_detected")),
        "drift_share": result.get("drift_share"),
        "threshold_share": result.get("drift_share_threshold"),
        "columns": {
            column: {k: figures.get(k) for k in ("score", "method", "threshold", "drifted")}
            for column, figures in (result.get("columns") or {}).items()
        },
        "quality": recorded_quality,
        "prediction_drift": {
            k: predictions.get(k)
            for k in ("rows", "score", "method", "threshold", "drift_detected", "reason")
        }
        if predictions
        else None,
        "report_uri": result.get("report_uri"),
        "summary_uri": result.get("summary_uri"),
        "event_id": result.get("event_id"),
    }


def record_drift_check(
    result: Mapping[str, Any], context: Context | Mapping[str, Any], state: MLOpsStateHook | None = None
) -> dict[str, Any]:
    """Record one drift check (namespace ``drift_checks``); returns the document."""
    body = drift_check_summary(result, context)
    owner = body["model"] or body["dag_id"]
    _state(state).put(
        DRIFT_CHECKS, record_key(owner, body["run_id"], body["task_id"], body["map_index"]), body
    )
    return body


def _batch_name(data_uri: str) -> str:
    """The batch as users name it: the landed file with its partition folder (``date=2013-01-08/x.parquet``)."""
    parts = [p for p in str(data_uri).rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(data_uri)


def validation_summary(outcome: Mapping[str, Any], context: Context | Mapping[str, Any]) -> dict[str, Any]:
    """The document recorded for one validated batch (``outcome``: what the validation operator returns)."""
    failed = []
    for failure in outcome.get("failed_expectations") or []:
        failed.append(
            {
                "expectation": failure.get("expectation"),
                "column": failure.get("column"),
                "details": failure.get("observed"),
            }
        )
    return {
        **_task_of(context),
        "batch": _batch_name(str(outcome.get("data_uri") or "")),
        "data_uri": outcome.get("data_uri"),
        "suite": outcome.get("suite"),
        "rows": outcome.get("rows"),
        "passed": bool(outcome.get("success")),
        "evaluated": outcome.get("evaluated"),
        "failed_expectations": failed,
        "read_error": outcome.get("read_error"),
        "quarantined_uri": outcome.get("quarantine_uri"),
        "report_uri": outcome.get("docs_uri"),
        "result_uri": outcome.get("result_uri"),
    }


def record_validation(
    outcome: Mapping[str, Any], context: Context | Mapping[str, Any], state: MLOpsStateHook | None = None
) -> dict[str, Any]:
    """Record one batch validation (namespace ``validations``); returns the document."""
    body = validation_summary(outcome, context)
    key = record_key(body["dag_id"], body["run_id"], body["task_id"], body["map_index"])
    _state(state).put(VALIDATIONS, key, body)
    return body


def drift_checks(model: str | None = None, state: MLOpsStateHook | None = None) -> list[dict[str, Any]]:
    """The recorded drift checks (of ``model``), oldest data interval first."""
    prefix = f"{model}/" if model else ""
    rows = list(_state(state).documents(DRIFT_CHECKS, prefix).values())
    return sorted(rows, key=lambda r: (r.get("data_interval_start") or "", r.get("at") or ""))


def validations(dag_ids: set[str] | None = None, state: MLOpsStateHook | None = None) -> list[dict[str, Any]]:
    """The recorded batch validations (of the DAGs ``dag_ids``), newest data interval first."""
    found = _state(state).documents(VALIDATIONS)
    rows = [r for r in found.values() if dag_ids is None or r.get("dag_id") in dag_ids]
    return sorted(rows, key=lambda r: (r.get("data_interval_start") or "", r.get("at") or ""), reverse=True)


def task_record(
    dag_id: str, run_id: str, task_id: str, map_index: int = -1, state: MLOpsStateHook | None = None
) -> tuple[str, dict[str, Any]] | None:
    """``(kind, document)`` recorded by one task instance (kind ``drift`` or ``validation``), or None."""
    hook = _state(state)
    validation = hook.get(VALIDATIONS, record_key(dag_id, run_id, task_id, map_index))
    if validation is not None:
        return "validation", validation
    suffix = f"/{run_id}/{task_id}" + (f":{map_index}" if map_index >= 0 else "")
    for key, body in hook.documents(DRIFT_CHECKS).items():
        if key.endswith(suffix) and body.get("dag_id") == dag_id:
            return "drift", body
    return None
