"""Real Airflow components for the system tests: the demo's :class:`AirflowStack`, and what the tests read.

:func:`airflow_components` starts the :class:`~airflow_mlops.demo.stack.AirflowStack` of ``make demo``
(an ``api-server``, the Execution API the tasks talk to and the REST API the tests drive, a ``scheduler``,
a ``dag-processor`` and a ``triggerer``) on the session's ``AIRFLOW_HOME`` and a metadata database on the
session's PostgreSQL (fixture ``airflow_pg_db``) with the LocalExecutor, waits until the
given DAGs are served, and stops every process group (executor workers and task processes included)
when the block ends, failing if anything survives.

:class:`AirflowComponents` drives them over REST through the stack's
:class:`~airflow_mlops.demo.stack.AirflowClient` (its errors and timeouts raise
:class:`~airflow_mlops.demo.stack.AirflowStackError`, a timeout with the components' log tails). Reads
that the REST API of Airflow 3.3.2 cannot answer reliably go to the metadata database directly
(read-only): ``GET /assets/events`` answers 500 while a run an event created is still queued (its
``start_date`` is None and the response model requires a datetime).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_mlops.demo.stack import AirflowClient, AirflowStack


def _extra(value: Any) -> dict:
    """An Asset event's ``extra`` as stored (a JSON column: a dict, or its text)."""
    return json.loads(value) if isinstance(value, str) else dict(value or {})


@dataclass
class AirflowComponents:
    """The running components: the stack (its REST client and log files), the metadata database (its URL)."""

    stack: AirflowStack
    db: str

    @property
    def client(self) -> AirflowClient:
        assert self.stack.client is not None, "the Airflow stack has not been started"
        return self.stack.client

    # ------------------------------------------------------------------ Airflow objects over REST
    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, **params)

    def post(self, path: str, body: dict) -> Any:
        return self.client.request("POST", path, json=body)

    def log_tails(self) -> str:
        return self.stack.log_tails()

    def wait(
        self, what: str, probe: Callable[[], Any], timeout: float, detail: Callable[[], Any] | None = None
    ) -> Any:
        """Poll ``probe`` until it returns something truthy; a timeout shows ``detail()`` and the logs."""
        return self.client.wait(what, probe, timeout, detail=detail)

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.client.run(dag_id, run_id)

    def wait_parked(self, dag_id: str, run_id: str, task_id: str, timeout: float = 120) -> None:
        """Wait until the scheduler has received the executor's event of the process that parked the task
        (a human-in-the-loop task in ``awaiting_input``). Airflow 3.3.2 fails the task when that event
        arrives after the answer has already requeued it (docs/lifecycle-spec.md, "Human approval"); on a
        loaded machine the parking process took 5 s to end after the task showed ``awaiting_input``."""
        log = self.stack.logs / "scheduler.log"
        event = (
            "Received executor event with state success for task instance "
            f"TaskInstanceKey(dag_id='{dag_id}', task_id='{task_id}', run_id='{run_id}',"
        )
        self.wait(
            f"the scheduler to receive the end of {dag_id} {run_id} {task_id}'s parking process",
            lambda: log.exists() and event in log.read_text(errors="replace"),
            timeout,
        )

    def finished_run(self, dag_id: str, run_id: str, timeout: float = 180) -> dict:
        """The run once it has finished, ``success`` or ``failed``."""
        return self.client.wait_run(dag_id, run_id, timeout, check=False)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return self.client.task_states(dag_id, run_id)

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        return self.client.xcom(dag_id, run_id, task_id)

    # ------------------------------------------------------------------ metadata database (read-only)
    def query(self, sql: str, **params: Any) -> list[dict]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db)
        try:
            with engine.connect() as db:
                return [dict(row) for row in db.execute(text(sql), params).mappings()]
        finally:
            engine.dispose()

    def asset_events(self, asset_name: str) -> list[dict]:
        """Every event of the Asset, oldest first, with its ``extra`` parsed."""
        rows = self.query(
            "SELECT e.id, e.extra, e.source_dag_id, e.source_run_id, e.timestamp FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id WHERE a.name = :name ORDER BY e.id",
            name=asset_name,
        )
        return [{**dict(row), "extra": _extra(row["extra"])} for row in rows]

    def asset_triggered_runs(self, dag_id: str) -> dict[str, list[dict]]:
        """The Asset-triggered runs of ``dag_id``, each with the Asset events that triggered it."""
        rows = self.query(
            "SELECT r.run_id, e.id, e.extra FROM dag_run r "
            "LEFT JOIN dagrun_asset_event link ON link.dag_run_id = r.id "
            "LEFT JOIN asset_event e ON e.id = link.event_id "
            "WHERE r.dag_id = :dag_id AND r.run_type = 'asset_triggered' ORDER BY r.id, e.id",
            dag_id=dag_id,
        )
        runs: dict[str, list[dict]] = {}
        for row in rows:
            events = runs.setdefault(row["run_id"], [])
            if row["id"] is not None:
                events.append({"id": row["id"], "extra": _extra(row["extra"])})
        return runs


def _token(url: str, username: str, password: str) -> str:
    """A JWT of the user from the API server's ``POST /auth/token`` (Airflow's simple auth manager)."""
    import httpx

    response = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=60)
    assert response.status_code == 201, (
        f"login of {username!r} answered {response.status_code}: {response.text}"
    )
    return response.json()["access_token"]


@contextlib.contextmanager
def airflow_components(
    db: str,
    logs: Path,
    dag_ids: Sequence[str],
    *,
    dags_folder: Path | None = None,
    unpause: bool = True,
    timeout: float = 150,
    preload: bool = False,
    login: tuple[str, str] | None = None,
    **env: str,
) -> Iterator[AirflowComponents]:
    """Start the four components, wait until the API serves every DAG of ``dag_ids`` (and unpause
    them), yield them; stop everything when the block ends and fail if any of their processes survives.

    :param db: URL of the migrated metadata database (``airflow_pg_db`` fixture); the components'
        ``AIRFLOW_HOME`` is the session's.
    :param logs: folder for one log file per component.
    :param dags_folder: the DAG files to parse; default ``[core] dags_folder`` from the environment.
    :param timeout: seconds the DAGs may take to be served once the components report healthy.
    :param preload: the scheduler's fork server imports the task libraries once (:mod:`airflow_mlops.preload`).
    :param login: ``(username, password)`` of a user of Airflow's auth manager, for components that run
        with Airflow's login (``env`` sets ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False``, as the
        UI tests do): the REST client then sends that user's token.
    :param env: environment variables over :meth:`AirflowStack.environment`'s (e.g. ``AIRFLOW__MLOPS__*``).
    """
    stack = AirflowStack(
        home=Path(os.environ["AIRFLOW_HOME"]),
        logs=logs,
        dags_folder=dags_folder,
        env=env,
        database=db,
        parallelism=4,
        preload=preload,
    )
    try:
        with stack as client:
            if login is not None:
                client.token = _token(stack.url, *login)
                client.close()  # the next request opens a client that sends the token

            def served() -> bool:
                for name, process in stack.processes.items():
                    if process.poll() is not None:
                        pytest.fail(f"airflow {name} exited with {process.returncode}\n{stack.log_tails()}")
                return all(client.dag(dag_id) for dag_id in dag_ids)

            client.wait(f"the API server and the DAG processor to serve {list(dag_ids)}", served, timeout)
            if unpause:
                for dag_id in dag_ids:
                    client.unpause(dag_id)
            yield AirflowComponents(stack=stack, db=db)
    finally:
        leftovers = stack.alive()
        assert not leftovers, f"Airflow processes left running (pids): {leftovers}"
