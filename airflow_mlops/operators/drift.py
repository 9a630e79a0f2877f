"""Drift monitoring with Evidently 0.7: data drift of a recent window against the production model's
reference, AUC decay where labels have arrived, and an Asset event only when something is wrong.

The reference is the training snapshot of the model in production (found through the registry's
``training_manifest``) or a given URI. Its drift columns are projected once into a cached parquet with
per-column statistics (``<artifact_root>/drift/reference/<key>/``); every later check of the same
reference reads that small file. The current window is read from the offline store partitions
(``<offline_root>/<table>/date=YYYY-MM-DD/part-0.parquet``) or from the serving prediction log
(``<artifact_root>/predictions/<model>/date=YYYY-MM-DD/part-*.jsonl``).

Emitting the drift event: in Airflow 3.3's Task SDK every concrete ``Asset`` in ``outlets`` gets an
event whenever the task succeeds, whatever the task does. The operator therefore puts an
``AssetAlias`` in its outlets and attaches an event for the model's drift ``Asset`` to that alias only
when drift (or AUC decay) was found; a calm run adds nothing to the alias and no event is created.
DAGs scheduled on the drift ``Asset`` itself are triggered by the alias events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, BaseOperator, BaseOperatorLink

from airflow_mlops.artifacts import ArtifactStore, as_path, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.offline_store import PARTITION_FILE, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context
    from airflow.sdk.definitions._internal.abstractoperator import TaskInstanceKey

    from airflow_mlops.hooks.bentoml import BentoMLHook

#: Drift columns of the flights demo model, with the method and threshold of each. Weather moves two
#: to three reference standard deviations between a January-March reference and a spring week (the
#: season changing, which the model has seen similar of), and five to six in July; the weather
#: thresholds flag the summer shift, not the ordinary change of season. Schedule and network columns
#: use Evidently's default thresholds.
FLIGHTS_DRIFT_COLUMNS: dict[str, dict[str, Any]] = {
    "temp": {"kind": "numerical", "method": "wasserstein", "threshold": 4.0},
    "dewp": {"kind": "numerical", "method": "wasserstein", "threshold": 3.0},
    "hour": {"kind": "numerical", "method": "wasserstein", "threshold": 0.1},
    "distance": {"kind": "numerical", "method": "wasserstein", "threshold": 0.1},
    "carrier": {"kind": "categorical", "method": "jensenshannon", "threshold": 0.1},
    "origin": {"kind": "categorical", "method": "jensenshannon", "threshold": 0.1},
}
#: dataset drift for the flights demo: two of its six columns drifting
FLIGHTS_DRIFT_SHARE = 0.3
#: where the training snapshot of the Feast-trained flights model (``flights_train``: the labelled
#: flights joined with the ``delay_model`` feature service) holds the drift columns it names differently
FLIGHTS_REFERENCE_COLUMNS: dict[str, str] = {
    "temp": "weather_hourly__temp",
    "dewp": "weather_hourly__dewp",
    "hour": "sched_hour",
}
#: the flights model's label: arrival delay above 15 minutes (as ``FlightDailyStatsOperator`` writes it)
FLIGHTS_LABEL_RULE: dict[str, Any] = {"column": "arr_delay", "gt": 15}

#: methods whose score is a p-value (drift when below the threshold); all others are distances
P_VALUE_METHODS = frozenset(
    {
        "ks",
        "chisquare",
        "z",
        "fisher_exact",
        "g_test",
        "mannw",
        "t_test",
        "anderson",
        "cramer_von_mises",
        "epps_singleton",
        "empirical_mmd",
    }
)
_CATEGORICAL_MAX_UNIQUE = 50
_REFERENCE_CACHE_VERSION = 1


# --------------------------------------------------------------------------- column specs
def normalize_columns(
    columns: Sequence[str] | Mapping[str, Any] | None, frame: pd.DataFrame | None = None
) -> dict[str, dict[str, Any]]:
    """``{column: {"kind", "method", "threshold"}}`` from a list of names or a mapping of partial specs.

    ``kind`` (``numerical``/``categorical``) is inferred from ``frame`` when not given; ``method`` and
    ``threshold`` left as None mean Evidently's automatic choice.

    :raises MLOpsArgumentError: an unknown key or kind in a column spec.
    """
    if columns is None:
        if frame is None:
            raise MLOpsArgumentError(
                "no drift columns given and no data to infer them from.", fix="pass columns=."
            )
        columns = list(frame.columns)
    items = columns.items() if isinstance(columns, Mapping) else ((c, {}) for c in columns)
    specs: dict[str, dict[str, Any]] = {}
    for name, raw in items:
        raw = dict(raw or {})
        unknown = set(raw) - {"kind", "method", "threshold"}
        if unknown:
            raise MLOpsArgumentError(
                f"drift column {name!r} has unknown settings {sorted(unknown)}.",
                fix="use only 'kind' (numerical or categorical), 'method' and 'threshold'.",
            )
        kind = raw.get("kind")
        if kind is None and frame is not None and name in frame.columns:
            kind = _infer_kind(frame[name])
        if kind not in (None, "numerical", "categorical"):
            raise MLOpsArgumentError(
                f"drift column {name!r} has kind {kind!r}.", fix="use 'numerical' or 'categorical'."
            )
        threshold = raw.get("threshold")
        specs[str(name)] = {
            "kind": kind,
            "method": raw.get("method"),
            "threshold": None if threshold is None else float(threshold),
        }
    return specs


def specs_for(
    columns: Sequence[str] | Mapping[str, Any] | None,
    source_uri: str,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Column specs, with the kinds not given inferred from a sample of the reference (columns None:
    every numerical column and every categorical one with few distinct values)."""
    given = isinstance(columns, Mapping) and all((v or {}).get("kind") for v in columns.values())
    if given:
        return normalize_columns(columns)
    probe = read_frame(source_uri, None if columns is None else list(columns), aliases).head(5000)
    specs = normalize_columns(columns, probe)
    if columns is None:
        specs = {
            c: s
            for c, s in specs.items()
            if s["kind"] == "numerical" or probe[c].nunique() <= _CATEGORICAL_MAX_UNIQUE
        }
    return specs


def _infer_kind(series: pd.Series) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return "categorical"
    return "numerical"


# --------------------------------------------------------------------------- reference
def reference_key(
    source_uri: str, specs: Mapping[str, Mapping[str, Any]], aliases: Mapping[str, str] | None = None
) -> str:
    """Cache key of a reference: its source, the drift columns with their kinds, and the reference
    names of the columns read under another name."""
    body: dict[str, Any] = {
        "v": _REFERENCE_CACHE_VERSION,
        "uri": source_uri,
        "columns": {c: s["kind"] for c, s in sorted(specs.items())},
    }
    used = {c: a for c, a in (aliases or {}).items() if c in specs}
    if used:
        body["aliases"] = used
    payload = json.dumps(body, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_frame(
    uri: str, columns: Sequence[str] | None = None, aliases: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """A parquet file or folder, or a training-set manifest JSON (its ``data_uri``), as a DataFrame.

    :param aliases: ``{column: name in the file}`` for columns the file holds under another name
        (used only where ``column`` itself is absent; the frame carries ``column``).
    :raises MLOpsInputError: the data is missing or a requested column is absent.
    """
    import pyarrow.parquet as pq

    path = as_path(uri)
    if not path.exists():
        raise MLOpsInputError(
            f"drift reference {uri!r} does not exist.", fix="pass an existing parquet or manifest URI."
        )
    if path.name.endswith(".json"):
        manifest = json.loads(path.read_bytes())
        if not manifest.get("data_uri"):
            raise MLOpsInputError(
                f"training manifest {uri!r} has no data_uri.",
                fix="pass the manifest the training-set task wrote.",
            )
        return read_frame(manifest["data_uri"], columns, aliases)
    files = sorted(p for p in path.iterdir() if p.name.endswith(".parquet")) if path.is_dir() else [path]
    frames = []
    for file in files:
        with file.open("rb") as handle:
            table = pq.read_table(handle)
        present = set(table.column_names)
        names = {
            c: c if c in present else (aliases or {}).get(c) for c in columns or []
        }  # drift column -> column of the file
        missing = [c for c, name in names.items() if name not in present]
        if missing:
            raise MLOpsInputError(
                f"drift reference {str(file)!r} lacks the drift columns {missing}.",
                fix="choose drift columns the model's training data has (see its training manifest), "
                "or name the reference's column for each with reference_columns=.",
            )
        frames.append(table.select(list(names.values())).rename_columns(list(names)) if columns else table)
    import pyarrow as pa

    return pa.concat_tables(frames).to_pandas() if len(frames) > 1 else frames[0].to_pandas()


def column_statistics(
    frame: pd.DataFrame, specs: Mapping[str, Mapping[str, Any]], bins: int = 10
) -> dict[str, Any]:
    """Compact statistics of the reference per column: quantile bin edges and shares for numerical
    columns, category shares for categorical ones. Used by :class:`~airflow_mlops.triggers.drift.DriftEventTrigger`
    to score drift without the reference rows."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, spec in specs.items():
        series = frame[name].dropna()
        if spec["kind"] == "numerical":
            values = series.to_numpy(dtype=float)
            edges = (
                np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
                if len(values)
                else np.array([0.0])
            )
            counts = (
                np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
                if len(edges) > 1
                else np.array([len(values)])
            )
            out[name] = {
                "kind": "numerical",
                "count": int(len(values)),
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std()) if len(values) else None,
                "edges": [float(e) for e in edges],
                "shares": [float(c) / max(len(values), 1) for c in counts],
            }
        else:
            shares = series.astype(str).value_counts(normalize=True)
            out[name] = {
                "kind": "categorical",
                "count": int(len(series)),
                "shares": {str(k): float(v) for k, v in shares.items()},
            }
    return out


def prepare_reference(
    source_uri: str,
    specs: Mapping[str, Mapping[str, Any]],
    store: ArtifactStore | None = None,
    *,
    refresh: bool = False,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Project the reference onto the drift columns once and cache it with its statistics.

    Writes ``<artifact_root>/drift/reference/<key>/reference.parquet`` and ``stats.json`` (atomic);
    later calls with the same source and columns only read them.

    :return: ``{"key", "source_uri", "data_uri", "stats_uri", "rows", "columns"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = store or ArtifactStore()
    key = reference_key(source_uri, specs, aliases)
    folder = store.path("drift", "reference", key)
    data_path, stats_path = folder / "reference.parquet", folder / "stats.json"
    if not refresh and data_path.exists() and stats_path.exists():
        stats = store.read_json(str(stats_path))
        return {**stats["meta"], "data_uri": str(data_path), "stats_uri": str(stats_path)}
    frame = read_frame(source_uri, list(specs), aliases)
    if frame.empty:
        raise MLOpsInputError(
            f"drift reference {source_uri!r} has no rows.", fix="use the model's training snapshot."
        )
    frame = _typed(frame, specs)
    with staged(data_path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    meta = {
        "key": key,
        "source_uri": source_uri,
        "rows": int(len(frame)),
        "columns": {c: s["kind"] for c, s in specs.items()},
    }
    store.write_json(stats_path, {"meta": meta, "columns": column_statistics(frame, specs)})
    return {**meta, "data_uri": str(data_path), "stats_uri": str(stats_path)}


def _typed(frame: pd.DataFrame, specs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Numerical columns as float64, categorical as strings (missing stays missing): one dtype per
    column on both sides, so Evidently does no conversion of its own."""
    import pandas as pd

    out = {}
    for name, spec in specs.items():
        if spec["kind"] == "numerical":
            out[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
        else:
            out[name] = frame[name].astype("string").astype(object).where(frame[name].notna(), None)
    return pd.DataFrame(out)


def production_model(model_name: str, hook: BentoMLHook | None = None) -> dict[str, Any] | None:
    """The version of ``model_name`` in production with what the quality check needs, or None.

    :return: ``{"model", "version", "holdout_metrics", "feature_service", "record"}``.
    """
    from airflow_mlops.hooks.bentoml import BentoMLHook

    hook = hook or BentoMLHook()
    index = hook.read_index(model_name)
    version = index.get("production")
    if not version:
        return None
    record = hook.version_record(index, version)
    return {
        "model": model_name,
        "version": version,
        "holdout_metrics": _holdout_metrics(record),
        "feature_service": record.get("feature_service"),
        "record": record,
    }


def production_reference(model_name: str, hook: BentoMLHook | None = None) -> dict[str, Any]:
    """The drift reference of the model in production: its training snapshot, found through the registry.

    :return: ``{"model", "version", "reference_uri", "manifest_uri", "time_range", "holdout_metrics",
        "feature_service"}``.
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
        "feature_service": production["feature_service"],
    }


def _holdout_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Holdout quality recorded at promotion (the candidate score of the last promote decision), else
    the validation metrics recorded at registration."""
    for decision in reversed(record.get("decisions") or []):
        if decision.get("action") == "promote" and decision.get("candidate_score") is not None:
            return {decision.get("metric", "auc"): float(decision["candidate_score"])}
    return {k: float(v) for k, v in (record.get("metrics") or {}).items() if isinstance(v, int | float)}


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
    for join in joins:
        other = read_frame(resolve_uri(join["uri"], offline_root))
        keep = list(join["on"]) + [c for c in (join.get("columns") or other.columns) if c not in join["on"]]
        other = other[keep].drop_duplicates(subset=list(join["on"]), keep="last")
        frame = frame.merge(other, on=list(join["on"]), how="left", suffixes=("", "_joined"))
    return frame


def read_prediction_log(log_root: str, dates: Sequence[str]) -> pd.DataFrame:
    """Rows of the serving prediction log for ``dates``: ``inputs`` and ``features`` flattened into
    columns, plus ``probability``, ``version`` and ``time``.

    :raises MLOpsInputError: the log holds no rows for the window.
    """
    import pandas as pd

    root = as_path(log_root)
    records = []
    for day in dates:
        folder = root / f"date={day}"
        if not folder.exists():
            continue
        for part in sorted(p for p in folder.iterdir() if p.name.endswith(".jsonl")):
            for line in part.read_text().splitlines():
                if line.strip():
                    records.append(flatten_prediction(json.loads(line)))
    if not records:
        raise MLOpsInputError(
            f"the drift window {dates[0]}..{dates[-1]} is empty: no predictions logged under {log_root!r}.",
            fix="check that the model is served and logging predictions, or move the window.",
        )
    return pd.DataFrame.from_records(records)


def flatten_prediction(record: Mapping[str, Any]) -> dict[str, Any]:
    """One prediction-log record as one flat row (feature values win over raw inputs of the same name)."""
    row: dict[str, Any] = {}
    for part in ("inputs", "features"):
        if isinstance(record.get(part), Mapping):
            row.update(record[part])
    output = record.get("output")
    probability = record.get("probability")
    if probability is None and isinstance(output, Mapping):
        probability = output.get("probability")
    elif probability is None and isinstance(output, int | float):
        probability = output
    row["probability"] = probability
    row["version"] = record.get("version")
    row["time"] = record.get("time")
    return row


# --------------------------------------------------------------------------- the check
def run_drift_report(
    reference: pd.DataFrame, current: pd.DataFrame, specs: Mapping[str, Mapping[str, Any]], drift_share: float
) -> tuple[Any, dict[str, Any]]:
    """Evidently 0.7 ``Report`` of one ``ValueDrift`` per column; returns (snapshot, summary).

    The summary: ``drift_detected`` (share of drifted columns >= ``drift_share``), ``drift_share``,
    ``drifted_columns`` and ``columns`` (score, method, threshold, drifted per column).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    names = list(specs)
    current = _typed(current, specs)
    definition = DataDefinition(
        numerical_columns=[c for c in names if specs[c]["kind"] == "numerical"],
        categorical_columns=[c for c in names if specs[c]["kind"] == "categorical"],
    )
    metrics = [
        ValueDrift(column=c, method=specs[c]["method"], threshold=specs[c]["threshold"]) for c in names
    ]
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    return snapshot, summarize_snapshot(snapshot.dict(), drift_share)


def summarize_snapshot(snapshot: Mapping[str, Any], drift_share: float) -> dict[str, Any]:
    """Small JSON summary of an Evidently snapshot dict of ``ValueDrift`` metrics and their tests."""
    status = {t["metric_config"]["metric_id"]: t["status"] for t in snapshot.get("tests", [])}
    columns: dict[str, Any] = {}
    for metric in snapshot["metrics"]:
        config = metric["config"]
        if not config.get("type", "").endswith("ValueDrift"):
            continue
        method, threshold, score = config.get("method"), config.get("threshold"), float(metric["value"])
        if metric["id"] in status:
            drifted = status[metric["id"]] == "FAIL"
        else:
            drifted = score < threshold if method in P_VALUE_METHODS else score >= threshold
        columns[config["column"]] = {
            "score": score,
            "method": method,
            "threshold": threshold,
            "drifted": drifted,
        }
    drifted_columns = sorted(c for c, v in columns.items() if v["drifted"])
    share = len(drifted_columns) / len(columns) if columns else 0.0
    return {
        "drift_detected": bool(columns) and share >= drift_share,
        "drift_share": share,
        "drift_share_threshold": drift_share,
        "drifted_columns": {c: columns[c]["score"] for c in drifted_columns},
        "columns": columns,
    }


def drift_event_id(model: str | None, window: Sequence[str], summary: Mapping[str, Any]) -> str:
    """Stable identity of a drift finding: same model, window and drifted columns give the same id, so
    a rerun or a repeated delivery of the event is recognised as a duplicate downstream."""
    payload = json.dumps(
        {"model": model, "window": list(window), "drifted": sorted(summary.get("drifted_columns", {}))},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class DriftReportLink(BaseOperatorLink):
    """Extra link "Drift report": the Evidently HTML report of the run, served by the UI plugin."""

    name = "Drift report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""


def drift_alias(asset: Asset | str) -> AssetAlias:
    """The ``AssetAlias`` through which drift events for ``asset`` are emitted."""
    name = asset.name if isinstance(asset, Asset) else str(asset)
    return AssetAlias(name=f"{name}.events")


class EvidentlyDriftOperator(BaseOperator):
    """Check a recent window for data drift against the production model's reference (Evidently 0.7).

    Returns ``drift_detected``, ``drift_share``, ``drifted_columns`` (column: score), ``columns``,
    ``quality`` (AUC on the window vs holdout, where labels have arrived), ``decay_detected``,
    ``report_uri``, ``summary_uri``. When drift or decay is found and ``drift_asset`` is set, one event
    for ``drift_asset`` with these figures in ``extra`` is attached to the operator's ``AssetAlias``
    outlet (see the module docstring); otherwise no event is emitted.

    :param model_name: registry name of the monitored model; its production version gives the
        reference and, with labels, the AUC (templated).
    :param reference_uri: parquet / training manifest to compare against instead of the registry's
        (templated).
    :param columns: drift columns: names, or ``{name: {"kind", "method", "threshold"}}``; default every
        column of the reference (templated).
    :param drift_share: share of drifted columns from which the data set counts as drifted.
    :param window_end: last day of the window, ``YYYY-MM-DD`` (templated, default ``{{ ds }}``).
    :param window_days: length of the window in days (templated).
    :param window_start: first day, instead of ``window_days`` (templated).
    :param source: ``offline_store`` (validated data) or ``prediction_log``.
    :param table: offline-store table (templated).
    :param joins: tables joined onto the window, ``[{"uri", "on", "columns"}]`` (templated).
    :param offline_root: offline store root; default ``[mlops] offline_root`` (templated).
    :param prediction_log_uri: prediction-log root; default ``<artifact_root>/predictions/<model_name>`` (templated).
    :param reference_columns: ``{drift column: column of the reference}`` for drift columns the
        reference holds under another name, read only where the reference lacks the drift column itself.
        A Feast training snapshot names joined features ``<view>__<feature>``; for the flights model
        :data:`FLIGHTS_REFERENCE_COLUMNS` (templated).
    :param label_column: the model's label, 0/1. When set and ``model_name`` has a production version
        (also with ``reference_uri`` given), the model's AUC on the labelled rows of the window is
        computed and compared with its holdout AUC (recorded at promotion): ``quality`` =
        ``{"labelled_rows", "unlabelled_rows", "auc", "holdout_auc", "auc_decay", "labels"}``. Without a
        production version, or before any label of the window has arrived, ``quality`` only counts rows
        (templated).
    :param label_rule: derive ``label_column`` from another column of the labelled rows, e.g.
        ``{"column": "arr_delay", "gt": 15}`` (delayed = arrival delay > 15 min); rows where that column
        is missing are unlabelled.
    :param labels_table: offline-store table of labelled rows read for the window's days
        (``<offline_root>/<labels_table>/date=YYYY-MM-DD/part-0.parquet``), e.g. ``flights_labelled``
        written by :class:`~airflow_mlops.operators.features.FlightDailyStatsOperator` (one row per
        flight with ``event_timestamp``, the join keys, ``arr_delay`` and ``delayed``); default: the
        window's own rows (templated).
    :param feature_repo: Feast repository (absolute path) used when the labelled rows lack some of the
        model's features: they are joined point in time from the feature service the production version
        was registered with (its ``feature_service``), exactly as the training set was built; default
        the ``feast_conn_id`` connection's ``repo_path`` (templated).
    :param feast_conn_id: Airflow connection of type ``feast`` for that join.
    :param max_auc_decay: holdout AUC minus window AUC above which decay is reported; decay alone
        emits the drift event (with ``decay_detected`` and the AUC figures in ``extra``).
    :param drift_asset: the model's drift Asset (or its name); events go through ``drift_alias(asset)``.
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
        table: str = "flights",
        joins: Sequence[Mapping[str, Any]] | None = None,
        offline_root: str | None = None,
        prediction_log_uri: str | None = None,
        reference_columns: Mapping[str, str] | None = None,
        label_column: str | None = None,
        label_rule: Mapping[str, Any] | None = None,
        labels_table: str | None = None,
        feature_repo: str | None = None,
        feast_conn_id: str | None = "feast_default",
        max_auc_decay: float = 0.05,
        drift_asset: Asset | str | None = None,
        bentoml_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if drift_asset is not None:
            kwargs["outlets"] = [*(kwargs.get("outlets") or []), drift_alias(drift_asset)]
        super().__init__(**kwargs)
        if source not in ("offline_store", "prediction_log"):
            raise MLOpsArgumentError(
                f"source {source!r} is not known.", fix="use 'offline_store' or 'prediction_log'."
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
                fix='use {"column": <numeric column>, "gt": <threshold>}, e.g. {"column": "arr_delay", "gt": 15}.',
            )
        if label_rule is not None and not label_column:
            raise MLOpsArgumentError(
                "label_rule derives a label, but label_column names none.", fix="e.g. label_column='delayed'."
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
        self.max_auc_decay = max_auc_decay
        self.drift_asset = Asset(name=drift_asset) if isinstance(drift_asset, str) else drift_asset
        self.bentoml_conn_id = bentoml_conn_id

    @cached_property
    def hook(self) -> BentoMLHook:
        from airflow_mlops.hooks.bentoml import BentoMLHook

        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore()

    def execute(self, context: Context) -> dict[str, Any]:
        import pandas as pd

        settings = self.store.settings
        production: dict[str, Any] = {}
        if self.reference_uri:
            source_uri = resolve_uri(self.reference_uri, settings.artifact_root)
            if self.label_column and self.model_name:  # the quality check still needs the served model
                production = production_model(self.model_name, self.hook) or {}
        else:
            production = production_reference(self.model_name, self.hook)
            source_uri = production["reference_uri"]
        aliases = dict(self.reference_columns or {})
        dates = window_dates(self.window_end, int(self.window_days), self.window_start)
        offline_root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        if self.source == "offline_store":
            current = read_offline_window(offline_root, self.table, dates, self.joins or ())
        else:
            log_root = self.prediction_log_uri or f"{settings.artifact_root}/predictions/{self.model_name}"
            current = read_prediction_log(resolve_uri(log_root, settings.artifact_root), dates)

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
            raise MLOpsInputError(
                f"the drift columns {empty} have no values in the window {dates[0]}..{dates[-1]} "
                f"({len(current)} rows of table {self.table!r}).",
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
        decay = bool(quality.get("auc_decay") is not None and quality["auc_decay"] > self.max_auc_decay)

        report = self.store.for_task(context, "drift_report.html")
        with staged(report) as tmp:
            snapshot.save_html(str(tmp))
        result = {
            **summary,
            "decay_detected": decay,
            "quality": quality,
            "window": {"start": dates[0], "end": dates[-1], "rows": int(len(current)), "source": self.source},
            "reference": {k: reference[k] for k in ("key", "source_uri", "rows", "stats_uri")},
            "model": self.model_name,
            "model_version": production.get("version"),
            "report_uri": str(report),
        }
        result["event_id"] = drift_event_id(self.model_name, [dates[0], dates[-1]], summary)
        summary_artifact = self.store.write_json(self.store.for_task(context, "drift_summary.json"), result)
        result["summary_uri"] = summary_artifact.uri

        from airflow_mlops.plugins.mlops_plugin import artifact_url

        context["ti"].xcom_push(
            key=DriftReportLink().xcom_key, value=artifact_url(str(report)) or str(report)
        )
        self.log.info(
            "Drift %s: share %.2f (threshold %.2f), drifted columns %s; AUC decay %s",
            "detected" if summary["drift_detected"] else "not detected",
            summary["drift_share"],
            self.drift_share,
            summary["drifted_columns"] or "none",
            quality.get("auc_decay"),
        )
        if (summary["drift_detected"] or decay) and self.drift_asset is not None:
            context["outlet_events"][drift_alias(self.drift_asset)].add(
                self.drift_asset, extra=event_extra(result)
            )
        return result

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
        except MLOpsInputError as err:  # labels arrive later than the data: no AUC yet, drift still checked
            self.log.warning("No AUC for this window: %s", err)
            return None

    def _quality(self, frame: pd.DataFrame | None, production: Mapping[str, Any]) -> dict[str, Any]:
        """AUC of the production model on the labelled rows of the window against its holdout AUC."""
        label = self.label_column
        if not label or frame is None:
            return {}
        if not production:
            self.log.warning("Model %s has no production version: no AUC computed", self.model_name)
            return {"labelled_rows": 0, "reason": f"model {self.model_name!r} has no production version"}
        rule = self.label_rule
        if rule:
            if rule["column"] not in frame.columns:
                raise MLOpsInputError(
                    f"label_rule reads column {rule['column']!r}, which the labelled rows lack "
                    f"(they have {sorted(frame.columns)[:30]}).",
                    fix="correct label_rule, or read labels from labels_table=.",
                )
            source = frame[rule["column"]]
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
        if labelled.empty or labelled[label].nunique() < 2:
            return {**counts, "reason": "fewer than two label classes in the window"}
        from sklearn.metrics import roc_auc_score

        predictor = self.hook.load(self.model_name, production["version"])
        features = getattr(predictor, "features", None) or []
        missing = [f for f in features if f not in labelled.columns]
        if missing:
            labelled = self._with_features(labelled, production, missing)
        labels = labelled[label].astype(int)
        auc = float(roc_auc_score(labels, predictor.predict(labelled)))
        holdout = (production.get("holdout_metrics") or {}).get("auc")
        return {
            **counts,
            "auc": auc,
            "holdout_auc": holdout,
            "auc_decay": None if holdout is None else float(holdout) - auc,
            "labels": {"positive": int(labels.sum()), "positive_rate": round(float(labels.mean()), 6)},
            "model_version": production["version"],
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
                fix="read labels from the labelled-rows table the features DAG writes (labels_table='flights_labelled').",
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
    return {
        "event_id": result["event_id"],
        "model": result.get("model"),
        "model_version": result.get("model_version"),
        "drift_detected": result["drift_detected"],
        "decay_detected": result["decay_detected"],
        "drift_share": result["drift_share"],
        "drifted_columns": result["drifted_columns"],
        "auc": result["quality"].get("auc"),
        "holdout_auc": result["quality"].get("holdout_auc"),
        "auc_decay": result["quality"].get("auc_decay"),
        "window_start": result["window"]["start"],
        "window_end": result["window"]["end"],
        "data_time": result["window"]["end"],
        "report_uri": result["report_uri"],
    }


class DriftBaselineOperator(BaseOperator):
    """(Re)compute the cached drift reference of the model in production; run it after promotion.

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
        from airflow_mlops.hooks.bentoml import BentoMLHook

        production = production_reference(self.model_name, BentoMLHook(bentoml_conn_id=self.bentoml_conn_id))
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
    and events less than ``cooldown_days`` of data time after the last retraining skip the task, and
    with it everything downstream that needs it (default trigger rule). A run started by hand or on a
    schedule (no triggering event) trains. The decision and the event that caused a retraining are
    recorded in ``<state_dir>/retraining/<model_name>.json`` (see :mod:`airflow_mlops.ml.retraining`)
    and returned.

    :param model_name: model whose retrainings are gated (templated).
    :param cooldown_days: at most one retraining per this many days of data time (templated).
    :param state_dir: folder of the retraining state; default ``<[mlops] state_dir>/retraining`` (templated).
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
        decision = gate(
            RetrainingState(folder, self.model_name),
            events,
            cooldown=cooldown,
            run_id=context["run_id"],
            manual_data_time=logical,
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
