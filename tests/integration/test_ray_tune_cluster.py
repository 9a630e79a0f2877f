"""RayTuneOperator on a real Ray cluster (``ray start --head`` + a worker node on 127.0.0.1): the search
is submitted as a Ray Job from a task of a real Airflow (API server, scheduler, dag-processor and
triggerer), the task defers to :class:`RayJobTrigger` in the triggerer, and the result comes back from the
artifact store; ``on_kill`` stops the job."""

from __future__ import annotations

import hashlib
import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from airflow_mlops.artifacts import ArtifactStore, as_path

pytestmark = pytest.mark.integration

DAG_FILE = """
from datetime import UTC, datetime

from airflow.sdk import DAG

from airflow_mlops.operators.tuning import RayTuneOperator

with DAG("tune_cluster_it", schedule=None, start_date=datetime(2013, 1, 1, tzinfo=UTC)):
    RayTuneOperator(
        task_id="tune",
        training_data_uri="{{{{ params.training_set }}}}",
        params={{"training_set": {manifest!r}}},
        trainable="random_forest_classifier",
        search_space={{
            "n_estimators": 30,
            "max_depth": {{"choice": [4, 8, 12]}},
            "min_samples_leaf": {{"randint": [1, 20]}},
        }},
        metric="auc",
        num_samples=3,
        seed=2,
        ray_conn_id="ray_cluster",
        deferrable=True,
        poll_interval=1,
    )
"""


def test_deferred_search_on_the_cluster_through_airflow_and_its_triggerer(
    airflow_pg_db, ray_cluster, flights_training_set, tmp_path, monkeypatch
):
    from airflow_mlops.demo.stack import AirflowStack
    from airflow_mlops.hooks.ray import RayHook

    for key, value in ray_cluster.conn_uri_env.items():
        monkeypatch.setenv(key, value)

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "tune_cluster_it.py").write_text(
        textwrap.dedent(DAG_FILE.format(manifest=str(flights_training_set["manifest"])))
    )
    stack = AirflowStack(
        home=Path(os.environ["AIRFLOW_HOME"]),
        database=airflow_pg_db,
        logs=tmp_path / "logs",
        dags_folder=dags,
        env=ray_cluster.conn_uri_env,
        parallelism=2,
    )
    states: list[str | None] = []
    with stack as api:
        api.wait("the DAG to be parsed", lambda: api.dag("tune_cluster_it"), 180)
        api.unpause("tune_cluster_it")
        run_id = api.trigger("tune_cluster_it", run_id="cluster")["dag_run_id"]

        def finished() -> dict | None:
            state = api.task_states("tune_cluster_it", run_id).get("tune")
            if not states or states[-1] != state:
                states.append(state)
            run = api.run("tune_cluster_it", run_id)
            return run if run["state"] in ("success", "failed") else None

        run = api.wait("the tuning run to finish", finished, timeout=600, interval=0.5)
        assert run["state"] == "success", api.failure_report("tune_cluster_it", run_id)
        task_log = api.task_log("tune_cluster_it", run_id, "tune", 1, lines=400)

    # the task gave up its worker slot while the job ran: it was deferred, then resumed and succeeded
    assert "deferred" in states, states
    assert states[-1] == "success"
    assert states.index("deferred") < len(states) - 1
    # the trigger's own lines, written by the triggerer into the task's log
    assert re.search(r"Ray Job \S+ is RUNNING", task_log), task_log
    assert re.search(r"Ray Job \S+ is SUCCEEDED", task_log), task_log

    out = ArtifactStore().run_path("tune_cluster_it", run_id, "tune", "tuning")
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
    jobs = [j for j in hook.job_client.list_jobs() if (j.metadata or {}).get("run_id") == run_id]
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
