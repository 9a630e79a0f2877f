"""Servers and routers are stopped by the pid in the deployment's state file, which can outlive the process:
once it has exited, the system may give that pid to any other process. Before a signal is sent the process
is checked against the identity recorded when it started (start time and command line)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import psutil
import pytest

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.operators.serving import (
    LocalDeploymentTarget,
    identify,
    process_alive,
    start_detached,
    stop_tree,
)


@pytest.fixture
def bystander():
    """An unrelated process (think: someone's shell job) that got the pid a server had."""
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def _exited_server(tmp_path) -> dict:
    """The identity of a server process we started and which has exited since."""
    pid = start_detached([sys.executable, "-c", "import time; time.sleep(0.3)"], {}, tmp_path / "gone.log")
    identity = identify(pid)
    assert stop_tree(pid, timeout=5) or not psutil.pid_exists(pid)
    return identity


def test_a_deployment_whose_recorded_pids_were_reused_is_torn_down_without_killing_them(
    tmp_path, monkeypatch, bystander, caplog
):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    gone = _exited_server(tmp_path)
    target = LocalDeploymentTarget(BentoMLHook())
    recycled = {"pid": bystander.pid, "process": {**gone, "pid": bystander.pid}}
    with target.locked("m") as state:
        state["router"] = {**recycled, "url": "http://127.0.0.1:9", "port": 9}
        state["active"] = {**recycled, "url": "http://127.0.0.1:8", "version": "v1"}
    assert not process_alive(state["active"]), "another process with the pid is not the server"
    with caplog.at_level(logging.WARNING):
        target.teardown("m")
    time.sleep(0.2)
    assert bystander.poll() is None, "the unrelated process was killed"
    message = caplog.text
    assert f"Not stopping pid {bystander.pid}" in message and "now belongs to another process" in message
    assert "sleep 120" in message


def test_a_pid_recorded_without_its_identity_is_never_signalled(tmp_path, monkeypatch, bystander, caplog):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    target = LocalDeploymentTarget(BentoMLHook())
    with target.locked("m") as state:  # a state file written before identities were recorded
        state["active"] = {"pid": bystander.pid, "url": "http://127.0.0.1:8", "version": "v1"}
    with caplog.at_level(logging.WARNING):
        target.teardown("m")
    assert bystander.poll() is None
    assert "recorded without the identity of its process" in caplog.text


def test_the_recorded_process_itself_is_stopped_with_its_children_also_when_it_retitled_itself(tmp_path):
    # as bentoml serve's process manager (circus) does with setproctitle once it runs
    code = (
        "import setproctitle, subprocess, time; time.sleep(0.5); setproctitle.setproctitle('circusd-arbiter');"
        "subprocess.Popen(['sleep', '120']); time.sleep(120)"
    )
    pid = start_detached([sys.executable, "-c", code], dict(os.environ), tmp_path / "server.log")
    record = {"pid": pid, "process": identify(pid)}
    deadline = time.monotonic() + 10
    while not psutil.Process(pid).children() and time.monotonic() < deadline:  # once it has retitled
        time.sleep(0.05)
    children = psutil.Process(pid).children()
    assert psutil.Process(pid).cmdline() != record["process"]["cmdline"]
    assert children and process_alive(record)
    assert stop_tree(record, timeout=5)
    assert not process_alive(record)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
