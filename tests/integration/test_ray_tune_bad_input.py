"""Bad input to RayTuneOperator fails before any trial starts, with a message naming the problem."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from airflow_mlops.artifacts import ArtifactStore
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError, RayClusterError
from airflow_mlops.operators.tuning import RayTuneOperator

pytestmark = pytest.mark.integration
SPACE = {"learning_rate": {"loguniform": [0.01, 0.3]}, "max_iter": 20}


def _run(task_id: str, **kwargs):
    arguments = {
        "training_data_uri": "",
        "trainable": "hist_gradient_boosting_classifier",
        "search_space": SPACE,
        "metric": "auc",
        "num_samples": 2,
        **kwargs,
    }
    op = RayTuneOperator(task_id=task_id, **arguments)
    context = {"ti": SimpleNamespace(dag_id="tune_bad_input", run_id="r1", task_id=task_id, try_number=1)}
    try:
        op.execute(context)
    finally:
        # no trial ever started: Tune never created its state folder
        assert (
            not ArtifactStore()
            .run_path("tune_bad_input", "r1", task_id, "tuning")
            .joinpath("tune_state")
            .exists()
        )


@pytest.fixture(scope="module")
def frame(flights_training_set) -> pd.DataFrame:
    return pd.read_parquet(flights_training_set["classification"])


def test_unknown_trainable_module(flights_training_set):
    with pytest.raises(
        MLOpsArgumentError, match=r"trainable 'no_such_pkg.train': module 'no_such_pkg' cannot be imported"
    ):
        _run("t1", training_data_uri=str(flights_training_set["manifest"]), trainable="no_such_pkg.train")


def test_unknown_trainable_function(flights_training_set):
    with pytest.raises(MLOpsArgumentError, match=r"has no function 'gradient_magic'"):
        _run(
            "t2",
            training_data_uri=str(flights_training_set["manifest"]),
            trainable="airflow_mlops.ml.trainables.gradient_magic",
        )


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": {"loguniform": [0, 0.3]}}, r"parameter 'learning_rate': loguniform needs low > 0"),
        ({"max_leaf_nodes": {"randint": [64, 8]}}, r"parameter 'max_leaf_nodes': randint needs low < high"),
        ({"learning_rate": {"logunifrom": [0.01, 0.3]}}, r"unknown distribution 'logunifrom'"),
        ("learning_rate: [unclosed", r"search_space is neither JSON nor YAML"),
    ],
)
def test_malformed_search_space(flights_training_set, space, message):
    with pytest.raises(MLOpsArgumentError, match=message):
        _run("t3", training_data_uri=str(flights_training_set["manifest"]), search_space=space)


def test_missing_label_column(flights_training_set):
    with pytest.raises(MLOpsInputError, match=r"label column 'is_late' is not in .*classification.parquet"):
        _run(
            "t4",
            training_data_uri=str(flights_training_set["classification"]),
            label="is_late",
            time_column="sched_dep_utc",
        )


def test_constant_label_column(frame, tmp_path):
    frame.assign(delayed=0).to_parquet(tmp_path / "constant.parquet")
    with pytest.raises(MLOpsInputError, match=r"label column 'delayed' is constant"):
        _run("t5", training_data_uri=str(tmp_path / "constant.parquet"), label="delayed")


def test_empty_training_set(frame, tmp_path):
    frame.head(0).to_parquet(tmp_path / "empty.parquet")
    manifest = {
        "data_uri": f"file://{tmp_path / 'empty.parquet'}",
        "label": "delayed",
        "event_timestamp_column": "sched_dep_utc",
        "feature_refs": [],
        "rows": 0,
    }
    (tmp_path / "empty.json").write_text(json.dumps(manifest))
    with pytest.raises(MLOpsInputError, match=r"training set .*empty.parquet' is empty \(0 rows\)"):
        _run("t6", training_data_uri=str(tmp_path / "empty.json"))


def test_metric_that_does_not_fit_the_task(flights_training_set):
    with pytest.raises(
        MLOpsArgumentError,
        match=r"metric 'rmse' does not fit a binary model\. Fix: use one of auc, accuracy, macro_f1, logloss",
    ):
        _run("t7", training_data_uri=str(flights_training_set["manifest"]), metric="rmse")


def test_auc_for_a_multiclass_label(tmp_path):
    from seattle_weather import write_training_set

    manifest = write_training_set(tmp_path, "weather", "2012-01-01", "2014-01-01")
    with pytest.raises(MLOpsArgumentError, match=r"metric 'auc' does not fit a multiclass model.*macro_f1"):
        _run("t10", training_data_uri=str(manifest))


def test_a_label_that_does_not_fit_the_given_task(flights_training_set):
    with pytest.raises(
        MLOpsInputError,
        match=r"label column 'delayed' of .* has 2 distinct values \(0, 1\); a multiclass model needs three",
    ):
        _run("t11", training_data_uri=str(flights_training_set["manifest"]), metric=None, task="multiclass")


def test_a_metric_the_trainable_does_not_report(flights_training_set):
    with pytest.raises(
        MLOpsArgumentError, match=r"metric 'r2' is not reported by trainable .*sleep' for a regression model"
    ):
        _run(
            "t12",
            training_data_uri=str(flights_training_set["manifest"]),
            trainable="sleep",
            metric="r2",
            task="regression",
        )


def test_manifest_whose_data_changed(frame, tmp_path, flights_training_set):
    manifest = json.loads(flights_training_set["manifest"].read_text())
    frame.head(100).to_parquet(tmp_path / "changed.parquet")
    manifest["data_uri"] = f"file://{tmp_path / 'changed.parquet'}"
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(MLOpsInputError, match=r"the file changed after the training set was built"):
        _run("t8", training_data_uri=str(tmp_path / "m.json"))


def test_unreachable_cluster(flights_training_set, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_DOWN", json.dumps({"conn_type": "ray", "host": "127.0.0.1", "port": port})
    )
    with pytest.raises(
        RayClusterError,
        match=rf"cannot reach the Ray cluster at http://127.0.0.1:{port} \(connection 'ray_down'\)",
    ):
        _run("t9", training_data_uri=str(flights_training_set["manifest"]), ray_conn_id="ray_down")
