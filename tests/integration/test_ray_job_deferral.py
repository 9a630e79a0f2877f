"""A RayTuneOperator's job on a real Ray cluster (``ray start --head`` on 127.0.0.1) when the task is
cleared while deferred, or retried while its job still runs: the trigger's ``on_kill`` stops the job, and
a try never submits a second job into the same tune state (it stops the earlier try's job first, or waits
for its own job when it is already there)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_mlops.hooks.ray import TERMINAL_JOB_STATES
from airflow_mlops.operators.tuning import RayTuneOperator, job_prefix

pytestmark = pytest.mark.integration

#: a job that runs until it is stopped (the search's part that matters here: it holds the tune state)
SLEEP = "python -c 'import time; time.sleep(600)'"


@pytest.fixture
def cluster(ray_cluster, monkeypatch):
    for key, value in ray_cluster.conn_uri_env.items():
        monkeypatch.setenv(key, value)
    return ray_cluster


def _op() -> RayTuneOperator:
    return RayTuneOperator(
        task_id="tune",
        training_data_uri="x",
        trainable="random_forest_classifier",
        search_space={"n_estimators": 10},
        ray_conn_id="ray_cluster",
        deferrable=True,
        poll_interval=1,
    )


def _context(run_id: str, try_number: int) -> dict:
    return {
        "ti": SimpleNamespace(
            dag_id="deferral_it", run_id=run_id, task_id="tune", map_index=-1, try_number=try_number
        )
    }


def _defer(op: RayTuneOperator, run_id: str, try_number: int) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        op._start_job(_context(run_id, try_number), SLEEP, "file:///nonexistent/result.json")
    return deferred.value


def _until(hook, job_id: str, states: tuple[str, ...], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (status := hook.get_job_status(job_id)) not in states and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def _running(hook, run_id: str) -> dict[str, str]:
    jobs = hook.jobs_with_prefix(job_prefix("deferral_it", run_id, "tune", -1))
    return {j: s for j, s in jobs.items() if s not in TERMINAL_JOB_STATES}


def test_clearing_the_deferred_task_stops_its_job(cluster):
    op = _op()
    deferred = _defer(op, "cleared", 1)
    trigger, job_id = deferred.trigger, deferred.kwargs["job_id"]
    assert trigger.job_id == job_id
    assert _until(op.hook, job_id, ("RUNNING",)) == "RUNNING"

    # the user clears the task: Airflow 3.3 cancels the trigger and calls its on_kill (not the operator's)
    async def cleared():
        waiting = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(1)
        waiting.cancel()
        await trigger.on_kill()

    asyncio.run(cleared())
    assert _until(op.hook, job_id, TERMINAL_JOB_STATES) == "STOPPED"


def test_a_retry_stops_the_earlier_try_s_job_before_submitting_its_own(cluster):
    first = _op()
    job_1 = _defer(first, "retried", 1).kwargs["job_id"]
    assert _until(first.hook, job_1, ("RUNNING",)) == "RUNNING"
    # the worker of try 1 died (or its trigger could not reach the cluster): the job runs on; try 2 starts
    second = _op()
    job_2 = _defer(second, "retried", 2).kwargs["job_id"]
    try:
        assert job_2 != job_1
        assert second.hook.get_job_status(job_1) == "STOPPED"  # stopped before job 2 was submitted
        assert set(_running(second.hook, "retried")) <= {job_2}

        # the same try executed again (its worker lost it after submitting): it waits for its own job
        again = _defer(_op(), "retried", 2)
        assert again.kwargs["job_id"] == job_2
        jobs = second.hook.jobs_with_prefix(job_prefix("deferral_it", "retried", "tune", -1))
        assert sorted(jobs) == sorted([job_1, job_2])  # no third job
    finally:
        second.hook.stop_job(job_2, wait=60)
