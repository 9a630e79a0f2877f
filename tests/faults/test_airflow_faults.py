"""Kill -9 each Airflow component (and a running task's process) while a DAG run is in flight.

One stack for the module (:func:`airflow_procs.airflow_components`, the demo's
:class:`~airflow_mlops.demo.stack.AirflowStack` on PostgreSQL). Each test kills a component and starts it
again at once (:meth:`~airflow_mlops.demo.stack.AirflowStack.restart`), as a service manager would. The DAGs are ``tests/faults/dags/fault_dags.py``, copied to a folder of the module's own:
each run appends one row ``<run> <try>`` to a file when its work is done, so "nothing lost" is checked as
"exactly one row for the run" and "the run succeeded".

The scheduler's detection of orphaned tasks is shortened (orphans checked every 10 s, a scheduler dead after
Airflow's default 30 s without heartbeat; a task without heartbeat for 90 s, longer than an API server restart takes) so
a run whose task died with the scheduler is retried within the test's time, as it would be, later, with
the defaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from system.airflow_procs import AirflowComponents, airflow_components

from airflow_mlops.demo.stack import exit_code

pytestmark = [pytest.mark.faults, pytest.mark.system]

HERE = Path(__file__).resolve().parent
DAG_IDS = ["fault_work", "fault_deferred"]
#: the DAG file added after the DAG processor was killed
LATE_DAG = """
import os
from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, catchup=False, tags=["faults"])
def fault_late():
    @task
    def work() -> str:
        context = get_current_context()
        with open(os.path.join(os.environ["FAULTS_MARKERS"], "rows.txt"), "a") as rows:
            rows.write(f"{context['run_id']} {context['ti'].try_number}\\n")
        return "done"

    work()


fault_late()
"""


class Stack:
    def __init__(self, components: AirflowComponents, markers: Path, dags: Path) -> None:
        self.components, self.markers, self.dags = components, markers, dags

    @property
    def stack(self):
        return self.components.stack

    def call(self, fn, *args, **kwargs):
        """A REST call that waits for the API server while it is down (it is started again by the stack)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return fn(*args, **kwargs)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def trigger(self, dag_id: str, run_id: str, **conf) -> None:
        self.call(self.components.client.trigger, dag_id, run_id=run_id, conf=conf)

    def state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.call(self.components.task_states, dag_id, run_id).get(task_id)

    def wait_state(
        self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float = 120
    ) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.state(dag_id, run_id, task_id)) not in states:
            assert time.monotonic() < deadline, (
                f"{task_id} of {run_id} is {seen}, not {states}\n{self.stack.log_tails()}"
            )
            time.sleep(0.5)

    def finished(self, dag_id: str, run_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.call(self.components.run, dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            assert time.monotonic() < deadline, f"{run_id} still {run['state']}\n{self.stack.log_tails()}"
            time.sleep(1)

    def rows(self, run_id: str) -> list[int]:
        """The tries of ``run_id`` that finished their work."""
        path = self.markers / "rows.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [int(line.split()[1]) for line in lines if line.split()[0] == run_id]

    def kill(self, component: str) -> int:
        """kill -9 the component's main process, then start it again (what a service manager does)."""
        pid = self.stack.processes[component].pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while exit_code(self.stack.processes[component]) is None:  # dead, not reaped: restart() reaps it
            assert time.monotonic() < deadline, f"{component} survived SIGKILL"
            time.sleep(0.1)
        self.stack.restart(component)
        return pid


@pytest.fixture(scope="module")
def airflow(airflow_pg_db, tmp_path_factory) -> Iterator[Stack]:
    dags = tmp_path_factory.mktemp("fault-dags")
    shutil.copy(HERE / "dags" / "fault_dags.py", dags / "fault_dags.py")
    markers = tmp_path_factory.mktemp("fault-markers")
    env = {
        "FAULTS_MARKERS": str(markers),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "90",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
        # Airflow's default: a scheduler whose own heartbeat is late by more than this marks itself dead and
        # resets its own running tasks (with 10 s, a loop slowed by a loaded CI machine did, and the reset
        # try finished its work beside the retry: tries 2 and 3 both did it)
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
        # a new DAG file is found within 5 s
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # a task's calls to the Execution API wait out an API server's restart: Airflow's default of 5
        # retries (backoff from 1 s) gives up after ~30 s, and a restart on a loaded 2-core machine took
        # longer: the finished try's success was never recorded and a retry did the work again (docs/faults.md)
        "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "10",
    }
    with airflow_components(
        airflow_pg_db, tmp_path_factory.mktemp("fault-airflow-logs"), DAG_IDS, dags_folder=dags, **env
    ) as components:
        yield Stack(components, markers, dags)


def _task_logs(dag_id: str, run_id: str) -> str:
    """The tail of every try's log of the run (read from the files: the REST API shows one try)."""
    folder = Path(os.environ["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    parts = []
    for path in sorted(folder.glob("task_id=*/attempt=*.log")):
        lines = path.read_text(errors="replace").splitlines()
        parts.append(f"--- {path.relative_to(folder)}\n" + "\n".join(line[:300] for line in lines[-25:]))
    return "\n".join(parts) or f"(no task log under {folder})"


def _outcome(fault, airflow: Stack, dag_id: str, run_id: str, what: str) -> dict:
    run = airflow.finished(dag_id, run_id)
    tries = airflow.rows(run_id)
    lost = 0 if run["state"] == "success" and len(tries) == 1 else 1
    fault(lost=lost, unit="runs", detail=f"run {run['state']}, {what}; work done by tries {tries}")
    assert run["state"] == "success", _task_logs(dag_id, run_id)
    assert len(tries) == 1, f"the run's work was done {len(tries)} times: {tries}\n" + _task_logs(
        dag_id, run_id
    )
    return run


def test_scheduler_killed_while_a_task_runs(airflow, fault):
    """kill -9 the scheduler while a task runs.

    It is started again, after what the dead scheduler had started is stopped (its session: executor
    workers and task processes); the new scheduler retries the orphaned task: the run succeeds, its work
    done once, by the retry (not also by the killed try, still running beside it).
    """
    run_id = "scheduler_killed"
    airflow.trigger("fault_work", run_id, seconds=15)
    airflow.wait_state("fault_work", run_id, "work", {"running"})
    time.sleep(2)
    airflow.kill("scheduler")
    _outcome(fault, airflow, "fault_work", run_id, "scheduler restarted")


def test_task_process_killed(airflow, fault):
    """kill -9 a running task's process.

    Its supervisor reports the try failed; a retry succeeds: the run succeeds, its work done once, by a retry
    (try 2; once, on the machine loaded by two other test runs and a demo, try 2 failed too and try 3 did it).
    """
    run_id = "task_killed"
    airflow.trigger("fault_work", run_id, seconds=20)
    pid_file = airflow.markers / f"{run_id}.pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert time.monotonic() < deadline, airflow.stack.log_tails()
        time.sleep(0.5)
    time.sleep(1)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    _outcome(fault, airflow, "fault_work", run_id, "task process killed")
    tries = airflow.rows(run_id)
    assert len(tries) == 1 and tries[0] >= 2, f"work done by tries {tries}: once, by a retry, was expected"


def test_api_server_killed_while_a_task_runs(airflow, fault):
    """kill -9 the API server (the tasks' Execution API) while a task runs.

    It is started again on the same port; the task's calls wait for it: the run succeeds, its work
    done once.
    """
    run_id = "api_server_killed"
    airflow.trigger("fault_work", run_id, seconds=10)
    airflow.wait_state("fault_work", run_id, "work", {"running"})
    airflow.kill("api-server")
    _outcome(fault, airflow, "fault_work", run_id, "API server restarted")


def test_triggerer_killed_while_a_task_is_deferred(airflow, fault):
    """kill -9 the triggerer while a sensor is deferred to it.

    The restarted triggerer takes the trigger over: the sensor resumes, the run succeeds, its work done once.
    """
    run_id = "triggerer_killed"
    airflow.trigger("fault_deferred", run_id)
    airflow.wait_state("fault_deferred", run_id, "wait", {"deferred"})
    time.sleep(2)
    airflow.kill("triggerer")
    _outcome(fault, airflow, "fault_deferred", run_id, "triggerer restarted")


def test_dag_processor_killed_then_a_new_dag_file(airflow, fault):
    """kill -9 the DAG processor, then add a DAG file.

    The restarted processor parses the new file: its DAG is served and its run succeeds, its work done once.
    """
    airflow.kill("dag-processor")
    (airflow.dags / "fault_late.py").write_text(LATE_DAG)
    client = airflow.components.client
    deadline = time.monotonic() + 120
    while not airflow.call(client.dag, "fault_late"):
        assert time.monotonic() < deadline, airflow.stack.log_tails()
        time.sleep(1)
    airflow.call(client.unpause, "fault_late")
    run_id = "dag_processor_killed"
    airflow.trigger("fault_late", run_id, seconds=1)
    _outcome(fault, airflow, "fault_late", run_id, "DAG processor restarted, new file parsed")
