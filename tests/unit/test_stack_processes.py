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


def test_restart_stops_the_leftovers_of_an_exited_component_then_reaps_and_starts_it(tmp_path):
    stack = AirflowStack(home=tmp_path, logs=tmp_path)
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 120 & echo $! > left.pid; exit 3"], cwd=tmp_path, start_new_session=True
    )
    _wait_exit(leader)
    leftover = psutil.Process(int((tmp_path / "left.pid").read_text()))
    launched: list[str] = []
    stack._launch = launched.append  # type: ignore[method-assign]
    stack.processes["scheduler"] = leader
    stack.restart("scheduler")
    assert launched == ["scheduler"]
    assert leader.returncode == 3, "reaped after the group was stopped"
    leftover.wait(timeout=10)
    assert not leftover.is_running()


def test_an_exited_component_fails_the_next_call_with_its_log_and_is_not_started_again(tmp_path):
    import pytest

    from airflow_mlops.demo.stack import AirflowStackError

    stack = AirflowStack(home=tmp_path, logs=tmp_path)
    (tmp_path / "scheduler.log").write_text("StaleDataError: UPDATE statement on table 'dag_run'\n")
    leader = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    _wait_exit(leader)
    launched: list[str] = []
    stack._launch = launched.append  # type: ignore[method-assign]
    stack.processes["scheduler"], stack._running = leader, True
    with pytest.raises(AirflowStackError, match="(?s)airflow scheduler exited with code 3.*StaleDataError"):
        stack.check_alive()
    assert launched == []
