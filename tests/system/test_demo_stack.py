"""System test: the demo's Airflow stack starts, runs a DAG over REST, and leaves nothing behind.

``airflow standalone`` starts on the session's ``AIRFLOW_HOME`` and a metadata database on the session's
PostgreSQL from a child process (as ``make demo`` runs it), with a DAGs folder of two tiny DAGs. The child triggers both over REST, reads a result
through XCom and the failure report of the failing one, then sleeps; the test sends it SIGINT (Ctrl-C),
and every process of the components' groups must be gone when it has exited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

DAGS = """
from datetime import datetime
from airflow.sdk import dag, task

@dag(schedule=None, start_date=datetime(2013, 1, 1))
def demo_stack_ok():
    @task
    def answer() -> dict:
        import sys

        # imported by the fork server the task process descends from (airflow_mlops.preload), not here
        return {"answer": 42, "preloaded": sorted({"great_expectations", "evidently", "feast"} & set(sys.modules))}
    answer()

@dag(schedule=None, start_date=datetime(2013, 1, 1))
def demo_stack_fails():
    @task
    def broken() -> None:
        raise ValueError("the batch is broken on purpose")
    broken()

demo_stack_ok()
demo_stack_fails()
"""

CHILD = """
import json, sys, time
from pathlib import Path
from airflow_mlops.demo.stack import AirflowRunFailed, AirflowStack

home, logs, dags = map(Path, sys.argv[1:4])
stack = AirflowStack(
    home=home, logs=logs, dags_folder=dags, parallelism=2, database=sys.argv[4], standalone=True, preload=True
)
with stack as api:
    api.wait("both DAGs", lambda: api.dag("demo_stack_ok") and api.dag("demo_stack_fails"), 180)
    for dag_id in ("demo_stack_ok", "demo_stack_fails"):
        api.unpause(dag_id)
    ok = api.trigger("demo_stack_ok", run_id="ok")
    bad = api.trigger("demo_stack_fails", run_id="bad")
    run = api.wait_run("demo_stack_ok", "ok", timeout=300)
    try:
        api.wait_run("demo_stack_fails", "bad", timeout=300)
        failure = None
    except AirflowRunFailed as err:
        failure = str(err)
    result = {
        "state": run["state"],
        "xcom": api.xcom("demo_stack_ok", "ok", "answer"),
        "states": api.task_states("demo_stack_ok", "ok"),
        "failure": failure,
        "groups": [p.pid for p in stack.processes.values()],
        "alive": len(stack.alive()),
    }
    print("RESULT " + json.dumps(result), flush=True)
    time.sleep(600)
"""


def _members(groups: list[int]) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def test_the_stack_runs_dags_over_rest_and_ctrl_c_stops_every_process(airflow_pg_db, tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "demo_stack_dags.py").write_text(textwrap.dedent(DAGS))
    logs = tmp_path / "logs"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, os.environ["AIRFLOW_HOME"], str(logs), str(dags), airflow_pg_db],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    result = None
    try:
        deadline = time.monotonic() + 600
        while result is None and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("RESULT "):
                result = json.loads(line.removeprefix("RESULT "))
        assert result is not None, "".join(output[-80:])
        assert result["state"] == "success"
        # the task started with the provider's heavy libraries imported (make demo's setting)
        assert result["xcom"] == {"answer": 42, "preloaded": ["evidently", "feast", "great_expectations"]}
        assert result["states"] == {"answer": "success"}
        assert "demo_stack_fails run bad failed" in result["failure"]
        assert "task broken failed" in result["failure"]
        assert "the batch is broken on purpose" in result["failure"]
        assert result["alive"] >= 5  # standalone and its four components, at least

        child.send_signal(signal.SIGINT)  # Ctrl-C
        assert child.wait(timeout=90) != 0
    finally:
        if child.poll() is None:
            child.kill()
    leftovers = _members(result["groups"])
    assert not leftovers, [(p.pid, p.name(), p.cmdline()[:3]) for p in leftovers]
    assert {p.name for p in logs.iterdir()} == {"standalone.log"}


def test_a_component_that_dies_fails_the_next_call_naming_it_and_nothing_restarts_it(airflow_pg_db, tmp_path):
    """``airflow standalone`` does not restart a component, and neither does the stack: the demo stops
    with the component's name and log instead of waiting for runs nobody schedules."""
    import psutil
    import pytest

    from airflow_mlops.demo.stack import AirflowStack, AirflowStackError

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "demo_stack_dags.py").write_text(textwrap.dedent(DAGS))
    stack = AirflowStack(
        home=Path(os.environ["AIRFLOW_HOME"]),
        logs=tmp_path / "logs",
        dags_folder=dags,
        database=airflow_pg_db,
        standalone=True,
    )
    with stack as api:
        api.wait("the DAG", lambda: api.dag("demo_stack_ok"), 180)
        (scheduler,) = [
            p
            for p in psutil.Process(stack.processes["standalone"].pid).children()
            if p.status() != psutil.STATUS_ZOMBIE and "scheduler" in p.cmdline()[1:3]
        ]
        scheduler.kill()  # standalone reaps it late: a zombie until then
        deadline = time.monotonic() + 30
        while scheduler.is_running() and scheduler.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the scheduler survived SIGKILL"
            time.sleep(0.2)
        with pytest.raises(
            AirflowStackError, match=r"airflow scheduler \(started by `airflow standalone`\) has exited"
        ):
            api.dag("demo_stack_ok")
        assert stack._standalone_missing() == ["scheduler"]  # nothing started it again
    assert not stack.alive()
