"""A Ray worker killed mid-trial during a Ray Tune search.

The search runs as a task would run it: :class:`~airflow_mlops.operators.tuning.RayTuneOperator` in a
process of its own with its local Ray (one CPU, trials one at a time, the ``sleep`` trainable). Once a
trial has finished and the next one runs, the Ray worker process running that trial (``ray::...``) is
killed with SIGKILL: the raylet, the driver and the other trials live on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlops_testing import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SAMPLES = 4
RESULT = "@@result "


def _trial_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray worker processes running a trial (Ray titles them ``ray::<actor>.train``)."""
    found = []
    for process in root.children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and "IDLE" not in title and ("train" in title or "Trainable" in title):
            found.append(process)
    return found


def test_ray_worker_killed_mid_trial(flights_training_set, tmp_path, fault):
    """kill -9 the Ray worker running a trial, mid-trial.

    The trial is run again on a new worker and the search completes every sampled trial (none lost to
    the dead worker); the task succeeds with the best of all of them.
    """
    arguments = dict(
        task_id="tune",
        training_data_uri=str(flights_training_set["manifest"]),
        trainable="sleep",
        search_space={"seconds": 4.0, "score": {"uniform": [0.0, 1.0]}},
        metric="score",
        mode="max",
        num_samples=SAMPLES,
        max_concurrent_trials=1,
        scheduler="fifo",
        seed=11,
        progress_interval=1,
    )
    code = f"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from types import SimpleNamespace
from airflow_mlops.operators.tuning import RayTuneOperator
result = RayTuneOperator(**{arguments!r}).execute(
    {{"ti": SimpleNamespace(dag_id="faults_ray", run_id="r1", task_id="tune", try_number=1)}})
print({RESULT!r} + json.dumps(result, default=str), flush=True)
"""
    env = {**os.environ, "AIRFLOW__MLOPS__RAY_NUM_CPUS": "1", "AIRFLOW__MLOPS__STATE_DIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "search.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    killed: list[str] = []
    try:
        root = psutil.Process(process.pid)
        deadline = time.monotonic() + 240
        while not killed:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial ran:\n" + log_path.read_text()[-3000:]
            finished = log_path.read_text().count(" finished")
            workers = _trial_workers(root)
            if finished >= 1 and workers:
                time.sleep(1.5)  # mid-trial: each trial sleeps 4 s
                for worker in _trial_workers(root):
                    killed.append(" ".join(worker.cmdline()))
                    worker.send_signal(signal.SIGKILL)
            time.sleep(0.3)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    output = log_path.read_text()
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    result = json.loads(lines[-1][len(RESULT) :]) if lines else None
    counts = (result or {}).get("counts", {})
    completed = counts.get("completed", 0)
    fault(
        lost=SAMPLES - completed,
        unit="trials",
        detail=f"killed {killed[0][:40]!r}; task {'succeeded' if result else 'failed'}; counts {counts}",
    )
    assert result is not None, output[-3000:]
    assert completed == SAMPLES, f"{SAMPLES - completed} trial(s) lost to the killed worker: {counts}"
