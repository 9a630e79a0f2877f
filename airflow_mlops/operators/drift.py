"""Drift monitoring with Evidently 0.7: data drift of a recent window against the production model's
reference, prediction drift of the served predictions against the model's predictions on its holdout,
quality decay where labels have arrived (the task's metric on the window against the holdout score), and
an Asset event only when something is wrong.

The reference is the training snapshot of the model in production (found through the registry's
``training_manifest``) or a given URI. Its drift columns are projected once into a cached parquet with
per-column statistics (``<artifact_root>/drift/reference/<key>/``); every later check of the same
reference reads that small file. The current window is read from the offline store partitions
(``<offline_root>/<table>/date=YYYY-MM-DD/part-0.parquet``) or from the prediction log
(:mod:`airflow_mlops.ml.prediction_log`). The computation itself lives in :mod:`airflow_mlops.ml.drift`
(re-exported here).

Emitting the drift event: the model's drift ``Asset`` is a declared outlet of the operator, so Airflow's
Assets page names the monitor task that produces it. In Airflow 3.3's Task SDK every concrete ``Asset``
in a task's ``outlets`` gets an event when the task succeeds, whatever the task does: the worker sends
the task's ``outlets`` as they are when it finishes (``ti.task.outlets``) and the API server records one
event per Asset among them, with the ``extra`` set through ``outlet_events[asset].extra``. The operator
therefore sets the event's ``extra`` (the figures and ``model_page``, the model's page in Airflow's UI)
only when drift, prediction drift or decay was found, and on a calm run drops the drift Asset from the
outlets of the running task: no event is created. (An earlier release emitted through an
``AssetAlias``, which kept the producing task off the Assets page.)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, BaseOperator, BaseOperatorLink

from airflow_mlops.artifacts import ArtifactStore, as_path, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.ml.drift import (  # re-exported: the public drift API has lived here
    P_VALUE_METHODS,
    column_statistics,
    drift_event_id,
    normalize_columns,
    prepare_reference,
    read_frame,
    reference_key,
    run_drift_report,
    specs_for,
    summarize_snapshot,
    typed,
)
from airflow_mlops.operators.offline_store import PARTITION_FILE, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context
    from airflow.sdk.definitions._internal.abstractoperator import TaskInstanceKey

    from airflow_mlops.hooks.bentoml import BentoMLHook

#: the old private name of :func:`airflow_mlops.ml.drift.typed`
_typed = typed

__all__ = [
    "P_VALUE_METHODS",
    "DriftBaselineOperator",
    "DriftReportLink",
    "EvidentlyDriftOperator",
    "RetrainingGateOperator",
    "column_statistics",
    "drift_alias",
    "drift_event_id",
    "emitted_drift_events",
    "event_extra",
    "normalize_columns",
    "prepare_reference",
    "production_model",
    "production_reference",
    "read_frame",
    "read_offline_window",
    "reference_key",
    "run_drift_report",
    "specs_for",
    "summarize_snapshot",
    "window_dates",
]


def production_model(model_name: str, hook: BentoMLHook | None = None) -> dict[str, Any] | None:
    """The version of ``model_name`` in production with what the quality check needs, or None.

    :return: ``{"model", "version", "holdout_metrics", "promotion", "feature_service", "record"}``
        (``promotion``: the registry decision that promoted it, with its ``metric`` and ``holdout_uri``).
    """
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.drift import promotion_decision

    hook = hook or BentoMLHook()
    index = hook.read_index(model_name)
    version = hook.production_version(model_name, index)
    if not version:
        return None
    record = hook.version_record(index, version)
    return {
        "model": model_name,
        "version": version,
        "holdout_metrics": _holdout_metrics(record),
        "promotion": promotion_decision(record),
        "feature_service": record.get("feature_service"),
        "record": record,
    }


def production_reference(model_name: str, hook: BentoMLHook | None = None) -> dict[str, Any]:
    """The drift reference of the model in production: its training snapshot, found through the registry.

    :return: ``{"model", "version", "reference_uri", "manifest_uri", "time_range", "holdout_metrics",
        "promotion", "feature_service", "record"}``.
    :raises MLOpsInputError: no production version, or it records no training manifest.
    """
    production = production_model(model_name, hook)
    if production is None:
        raise MLOpsInputError(
            f"model {model_name!r} has no production version, so there is no drift reference.",
            fix="promote a model first, or pass reference_uri= to the drift operator.",
        )
    version, record = production["version"], production["record"]
    manifest = record.get("training_manifest") or {}
    if not manifest.get("uri"):
        raise MLOpsInputError(
            f"production version {version!r} of {model_name!r} records no training manifest.",
            fix="register models with training_manifest_uri=, or pass reference_uri= to the drift operator.",
        )
    manifest_body = json.loads(as_path(manifest["uri"]).read_bytes())
    return {
        "model": model_name,
        "version": version,
        "reference_uri": manifest_body.get("data_uri") or manifest["uri"],
        "manifest_uri": manifest["uri"],
        "time_range": manifest.get("time_range"),
        "holdout_metrics": production["holdout_metrics"],
        "promotion": production["promotion"],
        "feature_service": production["feature_service"],
        "record": record,
    }


def _holdout_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Holdout quality recorded at promotion (the candidate score of the last promote decision, under its
    metric), over the validation metrics recorded at registration (for the metrics promotion did not
    score)."""
    from airflow_mlops.ml.drift import promotion_decision

    metrics = {
        k: float(v)
        for k, v in (record.get("metrics") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    decision = promotion_decision(record)
    if decision and decision.get("candidate_score") is not None:
        metrics[decision.get("metric") or "auc"] = float(decision["candidate_score"])
    return metrics


# --------------------------------------------------------------------------- current window
def window_dates(window_end: str, window_days: int, window_start: str | None = None) -> list[str]:
    """The dates of the window, oldest first (``window_start`` to ``window_end`` inclusive)."""
    end = date.fromisoformat(str(window_end)[:10])
    start = (
        date.fromisoformat(str(window_start)[:10])
        if window_start
        else end - timedelta(days=int(window_days) - 1)
    )
    if start > end:
        raise MLOpsArgumentError(
            f"drift window starts ({start}) after it ends ({end}).", fix="check window_start/window_end."
        )
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def read_offline_window(
    offline_root: str, table: str, dates: Sequence[str], joins: Sequence[Mapping[str, Any]] = ()
) -> pd.DataFrame:
    """Validated rows of ``table`` for ``dates`` from the offline store, each join applied (left).

    :param joins: ``[{"uri": ..., "on": [...], "columns": [...]}]``; a relative ``uri`` is taken under
        ``offline_root``.
    :raises MLOpsInputError: no partition of the window exists, or it holds no rows.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    root = as_path(offline_root) / table
    frames = []
    for day in dates:
        part = root / f"date={day}" / PARTITION_FILE
        if part.exists():
            with part.open("rb") as handle:
                frames.append(pq.read_table(handle).to_pandas())
    rows = sum(len(f) for f in frames)
    if not rows:
        raise MLOpsInputError(
            f"the drift window {dates[0]}..{dates[-1]} is empty: no rows of table {table!r} under {str(root)!r}.",
            fix="check that the ingest DAG published these days (or move the window with window_end/window_days); "
            "a drift check of no data would report nothing.",
        )
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return join_tables(frame, joins, offline_root)


def join_tables(frame: pd.DataFrame, joins: Sequence[Mapping[str, Any]], offline_root: str) -> pd.DataFrame:
    """``frame`` with each join applied (left, rows kept in order): ``{"uri", "on": [...], "columns":
    [...]}``, a relative ``uri`` taken under ``offline_root``; the last row of a key wins."""
    for join in joins:
        other = read_frame(resolve_uri(join["uri"], offline_root))
        keep = list(join["on"]) + [c for c in (join.get("columns") or other.columns) if c not in join["on"]]
        other = other[keep].drop_duplicates(subset=list(join["on"]), keep="last")
        frame = frame.merge(other, on=list(join["on"]), how="left", suffixes=("", "_joined"))
    return frame


class DriftReportLink(BaseOperatorLink):
    """Extra link "Drift report": the Evidently HTML report of the run, served by the UI plugin."""

    name = "Drift report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""


def emitted_drift_events(task: EvidentlyDriftOperator, outlet_events: Any) -> list[Any]:
    """The drift Asset events a finished ``task`` reports, as the worker sends them when it succeeds: the
    ``outlet_events`` accessor (``.key``, ``.extra``) of each drift Asset still among its ``outlets``;
    empty for a calm run. For tests and callers that run :meth:`EvidentlyDriftOperator.execute` directly."""
    asset = task.drift_asset
    return [outlet_events[asset]] if asset is not None and asset in task.outlets else []


def drift_alias(asset: Asset | str) -> AssetAlias:
    """The ``AssetAlias`` through which an earlier release emitted drift events for ``asset`` (kept for
    DAGs that name it; :class:`EvidentlyDriftOperator` now declares the Asset itself as its outlet)."""
    name = asset.name if isinstance(asset, Asset) else str(asset)
    return AssetAlias(name=f"{name}.events")


class EvidentlyDriftOperator(BaseOperator):
    """Check a recent window for drift and quality decay of the production model (Evidently 0.7).

    Three checks, each optional but the first:

    - **data drift**: the window's ``columns`` against the reference (the production model's training
      snapshot, or ``reference_uri``);
    - **quality decay** (with ``label_column``): the production model's ``quality_metric`` on the
      labelled rows of the window against its holdout score recorded at promotion, for any task
      (binary, multiclass, regression, see :mod:`airflow_mlops.ml.metrics`);
    - **prediction drift** (with ``prediction_drift``): the predictions the production version served in
      the window (read from the prediction log) against its predictions on the holdout it was promoted on.

    Returns ``drift_detected`` (data drift), ``drift_share``, ``drifted_columns`` (column: score),
    ``columns``, ``quality``, ``decay_detected``, ``prediction_drift``, ``window``, ``reference``,
    ``event_id``, ``report_uri``, ``summary_uri``. When data drift, prediction drift or decay is found and
    ``drift_asset`` is set, ``drift_asset`` (a declared outlet) gets one event with these figures and
    ``model_page`` in ``extra``; otherwise no event is emitted (see the module docstring).

    :param model_name: registry name of the monitored model; its production version gives the
        reference and the model scored for decay and prediction drift (templated).
    :param reference_uri: parquet / training manifest to compare against instead of the registry's
        (templated).
    :param columns: drift columns: names, or ``{name: {"kind", "method", "threshold"}}``; default every
        column of the reference (templated).
    :param drift_share: share of drifted columns from which the data set counts as drifted.
    :param window_end: last day of the window, ``YYYY-MM-DD`` (templated, default ``{{ ds }}``).
    :param window_days: length of the window in days (templated).
    :param window_start: first day, instead of ``window_days`` (templated).
    :param source: ``offline_store`` (validated data of ``table``) or ``prediction_log`` (the request
        fields and features the service logged).
    :param table: offline-store table of the window; required with ``source="offline_store"`` (templated).
    :param joins: tables joined onto the window, ``[{"uri", "on", "columns"}]`` (templated).
    :param offline_root: offline store root; default ``[mlops] offline_root`` (templated).
    :param prediction_log_uri: prediction-log root; default ``<artifact_root>/predictions/<model_name>``
        (templated).
    :param reference_columns: ``{drift column: column of the reference}`` for drift columns the
        reference holds under another name, read only where the reference lacks the drift column itself
        (a Feast training snapshot names joined features ``<view>__<feature>``) (templated).
    :param label_column: the model's label. When set and ``model_name`` has a production version (also
        with ``reference_uri`` given), the model is scored on the labelled rows of the window and
        compared with its holdout score: ``quality`` = ``{"labelled_rows", "unlabelled_rows", "metric",
        "score", "holdout_score", "decay", "max_decay", "model_version", "labels"}`` (a binary model also
        gets ``auc``, ``holdout_auc`` and ``auc_decay``). Binary labels may be 0/1 or the model's classes;
        multiclass labels are the classes; regression labels are numbers. Without a production version,
        or before any label of the window has arrived, ``quality`` only counts rows (templated).
    :param label_rule: derive ``label_column`` (0/1) from a numeric column of the labelled rows,
        ``{"column": <column>, "gt": <threshold>}``: 1 where the column is above the threshold; rows
        where that column is missing are unlabelled.
    :param labels_table: offline-store table of labelled rows read for the window's days
        (``<offline_root>/<labels_table>/date=YYYY-MM-DD/part-0.parquet``), e.g. the entity table the
        features DAG writes (with ``event_timestamp``, the join keys and the label); default: the
        window's own rows (templated).
    :param feature_repo: Feast repository (absolute path) used when the labelled rows lack some of the
        model's features: they are joined point in time from the feature service the production version
        was registered with (its ``feature_service``), exactly as the training set was built; default
        the ``feast_conn_id`` connection's ``repo_path`` (templated).
    :param feast_conn_id: Airflow connection of type ``feast`` for that join.
    :param quality_metric: metric of the decay check; default the metric the production version was
        promoted on, else the task's default (``auc``, ``macro_f1``, ``rmse``) (templated).
    :param max_decay: decay above which it is reported, per metric (``{"auc": 0.05, "rmse": 0.2}``) or one
        number for ``quality_metric``; a drop for metrics where higher is better, a rise as a ratio for
        losses (``window / holdout - 1``). Default :data:`~airflow_mlops.ml.metrics.DEFAULT_MAX_DECAY`.
        Decay alone emits the drift event (with ``decay_detected`` and the figures in ``extra``).
    :param max_auc_decay: deprecated; ``max_decay={"auc": x}``.
    :param prediction_drift: also compare the predictions the production version served in the window
        with its predictions on its holdout (binary: the probability of the positive class, regression:
        the value, numerical; multiclass: the class, categorical; Evidently chooses the method). Result
        ``prediction_drift`` = ``{"rows", "score", "method", "threshold", "drift_detected"}``, or
        ``{"rows": 0, "reason"}`` when nothing was served. A drifted prediction distribution emits the
        drift event (templated).
    :param drift_asset: the model's drift Asset (or its name), added to the task's outlets; it gets an
        event only on drift or decay.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "reference_uri",
        "columns",
        "window_end",
        "window_days",
        "window_start",
        "table",
        "joins",
        "offline_root",
        "prediction_log_uri",
        "reference_columns",
        "label_column",
        "labels_table",
        "feature_repo",
        "quality_metric",
        "prediction_drift",
    )
    template_fields_renderers = {"columns": "json", "joins": "json", "reference_columns": "json"}
    operator_extra_links = (DriftReportLink(),)
    ui_color = "#e8d8f0"

    def __init__(
        self,
        *,
        model_name: str | None = None,
        reference_uri: str | None = None,
        columns: Sequence[str] | Mapping[str, Any] | None = None,
        drift_share: float = 0.5,
        window_end: str = "{{ ds }}",
        window_days: int | str = 7,
        window_start: str | None = None,
        source: str = "offline_store",
        table: str | None = None,
        joins: Sequence[Mapping[str, Any]] | None = None,
        offline_root: str | None = None,
        prediction_log_uri: str | None = None,
        reference_columns: Mapping[str, str] | None = None,
        label_column: str | None = None,
        label_rule: Mapping[str, Any] | None = None,
        labels_table: str | None = None,
        feature_repo: str | None = None,
        feast_conn_id: str | None = "feast_default",
        quality_metric: str | None = None,
        max_decay: Mapping[str, float] | float | None = None,
        max_auc_decay: float | None = None,
        prediction_drift: bool | str = False,
        drift_asset: Asset | str | None = None,
        bentoml_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if drift_asset is not None:
            asset = Asset(name=drift_asset) if isinstance(drift_asset, str) else drift_asset
            kwargs["outlets"] = [*(kwargs.get("outlets") or []), asset]
        super().__init__(**kwargs)
        if source not in ("offline_store", "prediction_log"):
            raise MLOpsArgumentError(
                f"source {source!r} is not known.", fix="use 'offline_store' or 'prediction_log'."
            )
        if source == "offline_store" and not table:
            raise MLOpsArgumentError(
                "the drift operator reads the offline store (source='offline_store') but names no table.",
                fix="pass table=<the offline-store table to watch>, or source='prediction_log'.",
            )
        if not 0 < drift_share <= 1:
            raise MLOpsArgumentError(f"drift_share must be in (0, 1], got {drift_share!r}.", fix="e.g. 0.5.")
        if model_name is None and reference_uri is None:
            raise MLOpsArgumentError(
                "the drift operator needs model_name or reference_uri.", fix="pass one of them."
            )
        if label_rule is not None and (
            not isinstance(label_rule, Mapping) or set(label_rule) != {"column", "gt"}
        ):
            raise MLOpsArgumentError(
                f"label_rule {label_rule!r} is not understood.",
                fix='use {"column": <numeric column>, "gt": <threshold>}: the label is 1 above the threshold.',
            )
        if label_rule is not None and not label_column:
            raise MLOpsArgumentError(
                "label_rule derives a label, but label_column names none.",
                fix="name the derived label, e.g. label_column='label'.",
            )
        if max_auc_decay is not None:
            if max_decay is not None:
                raise MLOpsArgumentError(
                    "both max_decay and the deprecated max_auc_decay are given.",
                    fix='pass only max_decay, e.g. max_decay={"auc": 0.05}.',
                )
            warnings.warn(
                'max_auc_decay is deprecated; use max_decay={"auc": ...}.', DeprecationWarning, stacklevel=2
            )
            max_decay = {"auc": max_auc_decay}
        if max_decay is not None and not isinstance(max_decay, Mapping | int | float):
            raise MLOpsArgumentError(
                f"max_decay {max_decay!r} is not understood.",
                fix='pass a number, or a mapping per metric such as {"auc": 0.05, "rmse": 0.2}.',
            )
        self.model_name = model_name
        self.reference_uri = reference_uri
        self.columns = columns
        self.drift_share = drift_share
        self.window_end = window_end
        self.window_days = window_days
        self.window_start = window_start
        self.source = source
        self.table = table
        self.joins = joins
        self.offline_root = offline_root
        self.prediction_log_uri = prediction_log_uri
        self.reference_columns = reference_columns
        self.label_column = label_column
        self.label_rule = label_rule
        self.labels_table = labels_table
        self.feature_repo = feature_repo
        self.feast_conn_id = feast_conn_id
        self.quality_metric = quality_metric
        self.max_decay = dict(max_decay) if isinstance(max_decay, Mapping) else max_decay
        self.prediction_drift = prediction_drift
        self.drift_asset = Asset(name=drift_asset) if isinstance(drift_asset, str) else drift_asset
        self.bentoml_conn_id = bentoml_conn_id

    @property
    def max_auc_decay(self) -> float | None:
        """Deprecated: the AUC threshold of ``max_decay``."""
        from airflow_mlops.ml.drift import resolve_max_decay

        return resolve_max_decay(self.max_decay, "auc")

    @cached_property
    def hook(self) -> BentoMLHook:
        from airflow_mlops.hooks.bentoml import BentoMLHook

        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore()

    def _wants_prediction_drift(self) -> bool:
        value = self.prediction_drift
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off", "", "none"):
                return False
            raise MLOpsArgumentError(
                f"prediction_drift {value!r} is not a boolean.", fix="pass True or False (or 'true'/'false')."
            )
        return bool(value)

    def _log_root(self) -> str:
        from airflow_mlops.ml.prediction_log import log_root

        settings = self.store.settings
        root = self.prediction_log_uri or log_root(str(self.model_name), settings.artifact_root)
        return resolve_uri(root, settings.artifact_root)

    def execute(self, context: Context) -> dict[str, Any]:
        import pandas as pd

        from airflow_mlops.ml.prediction_log import read_prediction_log

        settings = self.store.settings
        wants_predictions = self._wants_prediction_drift()
        if wants_predictions and not self.model_name:
            raise MLOpsArgumentError(
                "prediction_drift compares the production model's served predictions, but model_name is unset.",
                fix="pass model_name=.",
            )
        production: dict[str, Any] = {}
        if self.reference_uri:
            source_uri = resolve_uri(self.reference_uri, settings.artifact_root)
            if (self.label_column or wants_predictions) and self.model_name:  # these need the served model
                production = production_model(self.model_name, self.hook) or {}
        else:
            production = production_reference(self.model_name, self.hook)
            source_uri = production["reference_uri"]
        aliases = dict(self.reference_columns or {})
        dates = window_dates(self.window_end, int(self.window_days), self.window_start)
        offline_root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        served: pd.DataFrame | None = None
        if self.source == "offline_store":
            current = read_offline_window(offline_root, str(self.table), dates, self.joins or ())
        else:
            current = served = read_prediction_log(self._log_root(), dates)

        specs = specs_for(self.columns, source_uri, aliases)
        if self.columns is None:
            specs = {c: s for c, s in specs.items() if c in current.columns}
        missing = [c for c in specs if c not in current.columns]
        if missing:
            raise MLOpsInputError(
                f"the current window lacks the drift columns {missing} (it has {sorted(current.columns)[:30]}).",
                fix="join the tables that hold them (joins=) or drop them from columns=.",
            )
        empty = [c for c in specs if current[c].isna().all()]
        if empty:
            where = f"table {self.table!r}" if self.source == "offline_store" else "the prediction log"
            raise MLOpsInputError(
                f"the drift columns {empty} have no values in the window {dates[0]}..{dates[-1]} "
                f"({len(current)} rows of {where}).",
                fix="check that the tables joined for them (joins=) cover these days, or monitor a window "
                "that has data.",
            )
        reference = prepare_reference(source_uri, specs, self.store, aliases=aliases)
        with as_path(reference["data_uri"]).open("rb") as handle:
            reference_frame = pd.read_parquet(handle)
        self.log.info(
            "Drift check of %d rows (%s..%s) against %d reference rows on %d columns",
            len(current),
            dates[0],
            dates[-1],
            reference["rows"],
            len(specs),
        )
        snapshot, summary = run_drift_report(reference_frame, current, specs, self.drift_share)
        quality = self._quality(self._labelled_rows(current, offline_root, dates), production)
        decay = bool(quality.get("decay") is not None and quality["decay"] > quality["max_decay"])
        predictions: dict[str, Any] | None = None
        if wants_predictions:
            predictions = self._prediction_drift(context, production, dates, served)

        report = self.store.for_task(context, "drift_report.html")
        with staged(report) as tmp:
            snapshot.save_html(str(tmp))
        result = {
            **summary,
            "decay_detected": decay,
            "quality": quality,
            "prediction_drift": predictions,
            "window": {"start": dates[0], "end": dates[-1], "rows": int(len(current)), "source": self.source},
            "reference": {k: reference[k] for k in ("key", "source_uri", "rows", "stats_uri")},
            "model": self.model_name,
            "model_version": production.get("version"),
            "report_uri": str(report),
        }
        predictions_drifted = bool(predictions and predictions.get("drift_detected"))
        result["event_id"] = drift_event_id(
            self.model_name,
            [dates[0], dates[-1]],
            summary,
            also=["prediction"] if predictions_drifted else (),
        )
        summary_artifact = self.store.write_json(self.store.for_task(context, "drift_summary.json"), result)
        result["summary_uri"] = summary_artifact.uri
        from airflow_mlops.hooks.history import record_drift_check

        record_drift_check(result, context)  # the UI's drift history (docs/ui.md)

        from airflow_mlops.plugins.mlops_plugin import artifact_url

        context["ti"].xcom_push(
            key=DriftReportLink().xcom_key, value=artifact_url(str(report)) or str(report)
        )
        self.log.info(
            "Drift %s: share %.2f (threshold %.2f), drifted columns %s; %s decay %s (max %s); "
            "prediction drift %s",
            "detected" if summary["drift_detected"] else "not detected",
            summary["drift_share"],
            self.drift_share,
            summary["drifted_columns"] or "none",
            quality.get("metric", "quality"),
            quality.get("decay"),
            quality.get("max_decay"),
            (predictions or {}).get("score") if predictions else "not checked",
        )
        if self.drift_asset is not None:
            self._emit_drift_event(
                context, result, bool(summary["drift_detected"] or decay or predictions_drifted)
            )
        return result

    def _emit_drift_event(self, context: Context, result: Mapping[str, Any], drifted: bool) -> None:
        """An event on the drift Asset (a declared outlet) when ``drifted``, with the figures in ``extra``;
        none otherwise: the Asset leaves this run's outlets (see the module docstring)."""
        from airflow_mlops.operators.registry import model_page_url

        if drifted:
            extra = {**event_extra(result), "model_page": model_page_url(self.model_name)}
            context["outlet_events"][self.drift_asset].extra.update(extra)
        else:
            self.outlets = [o for o in self.outlets if o != self.drift_asset]

    def _labelled_rows(
        self, current: pd.DataFrame, offline_root: str, dates: Sequence[str]
    ) -> pd.DataFrame | None:
        """The rows the quality check scores: the window's own rows, or the labels table's rows of the
        window's days (None: no label configured, or no labelled row of the window has been written yet)."""
        if not self.label_column:
            return None
        if not self.labels_table:
            return current
        try:
            return read_offline_window(offline_root, self.labels_table, dates)
        except MLOpsInputError as err:  # labels arrive later than the data: no score yet, drift still checked
            self.log.warning("No quality score for this window: %s", err)
            return None

    def _quality(self, frame: pd.DataFrame | None, production: Mapping[str, Any]) -> dict[str, Any]:
        """The production model's score on the labelled rows of the window against its holdout score."""
        import pandas as pd

        from airflow_mlops.ml.drift import label_summary, resolve_max_decay, window_scores
        from airflow_mlops.ml.metrics import DEFAULT_METRIC, check_metric, decay, normalize_task

        label = self.label_column
        if not label or frame is None:
            return {}
        if not production:
            self.log.warning("Model %s has no production version: no quality score", self.model_name)
            return {"labelled_rows": 0, "reason": f"model {self.model_name!r} has no production version"}
        rule = self.label_rule
        if rule:
            if rule["column"] not in frame.columns:
                raise MLOpsInputError(
                    f"label_rule reads column {rule['column']!r}, which the labelled rows lack "
                    f"(they have {sorted(frame.columns)[:30]}).",
                    fix="correct label_rule, or read labels from labels_table=.",
                )
            source = pd.to_numeric(frame[rule["column"]], errors="coerce")
            frame = frame.assign(
                **{label: (source > float(rule["gt"])).astype("Int64").where(source.notna())}
            )
        if label not in frame.columns:
            raise MLOpsInputError(
                f"the labelled rows have no label column {label!r} (they have {sorted(frame.columns)[:30]}).",
                fix="correct label_column, derive it with label_rule=, or read labels from labels_table=.",
            )
        labelled = frame[frame[label].notna()]
        counts = {"labelled_rows": int(len(labelled)), "unlabelled_rows": int(len(frame) - len(labelled))}
        version = production["version"]
        if labelled.empty:
            return {**counts, "reason": "no labelled row in the window", "model_version": version}
        predictor = self.hook.load(self.model_name, version)
        task = normalize_task(predictor.task)
        promotion = production.get("promotion") or {}
        metric = self.quality_metric or promotion.get("metric") or DEFAULT_METRIC[task]
        if not self.quality_metric and promotion.get("metric"):
            try:  # a promotion metric that does not fit the model (an older registry entry): the default
                check_metric(metric, task)
            except MLOpsArgumentError:
                metric = DEFAULT_METRIC[task]
        check_metric(metric, task, field="quality_metric")
        threshold = resolve_max_decay(self.max_decay, metric)
        features = getattr(predictor, "features", None) or []
        missing = [f for f in features if f not in labelled.columns]
        if missing:
            labelled = self._with_features(labelled, production, missing)
        scores = window_scores(predictor, labelled, label)
        score = scores[metric]
        holdout_metrics = production.get("holdout_metrics") or {}
        holdout = holdout_metrics.get(metric)
        result: dict[str, Any] = {
            **counts,
            "metric": metric,
            "score": None if score != score else score,
            "holdout_score": holdout,
            "decay": None if holdout is None or score != score else decay(metric, holdout, score),
            "max_decay": threshold,
            "model_version": version,
            "task": task,
            "labels": label_summary(labelled[label], task),
        }
        if score != score:
            result["reason"] = f"{metric} is undefined on the window's labels (e.g. a single class)"
        elif holdout is None:
            result["reason"] = f"no holdout {metric} was recorded for {self.model_name} {version}"
        if task == "binary":
            auc = scores.get("auc")
            auc = None if auc is None or auc != auc else auc
            holdout_auc = holdout_metrics.get("auc")
            result.update(
                auc=auc,
                holdout_auc=holdout_auc,
                auc_decay=None if auc is None or holdout_auc is None else float(holdout_auc) - auc,
            )
        return result

    def _prediction_drift(
        self,
        context: Context,
        production: Mapping[str, Any],
        dates: Sequence[str],
        served: pd.DataFrame | None,
    ) -> dict[str, Any]:
        """The served predictions of the production version in the window against its predictions on
        the holdout it was promoted on (one Evidently ``ValueDrift`` on ``prediction``)."""
        import pandas as pd

        from airflow_mlops.ml.drift import prediction_kind, prediction_reference
        from airflow_mlops.ml.prediction_log import read_prediction_log

        if not production:
            return {"rows": 0, "reason": f"model {self.model_name!r} has no production version"}
        version = str(production["version"])
        if served is None:
            try:
                served = read_prediction_log(self._log_root(), dates)
            except MLOpsInputError as err:
                self.log.info("No prediction drift: %s", err)
                return {"rows": 0, "reason": f"no prediction was served in {dates[0]}..{dates[-1]}"}
        rows = served[(served["version"].astype(str) == version) & served["prediction"].notna()]
        if rows.empty:
            versions = sorted(served["version"].dropna().astype(str).unique().tolist())
            return {
                "rows": 0,
                "reason": f"version {version} served no prediction in {dates[0]}..{dates[-1]} "
                f"(versions seen: {versions or 'none'})",
            }
        holdout_uri = (production.get("promotion") or {}).get("holdout_uri")
        if not holdout_uri:
            return {
                "rows": int(len(rows)),
                "reason": f"the promotion of {self.model_name} {version} records no holdout_uri",
            }
        predictor = self.hook.load(str(self.model_name), version)
        reference = prediction_reference(
            predictor,
            resolve_uri(holdout_uri, self.store.settings.artifact_root),
            model=str(self.model_name),
            version=version,
            store=self.store,
        )
        with as_path(reference["data_uri"]).open("rb") as handle:
            reference_frame = pd.read_parquet(handle)
        specs = {"prediction": {"kind": prediction_kind(predictor.task), "method": None, "threshold": None}}
        snapshot, summary = run_drift_report(
            reference_frame, rows[["prediction"]].reset_index(drop=True), specs, drift_share=1.0
        )
        report = self.store.for_task(context, "prediction_drift_report.html")
        with staged(report) as tmp:
            snapshot.save_html(str(tmp))
        column = summary["columns"]["prediction"]
        self.log.info(
            "Prediction drift of %d served predictions of %s %s: %s %.4f (threshold %s)",
            len(rows),
            self.model_name,
            version,
            column["method"],
            column["score"],
            column["threshold"],
        )
        return {
            "rows": int(len(rows)),
            "reference_rows": reference["rows"],
            "kind": specs["prediction"]["kind"],
            "score": column["score"],
            "method": column["method"],
            "threshold": column["threshold"],
            "drift_detected": bool(column["drifted"]),
            "reference_uri": reference["data_uri"],
            "report_uri": str(report),
        }

    def _with_features(
        self, rows: pd.DataFrame, production: Mapping[str, Any], missing: Sequence[str]
    ) -> pd.DataFrame:
        """``rows`` with the model's features joined point in time from its Feast feature service."""
        service = production.get("feature_service")
        if not service:
            raise MLOpsInputError(
                f"the labelled rows lack the model's features {list(missing)}, and production version "
                f"{production['version']!r} of {self.model_name!r} records no feature service to join them from.",
                fix="read labels from a table holding the features (labels_table=), or register the model "
                "with feature_service=.",
            )
        if "event_timestamp" not in rows.columns:
            raise MLOpsInputError(
                f"the labelled rows have no event_timestamp, so the features of service {service!r} cannot "
                "be joined point in time.",
                fix="read labels from the entity table the features DAG writes (labels_table=), which has "
                "event_timestamp and the join keys.",
            )
        import pandas as pd

        from airflow_mlops.hooks.feast import FeastHook

        entities = rows.drop(columns=[c for c in ("date",) if c in rows.columns]).assign(
            event_timestamp=pd.to_datetime(rows["event_timestamp"], utc=True)
        )
        hook = FeastHook(feast_conn_id=self.feast_conn_id, repo_path=self.feature_repo or None)
        joined = hook.historical_features(entities.reset_index(drop=True), service)
        still = [f for f in missing if f not in joined.columns]
        if still:
            raise MLOpsInputError(
                f"feature service {service!r} does not provide the model's features {still}.",
                fix="monitor with the feature service the model was trained on.",
            )
        self.log.info(
            "Joined %d features of service %s onto %d labelled rows", len(missing), service, len(joined)
        )
        return joined


def event_extra(result: Mapping[str, Any]) -> dict[str, Any]:
    """The figures a drift Asset event carries (small, JSON)."""
    quality = result.get("quality") or {}
    predictions = result.get("prediction_drift") or {}
    return {
        "event_id": result["event_id"],
        "model": result.get("model"),
        "model_version": result.get("model_version"),
        "drift_detected": result["drift_detected"],
        "decay_detected": result["decay_detected"],
        "prediction_drift_detected": bool(predictions.get("drift_detected")),
        "drift_share": result["drift_share"],
        "drifted_columns": result["drifted_columns"],
        "metric": quality.get("metric"),
        "score": quality.get("score"),
        "holdout_score": quality.get("holdout_score"),
        "decay": quality.get("decay"),
        "auc": quality.get("auc"),
        "holdout_auc": quality.get("holdout_auc"),
        "auc_decay": quality.get("auc_decay"),
        "prediction_drift_score": predictions.get("score"),
        "prediction_drift_method": predictions.get("method"),
        "window_start": result["window"]["start"],
        "window_end": result["window"]["end"],
        "data_time": result["window"]["end"],
        "report_uri": result["report_uri"],
    }


class DriftBaselineOperator(BaseOperator):
    """(Re)compute the cached drift reference of the model in production; run it after promotion.

    With no version in production (the model's first candidate was refused) the task is skipped, and with
    it the tasks after it that serve production.

    Pass the monitor's ``columns`` and ``reference_columns``: the cache is keyed by them, so the
    monitor's next check finds the reference prepared.

    :param model_name: registry name (templated).
    :param columns: drift columns, as for :class:`EvidentlyDriftOperator` (templated).
    :param reference_columns: reference names of drift columns, as for :class:`EvidentlyDriftOperator`
        (templated).
    """

    template_fields: Sequence[str] = ("model_name", "columns", "reference_columns")
    ui_color = "#e8d8f0"

    def __init__(
        self,
        *,
        model_name: str,
        columns: Sequence[str] | Mapping[str, Any] | None = None,
        reference_columns: Mapping[str, str] | None = None,
        bentoml_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.columns = columns
        self.reference_columns = reference_columns
        self.bentoml_conn_id = bentoml_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_mlops.hooks.bentoml import BentoMLHook

        hook = BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)
        if production_model(self.model_name, hook) is None:
            # the gate (or a person) refused the model's first candidate: nothing to monitor or serve yet
            raise AirflowSkipException(
                f"{self.model_name} has no production version: no drift reference to prepare, nothing to serve"
            )
        production = production_reference(self.model_name, hook)
        aliases = dict(self.reference_columns or {})
        specs = specs_for(self.columns, production["reference_uri"], aliases)
        reference = prepare_reference(production["reference_uri"], specs, refresh=True, aliases=aliases)
        self.log.info(
            "Drift reference of %s %s: %d rows, %s",
            self.model_name,
            production["version"],
            reference["rows"],
            reference["data_uri"],
        )
        return {**reference, "model": self.model_name, "version": production["version"]}


class RetrainingGateOperator(BaseOperator):
    """Top of the train DAG: let a run train only for a new drift event outside the cooldown window.

    Reads the run's ``triggering_asset_events``; duplicate deliveries of an event (same ``event_id``)
    and events less than ``cooldown_days`` of data time after the last finished retraining skip the
    task, and with it everything downstream that needs it (default trigger rule). A retraining counts
    once its DAG run succeeded: a run that was let through and failed does not hold the cooldown. An
    event whose data time is in the future (beyond a day of clock skew) is refused. A run started by
    hand or on a schedule (no triggering event) trains. The decision and the event that caused a retraining are
    recorded in the shared state database, connection ``mlops_state`` (see
    :mod:`airflow_mlops.ml.retraining`), so gates on every worker host share one cooldown, and returned.

    :param model_name: model whose retrainings are gated (templated).
    :param cooldown_days: at most one retraining per this many days of data time (templated).
    :param state_dir: folder a former release kept the retraining state in (imported once); a folder other
        than the default ``<[mlops] state_dir>/retraining`` also holds its own state database when the
        connection ``mlops_state`` does not exist (templated).
    :param data_time: the data time a run without a triggering event trains up to (ISO date or
        timestamp, e.g. the end of its holdout window); the cooldown of later drift events counts from
        it. Default: the run's logical date, which for a run triggered by hand is the wall-clock time
        (templated).
    """

    template_fields: Sequence[str] = ("model_name", "cooldown_days", "state_dir", "data_time")
    ui_color = "#f0d8d8"

    def __init__(
        self,
        *,
        model_name: str,
        cooldown_days: float | str = 7,
        state_dir: str | None = None,
        data_time: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.cooldown_days = cooldown_days
        self.state_dir = state_dir
        self.data_time = data_time

    def execute(self, context: Context) -> dict[str, Any]:
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_mlops.ml.retraining import RetrainingState, events_from_context, gate

        try:
            cooldown = timedelta(days=float(self.cooldown_days))
        except (TypeError, ValueError):
            raise MLOpsArgumentError(
                f"cooldown_days must be a number of days, got {self.cooldown_days!r}.",
                fix="e.g. cooldown_days=7.",
            ) from None
        folder = Path(self.state_dir) if self.state_dir else ArtifactStore().settings.state_dir / "retraining"
        events = events_from_context(context.get("triggering_asset_events"))
        events += self._left_to_no_run(context, events)
        logical = context.get("logical_date") or context.get("data_interval_end")
        if self.data_time:
            try:
                logical = datetime.fromisoformat(str(self.data_time).strip())
            except ValueError:
                raise MLOpsArgumentError(
                    f"data_time {self.data_time!r} is not an ISO date or timestamp.",
                    fix="pass e.g. '2013-04-01' or '2013-04-01T00:00:00+00:00'.",
                ) from None
            if logical.tzinfo is None:
                logical = logical.replace(tzinfo=UTC)
        ti = context.get("ti")
        decision = gate(
            RetrainingState(folder, self.model_name),
            events,
            cooldown=cooldown,
            run_id=context["run_id"],
            manual_data_time=logical,
            # only trainings whose run succeeded count for the cooldown: the gate asks Airflow how the
            # runs it let through ended (the Task SDK's RuntimeTaskInstance.get_dagrun_state)
            dag_id=getattr(ti, "dag_id", None),
            run_state=getattr(ti, "get_dagrun_state", None),
        )
        self.log.info(
            "Retraining of %s %s: %s",
            self.model_name,
            "proceeds" if decision.proceed else "skipped",
            decision.reason,
        )
        if not decision.proceed:
            raise AirflowSkipException(f"retraining of {self.model_name} skipped: {decision.reason}")
        return {"model": self.model_name, **decision.to_dict()}

    #: at most this many later events of an Asset are read (a burst of drift events is a few weeks' checks)
    LATER_EVENTS_LIMIT = 200

    def _left_to_no_run(self, context: Context, triggering: list) -> list:
        """Events of the triggering Assets that arrived after this run's own and that no run consumed.

        Airflow 3.3 queues one entry per DAG and Asset while a run is active; events arriving while that
        entry waits are not given to the run it starts, and wait for the next event (apache/airflow#56050):
        the last drift events of a burst would start no retraining. The gate reads them through the task's
        ``inlets`` (the train DAG's schedule; Airflow's ``inlet_events``) and decides over all of them:
        events seen before (consumed by an earlier run) are skipped as duplicates, as usual.
        """
        from airflow_mlops.ml.retraining import event_info

        inlet_events = context.get("inlet_events")
        raw = context.get("triggering_asset_events") or {}
        stamps = [getattr(e, "timestamp", None) for key in raw for e in raw[key]]
        stamps = [t for t in stamps if t is not None]
        if not triggering or not stamps or inlet_events is None:
            return []
        names = {e.asset for e in triggering}
        since = min(stamps)  # when the first of this run's events arrived
        known = {e.event_id for e in triggering}
        later: list = []
        for inlet in self.inlets or []:
            name = getattr(inlet, "name", None)
            if name not in names:
                continue
            try:
                recent = inlet_events[inlet].after(since.isoformat()).ascending(False)
                for event in recent.limit(self.LATER_EVENTS_LIMIT):
                    info = event_info(name, event)
                    if info.event_id not in known and getattr(event, "timestamp", since) >= since:
                        known.add(info.event_id)
                        later.append(info)
            except Exception as err:  # reading more than the triggering events is a help, not a need
                self.log.warning("Could not read the later events of %s: %s", name, err)
        if later:
            self.log.info(
                "%d event(s) of %s no run consumed (Airflow gives them to no run until the next event): %s",
                len(later),
                ", ".join(sorted(names)),
                ", ".join(f"{e.event_id} at {e.data_time.date()}" for e in later),
            )
        return later
