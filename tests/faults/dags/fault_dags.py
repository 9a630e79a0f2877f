"""DAGs the Airflow fault cases run (tests/faults/test_airflow_faults.py), one small task each.

``fault_work``: ``work`` writes its process id to ``$FAULTS_MARKERS/<run>.pid`` (so a test can kill the task
process), sleeps ``conf["seconds"]`` and appends one row ``<run> <try>`` to ``$FAULTS_MARKERS/rows.txt``: a run
that succeeded once has exactly one row, whatever was killed meanwhile (two retries allowed).
``fault_deferred``: a ``TimeDeltaSensor`` deferred to the triggerer for 20 s, then the same row.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import dag, get_current_context, task

ARGS = {"retries": 2, "retry_delay": timedelta(seconds=2)}


def _markers() -> Path:
    folder = Path(os.environ["FAULTS_MARKERS"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _row() -> None:
    context = get_current_context()
    run_id, ti = context["run_id"], context["ti"]
    with open(_markers() / "rows.txt", "a") as rows:
        rows.write(f"{run_id} {ti.try_number}\n")


@dag(schedule=None, catchup=False, default_args=ARGS, tags=["faults"])
def fault_work():
    @task
    def work() -> str:
        context = get_current_context()
        seconds = float((context["dag_run"].conf or {}).get("seconds", 8))
        (_markers() / f"{context['run_id']}.pid").write_text(str(os.getpid()))
        time.sleep(seconds)
        _row()
        return "done"

    work()


@dag(schedule=None, catchup=False, default_args=ARGS, tags=["faults"])
def fault_deferred():
    @task
    def row() -> str:
        _row()
        return "done"

    TimeDeltaSensor(task_id="wait", delta=timedelta(seconds=20), deferrable=True) >> row()


fault_work()
fault_deferred()
