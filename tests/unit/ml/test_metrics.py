"""Tasks, metrics and labels (ml/metrics.py) and the training set built on them (ml/dataset.py): a label
that does not fit its task is refused naming the column, the values and the fix; a metric that does not
fit the task is refused; scores agree with scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk

from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.ml.dataset import build_training_set, infer_task
from airflow_mlops.ml.metrics import (
    DEFAULT_METRIC,
    check_labels,
    check_metric,
    decay,
    encode_labels,
    metrics_for,
    normalize_task,
    scores,
)


def test_old_task_name_and_unknown_tasks():
    assert normalize_task("classification") == "binary"
    with pytest.raises(MLOpsArgumentError, match="task 'ranking' is not known"):
        normalize_task("ranking")


@pytest.mark.parametrize(
    ("values", "task", "message"),
    [
        ([0, 1, 2, 1], "binary", r"label column 'y' of .* has 3 distinct values \(0, 1, 2\); a binary model"),
        (
            ["a", "b", "a"],
            "multiclass",
            r"has 2 distinct values \('a', 'b'\); a multiclass model needs three",
        ),
        ([0.5, 1.25, 2.0], "multiclass", r"holds fractional numbers .*set task: regression"),
        (["low", "high", "mid"], "regression", r"holds object values .*a regression model needs numbers"),
        ([3.0, 3.0, 3.0], "regression", r"label column 'y' .* is constant"),
    ],
)
def test_a_label_that_does_not_fit_its_task_is_named_with_its_values(values, task, message):
    with pytest.raises(MLOpsInputError, match=message) as raised:
        check_labels(pd.Series(values), task, label="y")
    assert "Fix:" in str(raised.value)


def test_labels_that_fit_give_their_sorted_classes():
    assert check_labels(pd.Series([1, 0, 1, None]), "binary", label="y") == [0, 1]
    assert check_labels(pd.Series(["sun", "fog", "rain", "sun"]), "multiclass", label="y") == [
        "fog",
        "rain",
        "sun",
    ]
    assert check_labels(pd.Series([1.5, 2.5]), "regression", label="y") == []


def test_a_metric_that_does_not_fit_the_task_names_the_allowed_ones():
    with pytest.raises(MLOpsArgumentError, match=r"metric 'auc' does not fit a multiclass model") as raised:
        check_metric("auc", "multiclass")
    assert "macro_f1" in str(raised.value) and "logloss" in str(raised.value)
    with pytest.raises(MLOpsArgumentError, match=r"promotion.metric 'rmse' does not fit a binary model"):
        check_metric("rmse", "classification", field="promotion.metric")
    with pytest.raises(MLOpsArgumentError, match=r"'f2' is not a known metric"):
        check_metric("f2", "regression")
    assert check_metric("r2", "regression").mode == "max"
    assert metrics_for("multiclass")[0] == DEFAULT_METRIC["multiclass"] == "macro_f1"


def test_scores_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1)
    binary = scores("binary", y, p)
    assert binary["auc"] == pytest.approx(sk.roc_auc_score(y, p))
    assert binary["macro_f1"] == pytest.approx(sk.f1_score(y, p >= 0.5, average="macro"))

    codes = rng.integers(0, 3, 300)
    proba = rng.random((300, 3)) + np.eye(3)[codes]
    proba /= proba.sum(axis=1, keepdims=True)
    multi = scores("multiclass", codes, proba)
    assert multi["macro_f1"] == pytest.approx(sk.f1_score(codes, proba.argmax(axis=1), average="macro"))
    assert multi["logloss"] == pytest.approx(sk.log_loss(codes, proba))
    assert "auc" not in multi

    truth = rng.normal(size=100)
    reg = scores("regression", truth, truth + 0.5)
    assert reg["rmse"] == pytest.approx(0.5) and reg["mae"] == pytest.approx(0.5)


def test_decay_per_metric_direction():
    assert decay("auc", 0.80, 0.72) == pytest.approx(0.08)
    assert decay("rmse", 10.0, 12.0) == pytest.approx(0.2)
    assert decay("macro_f1", 0.6, 0.7) < 0


def test_encode_labels_refuses_a_class_the_model_does_not_know():
    assert encode_labels(["rain", "sun", "fog"], ["fog", "rain", "sun"]).tolist() == [1, 2, 0]
    with pytest.raises(MLOpsInputError, match=r"labels \['snow'\] are not among the model's classes"):
        encode_labels(["rain", "snow"], ["fog", "rain", "sun"])


# ------------------------------------------------------------------------------ the training set
def _frame(labels, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "t": pd.date_range("2014-01-01", periods=n, freq="D"),
            "x": rng.normal(size=n),
            "y": (list(labels) * n)[:n],
        }
    )


def test_multiclass_labels_become_codes_in_sorted_class_order():
    data = build_training_set(_frame(["sun", "rain", "fog"]), label="y", task="multiclass", time_column="t")
    assert data.task == "multiclass" and data.classes == ["fog", "rain", "sun"]
    assert data.y_train[:3].tolist() == [2, 1, 0]
    assert data.summary()["classes"] == ["fog", "rain", "sun"]


def test_binary_labels_are_zero_one_with_the_last_class_positive():
    data = build_training_set(_frame(["no", "yes"]), label="y", task="classification", time_column="t")
    assert data.task == "binary" and data.classes == ["no", "yes"]
    assert data.y_train[:4].tolist() == [0, 1, 0, 1]


def test_task_any_is_inferred_from_the_label():
    assert build_training_set(_frame([0, 1]), label="y", task="any").task == "binary"
    assert build_training_set(_frame(["a", "b", "c"]), label="y", task="any").task == "multiclass"
    numbers = _frame([0]).assign(y=np.linspace(0, 10, 60))
    assert build_training_set(numbers, label="y", task="any").task == "regression"
    # a classifier on a numeric target: the label check says why, not a silent regression
    assert infer_task(numbers["y"], ("binary", "multiclass")) == "multiclass"
    with pytest.raises(MLOpsInputError, match="holds fractional numbers"):
        build_training_set(numbers, label="y", task="any", allowed_tasks=("binary", "multiclass"))


def test_a_label_that_does_not_fit_names_the_column_and_the_values():
    with pytest.raises(
        MLOpsInputError, match=r"label column 'y' of .* has 3 distinct values \('a', 'b', 'c'\)"
    ):
        build_training_set(_frame(["a", "b", "c"]), label="y", task="binary", origin="days.parquet")


def test_a_validation_split_with_a_single_class_is_refused():
    frame = _frame(["a", "b", "c"]).assign(y=["a", "b", "c"] * 16 + ["c"] * 12)
    with pytest.raises(MLOpsInputError, match=r"validation set .* holds a single class of label 'y' \('c'\)"):
        build_training_set(frame, label="y", task="multiclass", time_column="t")
