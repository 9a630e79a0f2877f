"""Real Airflow components for the system tests, run as subprocesses, and a REST client for them.

:func:`airflow_components` starts an ``api-server`` (the Execution API the tasks talk to, and the REST
API the tests drive), a ``dag-processor``, a ``scheduler`` and a ``triggerer`` on the session's
``AIRFLOW_HOME`` and SQLite database with the LocalExecutor (Airflow 3.3 supports that pair; it is what
``airflow standalone`` runs), waits until the given DAGs are served, and stops every process group
(executor workers and task processes included) when the block ends, failing if anything survives.

Reads that the REST API of Airflow 3.3.2 cannot answer reliably go to the metadata database directly
(read-only): ``GET /assets/events`` answers 500 while a run an event created is still queued (its
``start_date`` is None and the response model requires a datetime).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
#: folder of ``sqlite_busy_timeout.py`` (put on the components' PYTHONPATH) and of the watcher test DAGs
DRIFT_DAGS = Path(__file__).resolve().parent / "drift_dags"
COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AirflowComponents:
    """The running components: a REST client, their log files, the metadata database (read-only)."""

    api: httpx.Client
    logs: Path
    db: Path

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        assert response.status_code == 200, (path, response.status_code, response.text[:2000])
        return response.json()

    def post(self, path: str, body: dict) -> Any:
        response = self.api.post(path, json=body)
        assert response.status_code in (200, 201), (path, response.status_code, response.text[:2000])
        return response.json()

    def log_tails(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}"
            for log in sorted(self.logs.glob("*.log"))
        )

    def wait(
        self, what: str, probe: Callable[[], Any], timeout: float, detail: Callable[[], Any] = str
    ) -> Any:
        """Poll ``probe`` until it returns something truthy; fail with the components' logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f} s waiting for {what}: {detail()}\n{self.log_tails()}"
                )
            time.sleep(1)

    # ------------------------------------------------------------------ Airflow objects over REST
    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def finished_run(self, dag_id: str, run_id: str, timeout: float = 180) -> dict:
        def done() -> dict | None:
            run = self.run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        return self.wait(f"{dag_id} run {run_id} to finish", done, timeout)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")[
            "value"
        ]
        return json.loads(value) if isinstance(value, str) else value

    # ------------------------------------------------------------------ metadata database (read-only)
    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return db.execute(sql, args).fetchall()

    def asset_events(self, asset_name: str) -> list[dict]:
        """Every event of the Asset, oldest first, with its ``extra`` parsed."""
        rows = self.query(
            "SELECT e.id, e.extra, e.source_dag_id, e.source_run_id, e.timestamp FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id WHERE a.name = ? ORDER BY e.id",
            asset_name,
        )
        return [{**dict(row), "extra": json.loads(row["extra"] or "{}")} for row in rows]

    def asset_triggered_runs(self, dag_id: str) -> dict[str, list[dict]]:
        """The Asset-triggered runs of ``dag_id``, each with the Asset events that triggered it."""
        rows = self.query(
            "SELECT r.run_id, e.id, e.extra FROM dag_run r "
            "LEFT JOIN dagrun_asset_event link ON link.dag_run_id = r.id "
            "LEFT JOIN asset_event e ON e.id = link.event_id "
            "WHERE r.dag_id = ? AND r.run_type = 'asset_triggered' ORDER BY r.id, e.id",
            dag_id,
        )
        runs: dict[str, list[dict]] = {}
        for row in rows:
            events = runs.setdefault(row["run_id"], [])
            if row["id"] is not None:
                events.append({"id": row["id"], "extra": json.loads(row["extra"] or "{}")})
        return runs


def _start(name: str, args: list[str], env: Mapping[str, str], logs: Path) -> subprocess.Popen:
    with open(logs / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [AIRFLOW, *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each component's process group (its executor workers and task processes included),
    then SIGKILL what is left; fail if anything of theirs survives."""
    groups = [p.pid for p in processes]
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass

    def members() -> list[psutil.Process]:
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (ProcessLookupError, psutil.Error):
                pass
        return alive

    for _ in range(10):
        if not members():
            break
        time.sleep(0.5)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        process.wait(timeout=10)
    time.sleep(0.5)
    leftovers = members()
    assert not leftovers, f"Airflow processes left running: {[(p.pid, p.name()) for p in leftovers]}"


def component_env(port: int, **overrides: str) -> dict[str, str]:
    """The environment of every component: the session's environment, this API server's port, short
    parsing intervals, and ``overrides`` (e.g. ``AIRFLOW__CORE__DAGS_FOLDER``, ``AIRFLOW__MLOPS__*``)."""
    return {
        **os.environ,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": "drift-system-test-only",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "0",
        # a longer SQLite busy timeout: five processes write to one database file on a loaded machine
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "sqlite_busy_timeout.CONNECT_ARGS",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(DRIFT_DAGS), os.environ.get("PYTHONPATH")])),
        # the components' log servers, on ports of their own (the defaults may be taken on this machine)
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        **overrides,
    }


@contextlib.contextmanager
def airflow_components(
    db: Path,
    logs: Path,
    dag_ids: Sequence[str],
    *,
    unpause: bool = True,
    timeout: float = 150,
    **overrides: str,
) -> Iterator[AirflowComponents]:
    """Start the four components, wait until the API serves every DAG of ``dag_ids`` (and unpause
    them), yield the client; stop everything when the block ends.

    :param db: the migrated SQLite metadata database of the session (``airflow_db`` fixture).
    :param logs: folder for one log file per component.
    :param overrides: environment variables over :func:`component_env`'s.
    """
    port = free_port()
    env = component_env(port, **overrides)
    processes: list[subprocess.Popen] = []
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v2", timeout=30)
    try:
        processes.append(
            _start("api-server", ["api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"], env, logs)
        )
        for name in COMPONENTS[1:]:
            processes.append(_start(name, [name], env, logs))
        services = AirflowComponents(api=client, logs=logs, db=db)

        def up() -> bool:
            for process in processes:
                if process.poll() is not None:
                    pytest.fail(f"{process.args[1]} exited with {process.returncode}\n{services.log_tails()}")
            try:
                return all(client.get(f"/dags/{d}").status_code == 200 for d in dag_ids)
            except httpx.TransportError:
                return False

        services.wait(f"the API server and the DAG processor to serve {list(dag_ids)}", up, timeout=timeout)
        if unpause:
            for dag_id in dag_ids:
                response = client.patch(f"/dags/{dag_id}", json={"is_paused": False})
                assert response.status_code == 200, response.text
        yield services
    finally:
        client.close()
        stop(processes)
