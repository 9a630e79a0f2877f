"""Task types, their metrics and labels: one place that every stage reads.

A model's ``task`` is ``binary`` (two classes; the model answers the probability of the positive class),
``multiclass`` (three or more classes, strings allowed; a class and per-class probabilities) or
``regression`` (a number). Each task has built-in metrics with the direction they improve in and the way
their decay is measured in the monitor:

=========  ==============================  =========  ==========================================
metric     tasks                           better     decay (holdout score -> window score)
=========  ==============================  =========  ==========================================
auc        binary                          higher     drop: holdout - window
accuracy   binary, multiclass              higher     drop
macro_f1   binary, multiclass              higher     drop
logloss    binary, multiclass              lower      rise as a ratio: window / holdout - 1
rmse       regression                      lower      rise as a ratio
mae        regression                      lower      rise as a ratio
r2         regression                      higher     drop
=========  ==============================  =========  ==========================================

Defaults: ``auc`` for binary, ``macro_f1`` for multiclass, ``rmse`` for regression.

The tuning operator, the registry, the promotion gate, the monitor and the spec all import from here, so a
metric means the same thing at every stage. Pure Python at import time: NumPy and scikit-learn are
imported by the functions that compute, and so are our errors (they import Airflow): Ray Tune's trial
workers preload the trainables, which import this module, and must not start Airflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["binary", "multiclass", "regression"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "regression")
#: older model descriptions say ``classification`` for a binary model
TASK_ALIASES = {"classification": "binary"}


@dataclass(frozen=True)
class Metric:
    """A built-in metric: the tasks it fits, its direction and how its decay is measured."""

    name: str
    tasks: tuple[str, ...]
    mode: Literal["max", "min"]
    #: ``drop``: holdout - window (higher is better); ``rise_ratio``: window / holdout - 1 (lower is better)
    decay: Literal["drop", "rise_ratio"]
    description: str

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "max"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("auc", ("binary",), "max", "drop", "area under the ROC curve"),
        Metric("accuracy", ("binary", "multiclass"), "max", "drop", "share of rows given the right class"),
        Metric("macro_f1", ("binary", "multiclass"), "max", "drop", "F1 score averaged over the classes"),
        Metric("logloss", ("binary", "multiclass"), "min", "rise_ratio", "log loss of the probabilities"),
        Metric("rmse", ("regression",), "min", "rise_ratio", "root mean squared error"),
        Metric("mae", ("regression",), "min", "rise_ratio", "mean absolute error"),
        Metric("r2", ("regression",), "max", "drop", "coefficient of determination"),
    )
}
DEFAULT_METRIC: dict[str, str] = {"binary": "auc", "multiclass": "macro_f1", "regression": "rmse"}
#: default decay threshold per metric: a drop of 0.05 (AUC, F1, accuracy, R2) or a rise of 20 % (losses)
DEFAULT_MAX_DECAY: dict[str, float] = {
    "auc": 0.05,
    "accuracy": 0.05,
    "macro_f1": 0.05,
    "r2": 0.1,
    "logloss": 0.2,
    "rmse": 0.2,
    "mae": 0.2,
}
#: the metric modes, for callers that only need the direction
METRIC_MODES: dict[str, str] = {name: m.mode for name, m in METRICS.items()}


def _argument_error(problem: str, fix: str) -> Exception:
    """Our argument error, imported when raised: importing it imports Airflow (see the module docstring)."""
    from airflow_mlops.exceptions import MLOpsArgumentError

    return MLOpsArgumentError(problem, fix=fix)


def _input_error(problem: str, fix: str) -> Exception:
    """Our input error, imported when raised (see :func:`_argument_error`)."""
    from airflow_mlops.exceptions import MLOpsInputError

    return MLOpsInputError(problem, fix=fix)


def normalize_task(task: str) -> str:
    """``task`` as one of :data:`TASKS` (``classification`` is read as ``binary``).

    :raises MLOpsArgumentError: an unknown task.
    """
    task = TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise _argument_error(f"task {task!r} is not known.", fix=f"use one of {', '.join(TASKS)}.")
    return task


def metrics_for(task: str) -> tuple[str, ...]:
    """The built-in metrics that fit ``task``, the default first."""
    task = normalize_task(task)
    default = DEFAULT_METRIC[task]
    return (default, *(n for n, m in METRICS.items() if task in m.tasks and n != default))


def check_metric(metric: str, task: str, *, field: str = "metric") -> Metric:
    """The :class:`Metric` named ``metric``, after checking that it fits ``task``.

    :param field: how the caller names the setting, for the message (e.g. ``promotion.metric``).
    :raises MLOpsArgumentError: an unknown metric, or one that does not fit the task.
    """
    task = normalize_task(task)
    known = metrics_for(task)
    if metric not in METRICS:
        raise _argument_error(
            f"{field} {metric!r} is not a known metric.",
            fix=f"for a {task} model use one of {', '.join(known)}.",
        )
    if task not in METRICS[metric].tasks:
        raise _argument_error(
            f"{field} {metric!r} does not fit a {task} model.",
            fix=f"use one of {', '.join(known)} (default {DEFAULT_METRIC[task]}).",
        )
    return METRICS[metric]


def decay(metric: str, holdout: float, window: float) -> float:
    """How much worse ``window`` is than ``holdout`` for ``metric`` (positive: worse).

    ``drop`` metrics: ``holdout - window``; ``rise_ratio`` metrics: ``window / holdout - 1`` (a holdout
    score of 0 gives ``inf`` for any rise).
    """
    spec = METRICS[metric]
    if spec.decay == "drop":
        return float(holdout) - float(window)
    if holdout == 0:
        return 0.0 if window == 0 else float("inf")
    return float(window) / float(holdout) - 1.0


# ------------------------------------------------------------------------------------------ labels
def _seen(values: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def check_labels(labels: Any, task: str, *, label: str, origin: str = "the training set") -> list[Any]:
    """Check that the non-missing ``labels`` (a pandas Series) fit ``task``; returns the classes, sorted
    (an empty list for regression).

    binary: exactly two distinct values; multiclass: three or more (strings allowed); regression: numbers.

    :raises MLOpsInputError: naming the label column, the values seen and the fix.
    """
    import pandas as pd

    task = normalize_task(task)
    present = labels.dropna()
    values = sorted(present.unique().tolist(), key=lambda v: (str(type(v)), v))
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(present) or pd.api.types.is_bool_dtype(present):
            raise _input_error(
                f"label column {label!r} of {origin} holds {present.dtype} values ({_seen(values)}), but a "
                "regression model needs numbers.",
                fix="use a numeric label, or set task: binary / multiclass for class labels.",
            )
        if len(values) < 2:
            raise _input_error(
                f"label column {label!r} of {origin} is constant ({_seen(values)}); there is nothing to learn.",
                fix="check how the label is computed and the data interval.",
            )
        return []
    if pd.api.types.is_float_dtype(present) and not all(float(v).is_integer() for v in values):
        raise _input_error(
            f"label column {label!r} of {origin} holds fractional numbers ({_seen(values)}); a {task} model "
            "needs class labels.",
            fix="set task: regression for a numeric target, or derive class labels.",
        )
    if task == "binary" and len(values) != 2:
        raise _input_error(
            f"label column {label!r} of {origin} has {len(values)} distinct values ({_seen(values)}); a "
            "binary model needs exactly two.",
            fix="set task: multiclass for three or more classes, or derive a two-valued label "
            "(e.g. a number above a threshold); with one class, widen the data interval.",
        )
    if task == "multiclass" and len(values) < 3:
        raise _input_error(
            f"label column {label!r} of {origin} has {len(values)} distinct values ({_seen(values)}); a "
            "multiclass model needs three or more.",
            fix="set task: binary for two classes, or widen the data interval so every class appears.",
        )
    return [v.item() if hasattr(v, "item") else v for v in values]


def encode_labels(labels: Any, classes: Sequence[Any]) -> Any:
    """Class labels as integer codes ``0..K-1`` in the order of ``classes`` (NumPy array)."""
    import numpy as np

    lookup = {c: i for i, c in enumerate(classes)}
    lookup.update({str(c): i for i, c in enumerate(classes)})
    codes = [lookup.get(v, lookup.get(str(v), -1)) for v in labels]
    if -1 in codes:
        unknown = sorted({str(v) for v, c in zip(labels, codes, strict=True) if c == -1})
        raise _input_error(
            f"labels {unknown[:8]} are not among the model's classes {list(classes)}.",
            fix="score the model on rows whose labels it was trained with.",
        )
    return np.asarray(codes, dtype=int)


# ------------------------------------------------------------------------------------------ scores
def scores(task: str, y_true: Any, prediction: Any, *, n_classes: int | None = None) -> dict[str, float]:
    """Every metric of ``task``.

    :param y_true: binary: 0/1; multiclass: class codes ``0..K-1``; regression: numbers.
    :param prediction: binary: P(class 1) per row; multiclass: an ``(n, K)`` matrix of class
        probabilities; regression: the predicted values.
    :param n_classes: K for multiclass (default: the prediction matrix's width).
    """
    import numpy as np
    from sklearn import metrics

    task = normalize_task(task)
    y = np.asarray(y_true)
    if task == "regression":
        p = np.asarray(prediction, dtype=float)
        return {
            "rmse": float(np.sqrt(metrics.mean_squared_error(y, p))),
            "mae": float(metrics.mean_absolute_error(y, p)),
            "r2": float(metrics.r2_score(y, p)) if len(y) > 1 else float("nan"),
        }
    if task == "binary":
        p = np.clip(np.asarray(prediction, dtype=float), 1e-15, 1 - 1e-15)
        y = y.astype(int)
        predicted = (p >= 0.5).astype(int)
        return {
            "auc": float(metrics.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
            "logloss": float(metrics.log_loss(y, p, labels=[0, 1])),
            "accuracy": float(metrics.accuracy_score(y, predicted)),
            "macro_f1": float(
                metrics.f1_score(y, predicted, average="macro", labels=[0, 1], zero_division=0)
            ),
        }
    proba = np.asarray(prediction, dtype=float)
    k = n_classes or proba.shape[1]
    proba = np.clip(proba, 1e-15, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    y = y.astype(int)
    predicted = proba.argmax(axis=1)
    labels = list(range(k))
    return {
        "macro_f1": float(metrics.f1_score(y, predicted, average="macro", labels=labels, zero_division=0)),
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "logloss": float(metrics.log_loss(y, proba, labels=labels)),
    }
