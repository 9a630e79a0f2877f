"""RayTuneOperator on the session's Ray: a search through Airflow (``dag.test``), the model artifacts
and their hashes, and a killed search resumed without rerunning its completed trials."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_mlops.artifacts import ArtifactStore, as_path

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _read(uri: str) -> bytes:
    return as_path(uri).read_bytes()


def _trials(uri: str) -> list[dict]:
    return list(csv.DictReader(_read(uri).decode().splitlines()))


def test_lightgbm_search_through_airflow_returns_the_best_model(
    run_test_dag, ray_cluster, flights_training_set
):
    from airflow.sdk import DAG

    from airflow_mlops.operators.tuning import RayTuneOperator

    with DAG("tune_flights_it", schedule=None, start_date=datetime(2013, 1, 1, tzinfo=UTC)) as dag:
        RayTuneOperator(
            task_id="tune",
            training_data_uri="{{ params.training_set }}",
            params={"training_set": str(flights_training_set["manifest"])},
            trainable="lightgbm_classifier",
            search_space={
                "learning_rate": {"loguniform": [0.01, 0.3]},
                "num_leaves": {"randint": [4, 64]},
                "num_boost_round": 80,
                "report_every": 10,
            },
            metric="auc",
            num_samples=8,
            max_concurrent_trials=2,
            seed=11,
            progress_interval=2,
        )
    dag_run = run_test_dag(dag, datetime(2013, 4, 1, tzinfo=UTC))
    assert dag_run.state == "success"

    out = ArtifactStore().run_path("tune_flights_it", dag_run.run_id, "tune", "tuning")
    result = json.loads((out / "result.json").read_bytes())
    assert result["metric"] == "auc" and result["mode"] == "max"
    # 2,400 training flights predict a delay with an AUC well above chance on the later 600
    assert 0.6 < result["best_metric"] < 0.9
    assert result["training_set"]["train_rows"] == 2400 and result["training_set"]["valid_rows"] == 600
    assert "delayed" not in result["training_set"]["features"]
    counts = result["counts"]
    assert counts["trials"] == 8 and counts["errored"] == 0
    assert counts["completed"] + counts["stopped_early"] == 8
    assert counts["stopped_early"] >= 1, "ASHA stopped no trial"

    rows = _trials(result["trials_uri"])
    assert len(rows) == 8 and len({r["trial_id"] for r in rows}) == 8
    for row in rows:
        iterations, best_iteration = int(row["iterations"]), int(row["best_iteration"])
        assert 10 <= best_iteration <= iterations <= 80
        if row["status"] == "completed":
            # trained every round, or stopped 30 rounds (the default patience) after its best one
            assert iterations == 80 or iterations - best_iteration >= 30, row
        else:
            assert iterations < 80, row
    best = [r for r in rows if r["best"] == "1"]
    assert len(best) == 1 and float(best[0]["auc"]) == pytest.approx(result["best_metric"])
    assert float(best[0]["config.learning_rate"]) == pytest.approx(result["best_config"]["learning_rate"])
    assert _read(result["plot_uri"]).startswith(b"\x89PNG")

    # the model: LightGBM's text format, its sha256 recorded beside it, and it predicts
    import lightgbm as lgb
    import pandas as pd

    blob = _read(result["model_uri"])
    assert result["model_uri"].endswith("model.txt") and result["model_format"] == "lightgbm"
    assert hashlib.sha256(blob).hexdigest() == result["model_sha256"]
    assert _read(result["model_uri"] + ".sha256").decode().split()[0] == result["model_sha256"]
    meta = json.loads(_read(result["model_meta_uri"]))
    booster = lgb.Booster(model_str=blob.decode())
    frame = pd.read_parquet(flights_training_set["classification"])
    x = frame[meta["features"]].copy()
    for column, levels in meta["categorical"].items():
        x[column] = pd.Categorical(x[column], categories=levels)
    predictions = booster.predict(x)
    assert predictions.shape == (3000,) and ((predictions > 0) & (predictions < 1)).all()
    # the saved model is cut at the trial's best iteration, and has the reported validation AUC
    from sklearn.metrics import roc_auc_score

    assert booster.num_trees() == int(best[0]["best_iteration"]) == meta["iterations"]
    valid = frame.sort_values("sched_dep_utc", kind="stable").tail(600)
    assert roc_auc_score(valid["delayed"], booster.predict(x.loc[valid.index])) == pytest.approx(
        result["best_metric"], abs=1e-9
    )


def test_hist_gradient_boosting_regression_on_parquet_writes_a_skops_model(ray_cluster, flights_training_set):
    from airflow_mlops.operators.tuning import RayTuneOperator

    op = RayTuneOperator(
        task_id="tune",
        training_data_uri=str(flights_training_set["regression"]),
        label="arr_delay",
        time_column="sched_dep_utc",
        trainable="airflow_mlops.ml.trainables.hist_gradient_boosting_regressor",
        search_space='{"learning_rate": {"choice": [0.05, 0.2]}, "max_iter": 40, "report_every": 20}',
        metric="rmse",
        num_samples=2,
        scheduler="fifo",
    )
    context = {"ti": SimpleNamespace(dag_id="tune_hgb_it", run_id="r1", task_id="tune", try_number=1)}
    result = op.execute(context)
    assert result["mode"] == "min" and result["counts"]["completed"] == 2
    assert result["model_format"] == "skops" and result["model_uri"].endswith("model.skops")

    import numpy as np
    import pandas as pd
    import skops.io as sio

    path = as_path(result["model_uri"]).path
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == result["model_sha256"]
    untrusted = sio.get_untrusted_types(file=path)
    # only scikit-learn and numpy types (HGB keeps a partial of check_array): nothing that runs foreign code
    assert all(t.startswith(("sklearn.", "numpy.")) or t == "functools.partial" for t in untrusted), untrusted
    model = sio.load(path, trusted=untrusted)
    frame = pd.read_parquet(flights_training_set["regression"]).sort_values("sched_dep_utc").tail(600)
    rmse = float(
        np.sqrt(np.mean((model.predict(frame[result["training_set"]["features"]]) - frame["arr_delay"]) ** 2))
    )
    # the recorded metric is the one the saved model has on the time-based validation rows
    assert rmse == pytest.approx(result["best_metric"], rel=1e-6)


def test_a_killed_search_resumes_without_rerunning_completed_trials(ray_cluster, flights_training_set):
    from airflow_mlops.operators.tuning import RayTuneOperator

    arguments = dict(
        task_id="tune",
        training_data_uri=str(flights_training_set["manifest"]),
        trainable="sleep",
        search_space={"seconds": 1.5, "score": {"uniform": [0.0, 1.0]}},
        metric="score",
        mode="max",
        num_samples=10,
        max_concurrent_trials=1,
        scheduler="fifo",
        seed=5,
        progress_interval=1,
    )
    code = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from types import SimpleNamespace
from airflow_mlops.operators.tuning import RayTuneOperator
RayTuneOperator(**{arguments!r}).execute(
    {{"ti": SimpleNamespace(dag_id="tune_crash_it", run_id="r1", task_id="tune", try_number=1)}})
print("@@finished-without-kill")
"""
    env = {**os.environ, "AIRFLOW__MLOPS__RAY_NUM_CPUS": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    finished: list[str] = []
    output: list[str] = []
    deadline = time.monotonic() + 180
    try:
        for line in process.stdout:
            output.append(line)
            match = re.search(r"Trial (\w+) finished", line)
            if match:
                finished.append(match.group(1))
            if len(finished) >= 2 or time.monotonic() > deadline:
                break
        # Tune snapshots its state every 2 s: give it the time to record these two trials
        time.sleep(3)
        assert process.poll() is None, "the search ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the "worker" dies mid-search, with its local Ray
        process.wait(timeout=30)
    killed_at = time.time()
    assert len(finished) >= 2, "".join(output)[-3000:]
    assert "@@finished-without-kill" not in "".join(output)

    # Airflow retries the task: same run, same task, next try
    retry = {"ti": SimpleNamespace(dag_id="tune_crash_it", run_id="r1", task_id="tune", try_number=2)}
    result = RayTuneOperator(**arguments).execute(retry)
    assert result["resumed"] is True
    assert result["counts"]["trials"] == 10 and result["counts"]["completed"] == 10
    assert result["counts"]["finished_before_resume"] >= 2
    rows = {r["trial_id"]: r for r in _trials(result["trials_uri"])}
    assert len(rows) == 10
    for trial_id in finished:  # their one and only result is from before the kill
        assert int(rows[trial_id]["finished_at"]) <= killed_at, rows[trial_id]
    assert any(int(r["finished_at"]) >= killed_at - 1 for r in rows.values())


def test_multiclass_search_optimises_macro_f1_by_default(ray_cluster, flights_training_set, tmp_path):
    """Which New York airport a flight leaves from (EWR, JFK, LGA: string classes) from its carrier,
    destination and schedule: the classifier trains a multiclass model, the metric defaults to macro-F1
    (higher is better), the trial table names it, and the saved model answers an (n, 3) matrix whose
    macro-F1 on the validation rows is the reported one."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import f1_score

    from airflow_mlops.ml.model_io import load_model_dir
    from airflow_mlops.operators.tuning import RayTuneOperator

    features = ["carrier", "dest", "distance", "hour", "dow"]
    result = RayTuneOperator(
        task_id="tune",
        training_data_uri=str(flights_training_set["classification"]),
        label="origin",
        time_column="sched_dep_utc",
        trainable="lightgbm_classifier",
        search_space={"learning_rate": {"choice": [0.05, 0.2]}, "num_boost_round": 60, "report_every": 20},
        features=features,
        num_samples=2,
        scheduler="fifo",
        seed=3,
    ).execute({"ti": SimpleNamespace(dag_id="tune_origin_it", run_id="r1", task_id="tune", try_number=1)})
    assert (result["task"], result["metric"], result["mode"]) == ("multiclass", "macro_f1", "max")
    assert result["classes"] == ["EWR", "JFK", "LGA"]
    rows = _trials(result["trials_uri"])
    assert {(r["metric"], r["mode"]) for r in rows} == {("macro_f1", "max")}

    predictor = load_model_dir(Path(as_path(result["model_meta_uri"]).path).parent)
    assert predictor.task == "multiclass" and predictor.classes == result["classes"]
    frame = pd.read_parquet(flights_training_set["classification"])
    valid = frame.sort_values("sched_dep_utc", kind="stable").tail(result["training_set"]["valid_rows"])
    proba = predictor.predict(valid)
    assert proba.shape == (len(valid), 3) and np.allclose(proba.sum(axis=1), 1.0)
    codes = valid["origin"].map({c: i for i, c in enumerate(predictor.classes)})
    macro_f1 = f1_score(codes, proba.argmax(axis=1), average="macro", labels=range(3), zero_division=0)
    assert macro_f1 == pytest.approx(result["best_metric"], abs=1e-9)
    # destination and carrier say a lot about the airport: far better than always the commonest one
    majority = f1_score(codes, np.full(len(codes), codes.mode()[0]), average="macro", labels=range(3))
    assert result["best_metric"] > majority + 0.3


def test_regression_search_defaults_to_rmse(ray_cluster, flights_training_set):
    """A regressor without a metric optimises RMSE (lower is better); the saved model's RMSE on the
    validation rows is the reported one."""
    import numpy as np
    import pandas as pd

    from airflow_mlops.ml.model_io import load_model_dir
    from airflow_mlops.operators.tuning import RayTuneOperator

    result = RayTuneOperator(
        task_id="tune",
        training_data_uri=str(flights_training_set["regression"]),
        label="arr_delay",
        time_column="sched_dep_utc",
        trainable="lightgbm_regressor",
        search_space={"num_leaves": {"choice": [7, 31]}, "num_boost_round": 40, "report_every": 20},
        num_samples=2,
        scheduler="fifo",
    ).execute({"ti": SimpleNamespace(dag_id="tune_lgb_reg_it", run_id="r1", task_id="tune", try_number=1)})
    assert (result["task"], result["metric"], result["mode"]) == ("regression", "rmse", "min")
    assert result["classes"] == []
    predictor = load_model_dir(Path(as_path(result["model_meta_uri"]).path).parent)
    assert predictor.task == "regression"
    frame = pd.read_parquet(flights_training_set["regression"]).sort_values("sched_dep_utc", kind="stable")
    valid = frame.tail(result["training_set"]["valid_rows"])
    rmse = float(np.sqrt(np.mean((predictor.predict(valid) - valid["arr_delay"]) ** 2)))
    assert rmse == pytest.approx(result["best_metric"], rel=1e-9)
