"""The demo stack stops what is left of an exited component with ``os.killpg`` on the component's pid. That
is safe only while the component is not reaped: a reaped pid (and so the group id) may go to another
process. ``exit_code`` sees the exit without reaping; the stack reaps only after its ``killpg``."""

from __future__ import annotations

import subprocess
import time

import psutil

from airflow_mlops.demo.stack import AirflowStack, exit_code


def _wait_exit(process: subprocess.Popen) -> int:
    deadline = time.monotonic() + 10
    while (code := exit_code(process)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return code


def test_an_exited_component_is_seen_without_being_reaped():
    process = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    assert _wait_exit(process) == 3
    # still held: the pid (and the group id) cannot have been given to another process
    assert psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
    assert process.wait() == 3


def test_supervise_stops_the_leftovers_of_an_exited_component_then_reaps_and_restarts_it(tmp_path):
    said: list[str] = []
    stack = AirflowStack(home=tmp_path, logs=tmp_path, announce=said.append)
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 120 & echo $! > left.pid; exit 3"], cwd=tmp_path, start_new_session=True
    )
    _wait_exit(leader)
    leftover = psutil.Process(int((tmp_path / "left.pid").read_text()))
    launched: list[str] = []
    stack._launch = launched.append  # type: ignore[method-assign]
    stack.processes["scheduler"], stack._running = leader, True
    stack.supervise()
    assert launched == ["scheduler"] and "exited with code 3" in said[0]
    assert leader.returncode == 3, "reaped after the group was stopped"
    leftover.wait(timeout=10)
    assert not leftover.is_running()
