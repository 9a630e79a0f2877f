"""The demo's Airflow: the real components as subprocesses, and a small client for their REST API.

:class:`AirflowStack` runs Airflow on one ``AIRFLOW_HOME`` with the LocalExecutor: ``airflow standalone``
(Airflow's own launcher of its four components; what ``make demo`` and ``make ui`` run), or the four
components ``airflow api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` each on its own (the
test suite's scaled topology, with another executor), each in a session of its own with its output in
``<logs>/<name>.log``. It waits until ``/api/v2/monitor/health`` reports every component healthy and stops
the whole process trees again (executor workers and task processes included) when the ``with`` block
ends, also on Ctrl-C or SIGTERM. It restarts nothing: a component that exits fails the next REST call
with the component's log (:meth:`AirflowStack.check_alive`).

The metadata database is PostgreSQL (:mod:`airflow_mlops.demo.postgres`): SQLite could not carry the
demo's concurrency (scheduler deaths on its races, writes refused with "database is locked").

The demo's own components run with ``SIMPLE_AUTH_MANAGER_ALL_ADMINS`` (set in their environment only),
so the REST client needs no token; ``make ui`` afterwards keeps the usual login with the generated
admin password.

:class:`AirflowClient` is the part of ``/api/v2`` the demo drives: pause state, triggered runs and
backfills, waiting for runs (a failure raises :class:`AirflowRunFailed` with the failed tasks' log
tails), task instances, XCom values and Asset events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from airflow_mlops.exceptions import MLOpsError
from airflow_mlops.net import free_port

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: the scheduler's LocalExecutor workers start from a fork server that imported the provider's task
#: libraries (:mod:`airflow_mlops.preload`); each task process forks from a worker and finds them imported
PRELOAD_ENV = {
    "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
    "AIRFLOW__CORE__MP_FORKSERVER_PRELOAD": "airflow_mlops.preload",
}

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINISHED = ("success", "failed")


class AirflowStackError(MLOpsError):
    """The demo's Airflow components did not start, or a REST call was refused."""


class AirflowRunFailed(AirflowStackError):
    """A DAG run ended ``failed``; the message carries the failed tasks and their log tails."""


def exit_code(process: subprocess.Popen) -> int | None:
    """The exit code of a component that has exited, None while it runs, WITHOUT reaping it: until it is
    reaped its pid, which is also its process group's id, cannot be given to another process, so the
    ``os.killpg`` that stops what is left of the group can never reach another process's group
    (``Popen.poll`` would reap it and open that window)."""
    if process.returncode is not None:
        return process.returncode
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return process.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _last_error(path: Path) -> str:
    """The last line of a component's log that names an exception, or its last line."""
    lines = [line.strip() for line in _tail(path, 20000).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line[:200]
    return lines[-1][:200] if lines else "no log"


@dataclass
class AirflowStack:
    """The four Airflow components on ``home`` with the LocalExecutor, as a context manager.

    :param home: ``AIRFLOW_HOME``.
    :param logs: folder for ``<component>.log``.
    :param dags_folder: the DAG files to parse; default ``[core] dags_folder`` from the environment.
    :param env: extra environment for the components (e.g. ``AIRFLOW__MLOPS__STATE_DIR``).
    :param parallelism: task slots of the LocalExecutor (the machine has two cores).
    :param port: the API server's port; default a free one.
    :param host: the address the API server listens on and the components reach it at (another
        machine's workers need one they can reach, not 127.0.0.1).
    :param database: SQLAlchemy URL of the migrated metadata database (``[database] sql_alchemy_conn``);
        default: what the environment configures.
    :param standalone: run ``airflow standalone`` (the LocalExecutor) instead of the four components.
    :param preload: have the scheduler's ``multiprocessing`` fork server import the provider's task
        libraries once (:mod:`airflow_mlops.preload`, Airflow's ``[core] mp_forkserver_preload``), so task
        processes start with Great Expectations, Evidently, Feast, scikit-learn... already imported.
    """

    home: Path
    logs: Path
    dags_folder: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    parallelism: int = 4
    port: int = 0
    host: str = "127.0.0.1"
    database: str | None = None
    standalone: bool = False
    preload: bool = False
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    client: AirflowClient | None = field(default=None, init=False)
    _env: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _running: bool = field(default=False, init=False, repr=False)
    #: sessions of components that were started again (:meth:`restart`): checked for leftovers as well
    _old_sessions: set[int] = field(default_factory=set, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """What the components run with: the caller's environment, the demo's settings, ``env``."""
        dags = self.dags_folder or os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            **({"AIRFLOW__CORE__DAGS_FOLDER": str(dags)} if dags else {}),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "0",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            # one secret for every component of this start (tasks' tokens are checked by the API server)
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
            # a loop that found nothing to do sleeps 0.5 s instead of 1 s: the next task of a run is
            # queued sooner (the demo's runs are chains of short tasks)
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # the DAG files do not change while the demo runs: parse them every 2 minutes, not every 30 s
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
            # `airflow standalone` starts its components as `airflow <command>` found on PATH
            "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
            # the log servers on ports of their own (the defaults may be taken, e.g. by `make ui`)
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            **({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database} if self.database else {}),
            **(PRELOAD_ENV if self.preload else {}),
            **self.env,
        }
        return env

    # ------------------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 240) -> AirflowClient:
        """Start the components and wait until the API server reports them all healthy."""
        self.port = self.port or free_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._env = self.environment()
        for name in ("standalone",) if self.standalone else COMPONENTS:
            self._launch(name)
        self.client = AirflowClient(
            f"{self.url}/api/v2",
            on_timeout=self.log_tails,
            on_request=self.check_alive,
            explain_error=self.api_server_error,
        )
        self.client.wait("the Airflow components to report healthy", self._healthy, timeout)
        self._running = True
        return self.client

    def _launch(self, name: str) -> None:
        commands = {
            "standalone": ["standalone"],
            "api-server": ["api-server", "-H", self.host, "-p", str(self.port), "-w", "1"],
            "scheduler": ["scheduler"],
            "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer"],
        }
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [str(Path(sys.executable).with_name("airflow")), *commands[name]],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,  # a group of its own: Ctrl-C reaches us, we stop the tree
            )

    def check_alive(self) -> None:
        """Raise if a component has exited since the start: nothing here starts it again (Airflow's
        components do not die on PostgreSQL; a service manager restarts them in a real deployment).

        :raises AirflowStackError: naming the component, its exit code and its log's tail.
        """
        if not self._running:
            return
        for name, process in self.processes.items():
            code = exit_code(process)
            if code is None and name == "standalone":
                missing = self._standalone_missing()
                if missing:
                    self._running = False
                    log_file = self.logs / "standalone.log"
                    raise AirflowStackError(
                        f"airflow {missing[0]} (started by `airflow standalone`) has exited.\n"
                        f"{log_file}:\n{_tail(log_file)}",
                        fix="read the log above; run `make demo` again to continue from the state reached.",
                    )
            if code is None:
                continue
            self._running = False
            log_file = self.logs / f"{name}.log"
            raise AirflowStackError(
                f"airflow {name} exited with code {code} ({_last_error(log_file)}).\n{log_file}:\n{_tail(log_file)}",
                fix="read the log above; run `make demo` again to continue from the state reached.",
            )

    def _standalone_missing(self) -> list[str]:
        """The components ``airflow standalone`` started that no longer run (it does not restart them)."""
        import psutil

        try:
            children = psutil.Process(self.processes["standalone"].pid).children()
        except psutil.Error:
            return list(COMPONENTS)
        running = set()
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = child.cmdline()
            except psutil.Error:
                continue
            # `python .../airflow scheduler`, or the title a component gave itself (`airflow api_server -- ...`)
            words = " ".join(command).replace("_", "-").split()
            running.update(name for name in COMPONENTS if name in words[:3])
        return [name for name in COMPONENTS if name not in running]

    def restart(self, name: str) -> None:
        """Stop what is left of component ``name`` (its whole session: executor workers and task
        processes, which Airflow puts in process groups of their own) and start it again, as a service
        manager would after it died (the fault tests kill a component, then call this)."""
        process = self.processes[name]
        self._kill_session(process.pid)
        process.wait()  # reaped only now: from here on the pid may be given to another process
        self._launch(name)

    def _healthy(self) -> bool:
        for name, process in self.processes.items():
            if (code := exit_code(process)) is not None:
                raise AirflowStackError(
                    f"airflow {name} exited with code {code} while starting.\n"
                    f"{self.logs / f'{name}.log'}:\n{_tail(self.logs / f'{name}.log')}",
                    fix="read the log above; a port in use or an unmigrated database are the usual causes.",
                )
        assert self.client is not None
        try:
            health = self.client.get("/monitor/health")
        except (AirflowStackError, OSError):
            return False
        except Exception as err:  # httpx transport errors while the server starts
            if type(err).__module__.startswith("httpx"):
                return False
            raise
        return all((health.get(part) or {}).get("status") == "healthy" for part in health)

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {self.logs / f'{n}.log'}\n{_tail(self.logs / f'{n}.log')}" for n in self.processes
        )

    def api_server_error(self, answer: str) -> str:
        """The API server's log lines about an error answer: Airflow answers a database error with an ID
        (``look for ID i402q4d5``) and logs the cause under it."""
        found = re.search(r"look for ID (\w+)", answer)
        if not found:
            return ""
        path = self.logs / ("standalone.log" if self.standalone else "api-server.log")
        lines = _tail(path, 200_000).splitlines()
        for i, line in enumerate(lines):
            if found.group(1) in line:
                return f"--- {path}, error {found.group(1)}:\n" + "\n".join(lines[i : i + 60])[-6000:]
        return ""

    def alive(self, sessions: set[int] | None = None) -> list[int]:
        """Pids of live processes in the components' sessions (zombies aside): each component is started
        in a session of its own, which its executor workers and task processes inherit (a task process
        has a process group of its own); a process that detached on purpose (a model server started by
        a deploy task) has a new session and is not counted.

        :param sessions: only these sessions (a component's first pid); default every component's.
        """
        import psutil

        if sessions is None:
            sessions = {p.pid for p in self.processes.values()} | self._old_sessions
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in sessions and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return alive

    def _kill_session(self, session: int) -> None:
        """SIGKILL every process of a component's session (the component itself may be gone)."""
        for pid in self.alive({session}):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._old_sessions.add(session)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every component's process group, SIGKILL what is left of their sessions after ``timeout``."""
        self._running = False
        if self.client is not None:
            self.client.close()
        groups = [p.pid for p in self.processes.values()]
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        for session in [*groups, *self._old_sessions]:
            self._kill_session(session)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)

    def __enter__(self) -> AirflowClient:
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        if _main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return self.start()
        except BaseException:
            self.stop()
            self._restore_sigterm()
            raise

    def __exit__(self, *exc: object) -> None:
        # a second Ctrl-C while stopping must not leave the components running
        previous_sigint = signal.getsignal(signal.SIGINT)
        if _main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop()
        finally:
            if _main_thread():
                signal.signal(signal.SIGINT, previous_sigint)
            self._restore_sigterm()

    def _restore_sigterm(self) -> None:
        if _main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _iso(value: datetime | str) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


class AirflowClient:
    """The calls of Airflow's REST API (``/api/v2``) the demo makes.

    :param base_url: ``http://host:port/api/v2``.
    :param token: a bearer token (not needed when the API server runs with all-admins simple auth).
    :param on_timeout: returns text appended to a timeout error (e.g. the components' log tails).
    :param on_request: called before every request (e.g. :meth:`AirflowStack.check_alive`).
    :param explain_error: returns what the server logged about an error answer (given its text), appended
        to the error (e.g. :meth:`AirflowStack.api_server_error`).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        on_timeout: Callable[[], str] | None = None,
        on_request: Callable[[], None] | None = None,
        explain_error: Callable[[str], str] | None = None,
    ) -> None:
        self.base_url = base_url
        self.token = token
        self.on_timeout = on_timeout
        self.on_request = on_request
        self.explain_error = explain_error

    @property
    def http(self) -> httpx.Client:
        client = self.__dict__.get("_http")
        if client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            client = self.__dict__["_http"] = httpx.Client(
                base_url=self.base_url, timeout=httpx.Timeout(60, connect=10), headers=headers
            )
        return client

    def close(self) -> None:
        client = self.__dict__.pop("_http", None)
        if client is not None:
            client.close()

    # ------------------------------------------------------------------------------ plumbing
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.on_request is not None:
            self.on_request()
        return self.http.request(method, path, **kwargs)

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """Send a request; an answer not in ``ok`` raises :class:`AirflowStackError` with it."""
        response = self._send(method, path, **kwargs)
        if response.status_code not in ok:
            logged = self.explain_error(response.text) if self.explain_error else ""
            raise AirflowStackError(
                f"{method} /api/v2{path} answered {response.status_code}: {response.text[:1500]}"
                + (f"\n{logged}" if logged else ""),
                fix="see the API server's log in the demo's logs folder.",
            )
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def wait(
        self,
        what: str,
        probe: Callable[[], Any],
        timeout: float,
        interval: float = 1.0,
        *,
        detail: Callable[[], Any] | None = None,
    ) -> Any:
        """Poll ``probe`` until it returns something truthy; raise after ``timeout`` seconds.

        :param detail: returns what the timeout error shows of the state waited on (e.g. what was seen).
        """
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                seen = f"\n{detail()}" if detail else ""
                extra = self.on_timeout() if self.on_timeout else ""
                raise AirflowStackError(
                    f"timed out after {timeout:.0f} s waiting for {what}.{seen}\n{extra}",
                    fix="the machine may be overloaded; see the components' logs.",
                )
            time.sleep(interval)

    def _all(self, path: str, key: str, **params: Any) -> list[dict]:
        items: list[dict] = []
        while True:
            body = self.get(path, limit=100, offset=len(items), **params)
            page = list(body[key])
            items.extend(page)
            if not page or len(items) >= body.get("total_entries", 0):
                return items

    # ------------------------------------------------------------------------------ DAGs and runs
    def dag(self, dag_id: str) -> dict | None:
        response = self._send("GET", f"/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    def import_errors(self) -> list[dict]:
        return self._all("/importErrors", "import_errors")

    def unpause(self, dag_id: str) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def pause(self, dag_id: str) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": True})

    def trigger(
        self,
        dag_id: str,
        *,
        run_id: str | None = None,
        logical_date: datetime | str | None = None,
        data_interval: tuple[datetime | str, datetime | str] | None = None,
        conf: dict | None = None,
    ) -> dict:
        """Trigger a run; without ``data_interval`` the DAG's timetable infers it from ``logical_date``."""
        body: dict[str, Any] = {
            "logical_date": _iso(logical_date) if logical_date else None,
            "conf": conf or {},
        }
        if run_id:
            body["dag_run_id"] = run_id
        if data_interval:
            body["data_interval_start"], body["data_interval_end"] = map(_iso, data_interval)
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def backfill(
        self,
        dag_id: str,
        from_date: datetime | str,
        to_date: datetime | str,
        *,
        max_active_runs: int = 4,
        reprocess_behavior: str = "failed",
        conf: dict | None = None,
    ) -> dict:
        """Have the scheduler run ``dag_id`` for every data interval whose start lies in [from, to]."""
        return self.request(
            "POST",
            "/backfills",
            json={
                "dag_id": dag_id,
                "from_date": _iso(from_date),
                "to_date": _iso(to_date),
                "max_active_runs": max_active_runs,
                "reprocess_behavior": reprocess_behavior,
                "dag_run_conf": conf or {},
            },
        )

    def active_backfills(self, dag_id: str) -> list[dict]:
        """Backfills of ``dag_id`` that have not completed (an interrupted demo leaves one behind)."""
        return [b for b in self._all("/backfills", "backfills", dag_id=dag_id) if not b["completed_at"]]

    def backfill_state(self, backfill_id: int) -> dict:
        return self.get(f"/backfills/{backfill_id}")

    def runs(self, dag_id: str, **filters: Any) -> list[dict]:
        """Runs of ``dag_id``, oldest logical date first (filters: ``state``, ``run_type``, ...)."""
        return self._all(f"/dags/{dag_id}/dagRuns", "dag_runs", order_by="id", **filters)

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self._all(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, lines: int = 30) -> str:
        """The last ``lines`` lines of a task try's log."""
        body = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{max(1, try_number)}",
            params={"full_content": "true"},
            headers={"Accept": "application/json"},
        )
        out: list[str] = []
        for item in body.get("content") or []:
            if isinstance(item, dict):
                text = " ".join(str(item[k]) for k in ("timestamp", "level", "event") if item.get(k))
                for detail in item.get("error_detail") or []:
                    if isinstance(detail, dict):
                        text += f"\n  {detail.get('exc_type')}: {detail.get('exc_value')}"
                out.append(text)
            else:
                out.extend(str(item).splitlines())
        return "\n".join(out[-lines:])

    def failure_report(self, dag_id: str, run_id: str) -> str:
        """Each failed task of a run with the tail of its log."""
        parts = []
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] == "failed":
                try:
                    log = self.task_log(dag_id, run_id, ti["task_id"], ti.get("try_number") or 1)
                except AirflowStackError as err:
                    log = f"(log not readable: {err})"
                parts.append(f"--- task {ti['task_id']} failed; log tail:\n{log}")
        return "\n".join(parts) or "(no task failed; the run itself was marked failed)"

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900, *, check: bool = True) -> dict:
        """Wait until a run has finished; with ``check`` a failed run raises :class:`AirflowRunFailed`."""

        def done() -> dict | None:
            run = self.run(dag_id, run_id)
            return run if run["state"] in FINISHED else None

        run = self.wait(f"{dag_id} run {run_id} to finish", done, timeout)
        if check and run["state"] != "success":
            raise AirflowRunFailed(
                f"{dag_id} run {run_id} failed.\n{self.failure_report(dag_id, run_id)}",
                fix="open the run in the Airflow UI (`make ui`), fix the cause, then clear the run.",
            )
        return run

    def clear_failed(self, dag_id: str, run_id: str) -> list[str]:
        """Clear the failed tasks of a run (and what follows them) so the scheduler runs them again."""
        return self.clear(dag_id, run_id)

    def clear(self, dag_id: str, run_id: str, task_ids: list[str] | None = None) -> list[str]:
        """Clear tasks of a run: ``task_ids`` (and what follows them), or else its failed tasks."""
        body = {
            "dry_run": False,
            "only_failed": task_ids is None,
            "dag_run_id": run_id,
            "include_downstream": True,
        }
        if task_ids is not None:
            body["task_ids"] = task_ids
        cleared = self.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)
        return sorted({ti["task_id"] for ti in cleared.get("task_instances", [])})

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value (None when the task pushed nothing)."""
        response = self._send(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"deserialize": "true", "stringify": "false"},
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise AirflowStackError(
                f"XCom {key} of {dag_id}/{run_id}/{task_id} answered {response.status_code}: "
                f"{response.text[:500]}",
                fix="see the API server's log.",
            )
        value = response.json()["value"]
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return json.loads(value)
        return value

    # ------------------------------------------------------------------------------ Assets
    def asset_id(self, name: str) -> int | None:
        assets = self.get("/assets", name_pattern=name)["assets"]
        return next((a["id"] for a in assets if a["name"] == name), None)

    def asset_events(self, name: str) -> list[dict]:
        """Events of the Asset named ``name``, oldest first (``extra``, ``source_*``, ``created_dagruns``)."""
        asset_id = self.asset_id(name)
        if asset_id is None:
            return []
        return self._all("/assets/events", "asset_events", asset_id=asset_id, order_by="timestamp")

    def queued_asset_events(self, dag_id: str) -> list[dict]:
        """Asset events waiting to start a run of ``dag_id``."""
        response = self._send("GET", f"/dags/{dag_id}/assets/queuedEvents")
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise AirflowStackError(
                f"queued events of {dag_id} answered {response.status_code}: {response.text[:500]}",
                fix="see the API server's log.",
            )
        return list(response.json()["queued_events"])
