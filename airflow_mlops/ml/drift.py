"""Drift computation shared by the monitor operator, the drift trigger and benchmarks: column specs, the
cached reference (projected training snapshot with per-column statistics), the Evidently 0.7 report and
its summary, the identity of a finding, and the served-prediction values prediction drift compares.

Pure functions over pandas frames and the artifact store; pandas, pyarrow, NumPy and Evidently are
imported inside the functions (the trigger imports this module in the triggerer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_mlops.artifacts import ArtifactStore, as_path, reaching, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError

if TYPE_CHECKING:
    import pandas as pd

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
            kind = infer_kind(frame[name])
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


def infer_kind(series: pd.Series) -> str:
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
    :raises ArtifactStoreError: the store holding it cannot be reached.
    """
    with reaching(uri):
        return _read_frame(uri, columns, aliases)


def _read_frame(uri: str, columns: Sequence[str] | None, aliases: Mapping[str, str] | None) -> pd.DataFrame:
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
    frame = typed(frame, specs)
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


def typed(frame: pd.DataFrame, specs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
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
    current = typed(current, specs)
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


def drift_event_id(
    model: str | None, window: Sequence[str], summary: Mapping[str, Any], *, also: Sequence[str] = ()
) -> str:
    """Stable identity of a drift finding: same model, window and drifted columns give the same id, so
    a rerun or a repeated delivery of the event is recognised as a duplicate downstream.

    :param also: further findings that make it a different event (e.g. ``"prediction"`` when the served
        predictions drifted); left out of the payload when empty, so older ids stay the same.
    """
    body: dict[str, Any] = {
        "model": model,
        "window": list(window),
        "drifted": sorted(summary.get("drifted_columns", {})),
    }
    if also:
        body["also"] = sorted(also)
    payload = json.dumps(body, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- quality decay
def promotion_decision(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The registry decision that put a version in production (its last ``promote``), or None."""
    for decision in reversed(record.get("decisions") or []):
        if decision.get("action") == "promote":
            return dict(decision)
    return None


def resolve_max_decay(max_decay: Mapping[str, float] | float | None, metric: str) -> float:
    """The decay threshold of ``metric``: from a per-metric mapping (metrics it does not name keep
    :data:`~airflow_mlops.ml.metrics.DEFAULT_MAX_DECAY`), a number meaning this metric, or the default.

    :raises MLOpsArgumentError: a mapping naming an unknown metric, or a threshold that is not a
        positive number.
    """
    from airflow_mlops.ml.metrics import DEFAULT_MAX_DECAY, METRICS

    if isinstance(max_decay, Mapping):
        unknown = sorted(set(max_decay) - set(METRICS))
        if unknown:
            raise MLOpsArgumentError(
                f"max_decay names unknown metrics {unknown}.", fix=f"use metrics among {sorted(METRICS)}."
            )
        value: Any = {**DEFAULT_MAX_DECAY, **max_decay}.get(metric)
    elif max_decay is None:
        value = DEFAULT_MAX_DECAY.get(metric)
    else:
        value = max_decay
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise MLOpsArgumentError(
            f"max_decay for {metric} must be a positive number, got {max_decay!r}.",
            fix='e.g. max_decay={"auc": 0.05, "rmse": 0.2} (a drop, or a rise as a ratio for losses).',
        )
    return value


def model_classes(predictor: Any) -> list[Any]:
    """The classes of a classifier, in the order of its output (binary default ``[0, 1]``)."""
    from airflow_mlops.ml.metrics import normalize_task

    classes = list(getattr(predictor, "classes", None) or [])
    if not classes and normalize_task(predictor.task) == "binary":
        return [0, 1]
    return classes


def label_codes(labels: Any, task: str, classes: Sequence[Any]) -> Any:
    """``labels`` (non-missing) as :func:`~airflow_mlops.ml.metrics.scores` takes them: numbers for
    regression, class codes ``0..K-1`` for multiclass, 0/1 for binary (given as 0/1 or as the classes).

    :raises MLOpsInputError: a label that is not a number (regression) or not a class of the model.
    """
    import numpy as np
    import pandas as pd

    from airflow_mlops.ml.metrics import encode_labels

    values = list(labels)
    if task == "regression":
        numbers = pd.to_numeric(pd.Series(values), errors="coerce")
        if numbers.isna().any():
            bad = sorted({str(v) for v, n in zip(values, numbers, strict=True) if pd.isna(n)})[:8]
            raise MLOpsInputError(
                f"labels {bad} of the window are not numbers, but the model is a regression model.",
                fix="monitor with the numeric label the model was trained on (label_column=).",
            )
        return numbers.to_numpy(dtype=float)
    try:
        return encode_labels(values, classes)
    except MLOpsInputError:
        if task == "binary" and {v for v in values} <= {0, 1}:
            return np.asarray(values, dtype=int)
        raise


def window_scores(predictor: Any, rows: pd.DataFrame, label: str) -> dict[str, float]:
    """Every metric of the predictor's task on ``rows`` (whose ``label`` is known)."""
    from airflow_mlops.ml.metrics import normalize_task, scores

    task = normalize_task(predictor.task)
    classes = model_classes(predictor)
    y_true = label_codes(rows[label], task, classes)
    prediction = predictor.predict(rows)
    return scores(task, y_true, prediction, n_classes=len(classes) if task == "multiclass" else None)


def label_summary(labels: Any, task: str) -> dict[str, Any]:
    """A few figures of the window's labels: positives (binary), rows per class (multiclass), mean and
    spread (regression)."""
    import pandas as pd

    series = pd.Series(list(labels))
    if task == "regression":
        numbers = pd.to_numeric(series, errors="coerce")
        return {"mean": round(float(numbers.mean()), 6), "std": round(float(numbers.std(ddof=0)), 6)}
    counts = series.astype(str).value_counts()
    return {"rows_per_class": {str(k): int(v) for k, v in counts.sort_index().items()}}


# --------------------------------------------------------------------------- prediction drift
def prediction_kind(task: str) -> str:
    """How the logged prediction of a ``task`` model is compared: a class is categorical, a
    probability or a value numerical."""
    from airflow_mlops.ml.metrics import normalize_task

    return "categorical" if normalize_task(task) == "multiclass" else "numerical"


def served_values(predictor: Any, rows: Any) -> list[Any]:
    """What the service logs as ``prediction`` for ``rows`` (see :mod:`airflow_mlops.ml.prediction_log`):
    binary, the probability of the positive class; multiclass, the predicted class; regression, the
    predicted value."""
    import numpy as np

    from airflow_mlops.ml.metrics import normalize_task

    output = predictor.predict(rows)
    if normalize_task(predictor.task) == "multiclass":
        classes = model_classes(predictor)
        return [classes[int(i)] for i in np.asarray(output, dtype=float).argmax(axis=1)]
    return [float(v) for v in np.asarray(output, dtype=float)]


def prediction_reference(
    predictor: Any,
    holdout_uri: str,
    *,
    model: str,
    version: str,
    store: ArtifactStore | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """The production model's predictions on its holdout, computed once per version and cached.

    Writes ``<artifact_root>/drift/predictions/<model>/<version>/<key>/reference.parquet`` (one column,
    ``prediction``) and ``stats.json`` (as :func:`prepare_reference` does, so a
    :class:`~airflow_mlops.triggers.drift.DriftEventTrigger` can score the logged predictions against it
    with ``columns=["prediction"]``); later calls only read them.

    :return: ``{"key", "source_uri", "data_uri", "stats_uri", "rows", "columns", "model", "version"}``.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = store or ArtifactStore()
    kind = prediction_kind(predictor.task)
    specs = {"prediction": {"kind": kind, "method": None, "threshold": None}}
    body = {"v": _REFERENCE_CACHE_VERSION, "uri": holdout_uri, "kind": kind}
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    folder = store.path("drift", "predictions", model, version, key)
    data_path, stats_path = folder / "reference.parquet", folder / "stats.json"
    if not refresh and data_path.exists() and stats_path.exists():
        stats = store.read_json(str(stats_path))
        return {**stats["meta"], "data_uri": str(data_path), "stats_uri": str(stats_path)}
    holdout = read_frame(holdout_uri)
    if holdout.empty:
        raise MLOpsInputError(
            f"holdout {holdout_uri!r} of {model} {version} has no rows, so there are no reference predictions.",
            fix="promote the model with the holdout it was gated on.",
        )
    frame = typed(pd.DataFrame({"prediction": served_values(predictor, holdout)}), specs)
    with staged(data_path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    meta = {
        "key": key,
        "source_uri": holdout_uri,
        "rows": int(len(frame)),
        "columns": {"prediction": kind},
        "model": model,
        "version": version,
    }
    store.write_json(stats_path, {"meta": meta, "columns": column_statistics(frame, specs)})
    return {**meta, "data_uri": str(data_path), "stats_uri": str(stats_path)}
