"""The reference train DAG run through Airflow for real: a point-in-time training set from Feast, a Ray
Tune search, registration, the promotion gate on a later holdout, the drift baseline, a Bento build and
a blue/green deploy, then real flights sent to the live endpoint."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import psutil
import pytest
from mlops_testing import flights_dag

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.operators.features import FeastMaterializeOperator
from airflow_mlops.operators.serving import LocalDeploymentTarget

MODEL = "flight_delay"


@pytest.fixture
def trained(feast_env, airflow_db, ray_cluster, monkeypatch, task_context):
    # Tune runs on the session's Ray (as the tuning tests do): a local Ray started and shut down inside
    # this pytest process would leave Tune's driver state stale for the tests that come after.
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(feast_env.settings.state_dir))
    FeastMaterializeOperator(
        task_id="materialize",
        repo_path=str(feast_env.repo),
        start="2013-04-01T00:00:00+00:00",
        end="2013-04-15T00:00:00+00:00",
    ).execute(task_context("materialize"))
    dag = flights_dag("flights_train", {"serving": {"port": 3911}})
    dag_run = dag.test(
        logical_date=datetime(2013, 4, 15, tzinfo=UTC),
        run_conf={"train_start": "2013-03-01", "holdout_start": "2013-04-01", "holdout_end": "2013-04-15"},
    )
    target = LocalDeploymentTarget(BentoMLHook())
    state = target.read_state(MODEL)
    try:
        yield dag_run, state
    finally:
        pids = [(state.get(k) or {}).get("pid") for k in ("router", "active", "pending")]
        target.teardown(MODEL)
        leftovers = [p for p in pids if p and psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not leftovers, f"processes left running: {leftovers}"


def _xcom(dag_run, task_id: str):
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id).xcom_pull(
        task_ids=task_id
    )


def test_the_train_dag_takes_a_model_from_features_to_a_live_endpoint(trained):
    dag_run, state = trained
    assert dag_run.state == "success", {ti.task_id: ti.state for ti in dag_run.get_task_instances()}

    training = _xcom(dag_run, "training_set")
    holdout = _xcom(dag_run, "holdout_set")
    assert training["time_range"]["end"] < holdout["time_range"]["start"]
    tune = _xcom(dag_run, "tune")
    assert tune["counts"]["trials"] == 8 and 0.6 < tune["best_metric"] < 1

    index = BentoMLHook().read_index(MODEL)
    version = _xcom(dag_run, "register")["version"]
    promotion = _xcom(dag_run, "promote")
    assert promotion["promoted"], promotion["reason"]  # first model: the floor (AUC 0.6) alone decides
    assert index["production"] == version
    assert index["versions"][version]["training_manifest"]["uri"] == training["manifest_uri"]

    sample = _xcom(dag_run, "sample_predictions")
    assert sample["requests"] == 20 and sample["versions"] == [version]
    probabilities = [a["probability"] for a in sample["answers"]]
    assert all(0 <= p <= 1 for p in probabilities) and len(set(probabilities)) > 1

    live = httpx.post(
        state["router"]["url"] + "/predict", json={"row": sample["answers"][0]["row"]}, timeout=30
    )
    assert live.status_code == 200 and live.json()["model_version"] == version
