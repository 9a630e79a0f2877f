"""Load a training set (parquet, or the manifest the training-set operator writes) and split it by time.

The manifest is JSON with ``data_uri``, ``label``, ``event_timestamp_column``, ``feature_refs``, ``rows``
and ``sha256``; the data file's sha256 is checked against it. The validation set is the latest
``validation_fraction`` of the rows by the time column (never a random split: a model is always
validated on data later than what it learnt from). Every problem with the input raises
:class:`~airflow_mlops.exceptions.MLOpsInputError` naming the file or column.

:class:`TrainingSet` travels to every trial worker; this module imports nothing heavy at the top
(not even Airflow, ~3 s), so unpickling it in a fresh worker process stays cheap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: string columns with more distinct values than this look like identifiers and are left out
MAX_CATEGORIES = 200


@dataclass
class TrainingSet:
    """Train and validation frames for one search; shipped to trials through Ray's object store."""

    x_train: Any
    y_train: Any
    x_valid: Any
    y_valid: Any
    #: ``binary``, ``multiclass`` or ``regression``
    task: str
    label: str
    features: list[str]
    categorical: list[str]
    categories: dict[str, list[str]]
    time_column: str | None
    split_time: str | None
    dropped: list[str] = field(default_factory=list)
    #: class labels in code order (binary: ``[negative, positive]``); empty for regression
    classes: list[Any] = field(default_factory=list)
    #: the metric the search optimises and its direction; the boosting trainables pick their best
    #: iteration by it (None: the task's default metric, see :data:`~airflow_mlops.ml.metrics.DEFAULT_METRIC`)
    metric: str | None = None
    mode: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "label": self.label,
            "classes": self.classes,
            "train_rows": len(self.y_train),
            "valid_rows": len(self.y_valid),
            "features": self.features,
            "dropped_columns": self.dropped,
            "time_column": self.time_column,
            "split_time": self.split_time,
        }


@dataclass
class Source:
    """Where the rows come from and what the manifest (if any) says about them."""

    data_uri: str
    label: str | None = None
    time_column: str | None = None
    feature_refs: list[str] = field(default_factory=list)
    sha256: str | None = None
    manifest_uri: str | None = None


def resolve_source(uri: str) -> Source:
    """A parquet file (or folder) as it is; a JSON manifest read and its ``data_uri`` resolved."""
    from airflow_mlops.artifacts import as_path, reaching

    path = as_path(uri)
    with reaching(path):
        return _resolve_source(uri, path)


def _resolve_source(uri: str, path: Any) -> Source:
    from airflow_mlops.exceptions import MLOpsInputError

    if not path.exists():
        raise MLOpsInputError(
            f"training data {uri!r} does not exist.",
            fix="check training_data_uri: the manifest or parquet URI the training-set task returned.",
        )
    if path.is_dir() or not path.name.endswith(".json"):
        return Source(data_uri=uri)
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:
        raise MLOpsInputError(f"training-set manifest {uri!r} is not valid JSON ({err}).") from err
    if not isinstance(manifest, dict) or "data_uri" not in manifest:
        raise MLOpsInputError(
            f"training-set manifest {uri!r} has no 'data_uri'.",
            fix="pass the manifest written by the training-set operator, or a parquet file.",
        )
    data_uri = str(manifest["data_uri"])
    if "://" not in data_uri and not data_uri.startswith("/"):
        data_uri = str(path.parent / data_uri)
    return Source(
        data_uri=data_uri,
        label=manifest.get("label"),
        time_column=manifest.get("event_timestamp_column"),
        feature_refs=list(manifest.get("feature_refs") or []),
        sha256=manifest.get("sha256"),
        manifest_uri=uri,
    )


def read_frame(source: Source):
    """The rows as a pandas DataFrame; the manifest's sha256 is checked for a single file."""
    from airflow_mlops.artifacts import as_path, reaching

    path = as_path(source.data_uri)
    with reaching(path):
        return _read_frame(source, path)


def _read_frame(source: Source, path: Any):
    import pyarrow.parquet as pq

    from airflow_mlops.artifacts import is_unreachable, read_parquet_batch, sha256_of
    from airflow_mlops.exceptions import MLOpsInputError

    if source.sha256 and path.exists() and path.is_file():
        actual = sha256_of(path)
        if actual != source.sha256:
            raise MLOpsInputError(
                f"training data {source.data_uri!r} has sha256 {actual[:12]}..., but manifest "
                f"{source.manifest_uri!r} records {source.sha256[:12]}...; the file changed after the "
                "training set was built.",
                fix="rerun the training-set task for this data interval.",
            )
    if path.exists() and path.is_file():
        try:
            with path.open("rb") as handle:
                return pq.read_table(handle).to_pandas()
        except Exception as err:
            if is_unreachable(err):  # the store, not the file
                raise
            raise MLOpsInputError(
                f"training data {source.data_uri!r} is not readable parquet ({err})."
            ) from err
    return read_parquet_batch(path).to_pandas()


def _feature_columns(
    frame: Any, label: str, time_column: str | None, features: list[str] | None, feature_refs: list[str]
) -> list[str]:
    from airflow_mlops.exceptions import MLOpsInputError

    columns = list(frame.columns)
    if features:
        missing = [f for f in features if f not in columns]
        if missing:
            raise MLOpsInputError(
                f"feature columns {missing} are not in the training data (columns: {columns}).",
                fix="correct the operator's features argument.",
            )
        return [f for f in features if f != label]
    if feature_refs:
        named = []
        for ref in feature_refs:
            view, _, name = ref.rpartition(":")
            for candidate in (name, f"{view}__{name}"):
                if candidate in columns and candidate not in named:
                    named.append(candidate)
        if named:
            return named
    return [c for c in columns if c not in (label, time_column)]


#: a numeric label with more distinct values than this is read as a regression target by ``task="any"``
MAX_INFERRED_CLASSES = 20


def infer_task(labels: Any, allowed: tuple[str, ...] | None = None) -> str:
    """The task a label column suggests: two values -> ``binary``; numbers with fractions or more than
    :data:`MAX_INFERRED_CLASSES` values -> ``regression``; otherwise ``multiclass``.

    :param allowed: the tasks the trainable can train (e.g. ``("binary", "multiclass")``): an inferred
        task outside them falls back to the closest allowed one, so the label check names the problem.
    """
    import pandas as pd

    from airflow_mlops.ml.metrics import TASKS

    allowed = tuple(allowed or TASKS)
    present = labels.dropna()
    distinct = present.nunique()
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    fractional = numeric and bool((present.astype(float) % 1 != 0).any())
    if distinct == 2 and not fractional:
        task = "binary"
    elif numeric and (fractional or distinct > MAX_INFERRED_CLASSES):
        task = "regression"
    else:
        task = "multiclass"
    if task in allowed:
        return task
    if task == "regression":  # a classifier on a numeric target: the label check explains it
        return "multiclass" if "multiclass" in allowed else allowed[0]
    if task == "binary" and "multiclass" in allowed:
        return "multiclass"  # the label check then says "needs three or more"
    return allowed[0]


def build_training_set(
    frame: Any,
    *,
    label: str,
    task: str,
    time_column: str | None = None,
    features: list[str] | None = None,
    feature_refs: list[str] | None = None,
    validation_fraction: float = 0.2,
    origin: str = "training data",
    allowed_tasks: tuple[str, ...] | None = None,
) -> TrainingSet:
    """Check the frame and split it by time into train and validation.

    Labels become ``y``: binary 0/1 (1 is ``classes[1]``, the positive class), multiclass the codes
    ``0..K-1`` of the sorted ``classes`` (strings allowed), regression floats.

    :param task: ``binary``, ``multiclass``, ``regression`` (``classification`` is read as ``binary``) or
        ``any`` (inferred from the label, see :func:`infer_task`).
    :param allowed_tasks: with ``task="any"``, the tasks the trainable can train.
    :raises MLOpsInputError: empty data, missing or constant label, missing time column, a label that
        does not fit the task (naming the column, the values seen and the fix), a validation set with a
        single class.
    """
    import numpy as np
    import pandas as pd

    from airflow_mlops.exceptions import MLOpsInputError
    from airflow_mlops.ml.metrics import check_labels, normalize_task

    if len(frame) == 0:
        raise MLOpsInputError(
            f"the training set {origin!r} is empty (0 rows).",
            fix="check the data interval of the training-set task; no rows were selected.",
        )
    if label not in frame.columns:
        raise MLOpsInputError(
            f"label column {label!r} is not in {origin!r} (columns: {list(frame.columns)}).",
            fix="set label to one of the columns, or build the training set with this label.",
        )
    if time_column and time_column not in frame.columns:
        raise MLOpsInputError(
            f"time column {time_column!r} for the validation split is not in {origin!r}.",
            fix="set time_column to the event-timestamp column of the training set.",
        )
    labelled = frame[frame[label].notna()]
    if len(labelled) < len(frame):
        log.warning("Left out %d rows whose label %r is missing", len(frame) - len(labelled), label)
    if len(labelled) == 0:
        raise MLOpsInputError(
            f"the training set {origin!r} has no row with a value in label column {label!r}.",
            fix="check how the label is computed.",
        )
    distinct = labelled[label].nunique()
    if distinct < 2:
        raise MLOpsInputError(
            f"label column {label!r} is constant in {origin!r} (every row is "
            f"{labelled[label].iloc[0]!r}); there is nothing to learn.",
            fix="check the label definition and the data interval.",
        )
    y_raw = labelled[label]
    task = infer_task(y_raw, allowed_tasks) if task == "any" else normalize_task(task)
    classes = check_labels(y_raw, task, label=label, origin=repr(origin))
    if task == "binary":
        y_all = (y_raw == classes[1]).astype(int).to_numpy()
    elif task == "multiclass":
        y_all = _class_codes(y_raw, classes)
    else:
        y_all = y_raw.astype(float).to_numpy()

    columns = _feature_columns(labelled, label, time_column, features, feature_refs or [])
    dropped: list[str] = []
    categorical: list[str] = []
    categories: dict[str, list[str]] = {}
    x = pd.DataFrame(index=labelled.index)
    for col in columns:
        series = labelled[col]
        if pd.api.types.is_bool_dtype(series):
            x[col] = series.astype(float)
        elif pd.api.types.is_numeric_dtype(series):
            x[col] = series.astype(float)
        elif (
            isinstance(series.dtype, pd.CategoricalDtype)
            or pd.api.types.is_object_dtype(series)
            or pd.api.types.is_string_dtype(series)
        ):
            values = series.astype("string")
            levels = sorted(values.dropna().unique().tolist())
            if len(levels) > MAX_CATEGORIES:
                dropped.append(col)
                continue
            categorical.append(col)
            categories[col] = [str(v) for v in levels]
            x[col] = pd.Categorical(values.astype(object).where(values.notna(), None), categories=levels)
        else:
            dropped.append(col)
    if dropped:
        log.info("Left out columns that are not usable features: %s", dropped)
    if x.shape[1] == 0:
        raise MLOpsInputError(
            f"{origin!r} has no usable feature column besides label {label!r}.",
            fix="include numeric or categorical feature columns in the training set.",
        )

    if time_column:
        times = pd.to_datetime(labelled[time_column], utc=True, cache=False)
        order = np.argsort(times.to_numpy(), kind="stable")
    else:
        times = None
        order = np.arange(len(labelled))
    n_valid = int(round(len(order) * validation_fraction))
    if n_valid < 1 or len(order) - n_valid < 2:
        raise MLOpsInputError(
            f"the training set {origin!r} has {len(order)} labelled rows: too few for a train/validation split.",
            fix="widen the data interval of the training set.",
        )
    train_idx, valid_idx = order[: len(order) - n_valid], order[len(order) - n_valid :]
    y_valid = y_all[valid_idx]
    if classes and len(np.unique(y_valid)) < 2:
        only = classes[int(y_valid[0])]
        raise MLOpsInputError(
            f"the time-based validation set (latest {n_valid} rows of {origin!r}) holds a single class "
            f"of label {label!r} ({only!r}), so no validation metric can be computed.",
            fix="widen the data interval or raise validation_fraction.",
        )
    return TrainingSet(
        x_train=x.iloc[train_idx].reset_index(drop=True),
        y_train=y_all[train_idx],
        x_valid=x.iloc[valid_idx].reset_index(drop=True),
        y_valid=y_valid,
        task=task,
        label=label,
        features=list(x.columns),
        categorical=categorical,
        categories=categories,
        time_column=time_column,
        split_time=str(times.iloc[valid_idx[0]]) if times is not None else None,
        dropped=dropped,
        classes=classes,
    )


def _class_codes(labels: Any, classes: list[Any]) -> Any:
    """Integer codes ``0..K-1`` of class labels in the order of ``classes``."""
    import pandas as pd

    from airflow_mlops.ml.metrics import encode_labels

    codes = pd.Categorical(labels, categories=classes).codes
    if (codes < 0).any():  # labels whose type differs from the classes' (e.g. "1" and 1)
        return encode_labels(labels.tolist(), classes)
    return codes.astype(int)
