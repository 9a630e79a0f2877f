"""RayTuneOperator on a real Ray cluster (``ray start --head`` + a worker node on 127.0.0.1): the search
is submitted as a Ray Job, the deferred task waits on :class:`RayJobTrigger`, and the result comes
back from the artifact store; ``on_kill`` stops the job."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime

import pytest

from airflow_mlops.artifacts import ArtifactStore, as_path

pytestmark = pytest.mark.integration


def test_deferred_search_on_the_cluster_through_airflow(
    run_test_dag, ray_cluster, flights_training_set, monkeypatch
):
    from airflow.sdk import DAG

    from airflow_mlops.hooks.ray import RayHook
    from airflow_mlops.operators.tuning import RayTuneOperator

    for key, value in ray_cluster.conn_uri_env.items():
        monkeypatch.setenv(key, value)
    with DAG("tune_cluster_it", schedule=None, start_date=datetime(2013, 1, 1, tzinfo=UTC)) as dag:
        RayTuneOperator(
            task_id="tune",
            training_data_uri=str(flights_training_set["manifest"]),
            trainable="random_forest_classifier",
            search_space={
                "n_estimators": 30,
                "max_depth": {"choice": [4, 8, 12]},
                "min_samples_leaf": {"randint": [1, 20]},
            },
            metric="auc",
            num_samples=3,
            seed=2,
            ray_conn_id="ray_cluster",
            deferrable=True,
            poll_interval=1,
        )
    dag_run = run_test_dag(dag, datetime(2013, 4, 1, tzinfo=UTC))
    assert dag_run.state == "success"

    out = ArtifactStore().run_path("tune_cluster_it", dag_run.run_id, "tune", "tuning")
    result = json.loads((out / "result.json").read_bytes())
    assert result["counts"] == {
        "trials": 3,
        "completed": 3,
        "stopped_early": 0,
        "errored": 0,
        "finished_before_resume": 0,
    }
    assert 0.55 < result["best_metric"] < 0.9
    assert hashlib.sha256(as_path(result["model_uri"]).read_bytes()).hexdigest() == result["model_sha256"]

    # it ran as a Ray Job on the cluster, and the job is done
    spec = json.loads((out / "spec.json").read_bytes())
    assert spec["output_uri"] == str(out)
    hook = RayHook("ray_cluster")
    jobs = [j for j in hook.job_client.list_jobs() if (j.metadata or {}).get("run_id") == dag_run.run_id]
    assert len(jobs) == 1 and str(jobs[0].status) in ("SUCCEEDED", "JobStatus.SUCCEEDED")
    assert "Best trial" in hook.get_job_logs(jobs[0].submission_id)


def test_on_kill_stops_the_job(ray_cluster, monkeypatch):
    from airflow_mlops.operators.tuning import RayTuneOperator

    for key, value in ray_cluster.conn_uri_env.items():
        monkeypatch.setenv(key, value)
    op = RayTuneOperator(
        task_id="tune",
        training_data_uri="x",
        trainable="sleep",
        search_space={"seconds": 1},
        metric="score",
        mode="max",
        ray_conn_id="ray_cluster",
    )
    op._job_id = op.hook.submit_job("python -c 'import time; time.sleep(120)'")
    deadline = time.monotonic() + 60
    while op.hook.get_job_status(op._job_id) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    op.on_kill()
    while (
        op.hook.get_job_status(op._job_id) not in ("STOPPED", "FAILED", "SUCCEEDED")
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert op.hook.get_job_status(op._job_id) == "STOPPED"
