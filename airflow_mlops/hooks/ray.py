"""Connection to Ray: a local Ray started inside the task, or a Ray cluster through the Ray Jobs API.

A ``ray`` connection with an empty host (or no connection at all) means local Ray: the task starts it
with ``[mlops] ray_num_cpus`` CPUs and shuts it down at the end. With a host, the hook talks to the
cluster's Jobs API (the dashboard port, 8265 by default): submit, poll, fetch logs, stop.

Connection fields: host (``10.0.0.5`` or ``https://ray.example.com``), port (default 8265), schema
(``http`` or ``https``), password (optional bearer token, sent as ``Authorization``); extra JSON:
``{"headers": {...}, "verify": true, "runtime_env": {...}}`` (``runtime_env`` is merged into every job).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from airflow_mlops.config import environ_set
from airflow_mlops.exceptions import MLOpsConfigError, RayClusterError

DEFAULT_DASHBOARD_PORT = 8265
#: Ray job states after which a job never changes again
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
#: sub-folder of ``[mlops] state_dir`` where local Ray's processes keep their Python bytecode
BYTECODE_CACHE_FOLDER = "pycache"
#: what a local Ray's workers import as soon as they start, before any trial is placed on them: Tune's
#: function trainable, pandas (the training data) and the built-in trainables
TRIAL_WORKER_MODULES = ("ray.tune.trainable.function_trainable", "pandas", "airflow_mlops.ml.trainables")


@contextmanager
def bytecode_cache_env(folder: str | os.PathLike[str] | None) -> Iterator[str | None]:
    """Let the processes started inside the block cache their compiled bytecode under ``folder``.

    With ``PYTHONDONTWRITEBYTECODE`` set and no ``.pyc`` files installed (uv does not compile them by
    default), every new Python process compiles each module it imports from source. A Ray Tune trial
    worker imports ray.tune, pandas and scikit-learn: measured here, 33 s of compiling and importing
    on a loaded 2-CPU machine, 13 s with the bytecode cached. Inside the block the environment that
    child processes inherit says: write bytecode, but under ``PYTHONPYCACHEPREFIX=folder``, never
    beside the sources. The process's own environment is restored when the block ends.

    Does nothing when ``folder`` is None, when bytecode writing is not disabled, or when a
    ``PYTHONPYCACHEPREFIX`` is already set.

    :return: (as the block's value) the folder used, or None.
    """
    if (
        folder is None
        or not os.environ.get("PYTHONDONTWRITEBYTECODE")
        or os.environ.get("PYTHONPYCACHEPREFIX")
    ):
        yield None
        return
    folder = os.fspath(folder)
    with environ_set({"PYTHONPYCACHEPREFIX": folder}, unset=["PYTHONDONTWRITEBYTECODE"]):
        yield folder


@contextmanager
def trial_env_inherited() -> Iterator[dict[str, str]]:
    """Give Ray Tune's trial actors their default environment variables through the local Ray's own
    environment, so Tune asks for no runtime env of its own (inside the block).

    Tune creates its trial actors with ``runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}}``. Any
    runtime env, however small, costs every trial actor a second Python start (Ray's ``setup_worker.py``
    imports Ray, then execs the real worker) and keeps it off the workers Ray has already started:
    measured here, the first trial started about 0.7 s later, +7 % on the 10-s per-trial overhead
    benchmark. A local Ray's workers inherit the environment of the process that starts it, so the same
    variables set there reach every trial, and Tune's defaults can be emptied for the block. The
    environment and Tune's defaults are restored when the block ends. Does nothing (yields ``{}``) when
    this Ray Tune has no such defaults.

    :return: (as the block's value) the variables the local Ray's processes inherit.
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        yield {}
        return
    defaults = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    if not isinstance(defaults, dict) or not defaults:
        yield {}
        return
    saved_defaults = dict(defaults)
    with environ_set(saved_defaults):
        defaults.clear()
        try:
            yield saved_defaults
        finally:
            defaults.update(saved_defaults)


def merge_runtime_env(base: dict[str, Any] | None, override: dict[str, Any] | None) -> dict[str, Any]:
    """Ray runtime envs merged: lists (``py_modules``, ``pip``) are joined, mappings (``env_vars``)
    updated, other keys replaced by ``override``'s."""
    merged = dict(base or {})
    for key, value in (override or {}).items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *[v for v in value if v not in merged[key]]]
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class RayHook(BaseHook):
    """Local Ray or a Ray cluster, from an Airflow connection of type ``ray``.

    :param ray_conn_id: connection id; ``None`` (or a connection with an empty host) means local Ray.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    #: seconds a job submission waits for a just-started cluster's job agent
    agent_wait_s: float = 60.0

    def __init__(self, ray_conn_id: str | None = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["login"],
            "relabeling": {"host": "Ray head (empty = local Ray in the task)", "password": "Bearer token"},
            "placeholders": {
                "host": "10.0.0.5 or https://ray.example.com (leave empty for local Ray)",
                "port": str(DEFAULT_DASHBOARD_PORT),
                "schema": "http",
                "extra": '{"runtime_env": {"pip": ["lightgbm"]}, "verify": true}',
            },
        }

    # ----------------------------------------------------------------------------- connection

    @cached_property
    def connection(self) -> Any | None:
        if not self.ray_conn_id:
            return None
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return self.get_connection(self.ray_conn_id)
        except AirflowNotFoundException as err:
            raise MLOpsConfigError(
                f"Ray connection {self.ray_conn_id!r} does not exist.",
                fix="create it (type 'ray'; empty host for local Ray, the head's address for a cluster), "
                "or pass ray_conn_id=None for local Ray.",
            ) from err

    @property
    def is_local(self) -> bool:
        return self.connection is None or not (self.connection.host or "").strip()

    @cached_property
    def extra(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson) if self.connection is not None else {}

    @cached_property
    def address(self) -> str:
        """The Jobs API address, ``http://host:8265``."""
        conn = self.connection
        if self.is_local or conn is None:
            raise RayClusterError(
                "the Ray connection has no host, so there is no cluster address (local Ray)."
            )
        host = conn.host.strip().rstrip("/")
        if "://" in host:
            scheme, _, rest = host.partition("://")
        else:
            scheme, rest = (conn.schema or "http"), host
        if ":" not in rest:
            rest = f"{rest}:{conn.port or DEFAULT_DASHBOARD_PORT}"
        return f"{scheme}://{rest}"

    def _headers(self) -> dict[str, str]:
        headers = {str(k): str(v) for k, v in (self.extra.get("headers") or {}).items()}
        if self.connection is not None and self.connection.password:
            headers["Authorization"] = f"Bearer {self.connection.password}"
        return headers

    @cached_property
    def job_client(self) -> Any:
        """``ray.job_submission.JobSubmissionClient`` for the cluster (created on first use)."""
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(
                self.address, headers=self._headers() or None, verify=self.extra.get("verify", True)
            )
        except Exception as err:  # requests / Ray raise ConnectionError, RuntimeError, ValueError
            raise RayClusterError(
                f"cannot reach the Ray cluster at {self.address} (connection {self.ray_conn_id!r}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                fix="check that the head node runs with its dashboard (`ray start --head "
                "--dashboard-host=0.0.0.0`), and the connection's host and port (Jobs API, default 8265).",
            ) from err

    def test_connection(self) -> tuple[bool, str]:
        """Local: Ray is importable. Cluster: the Jobs API answers."""
        try:
            if self.is_local:
                import ray

                return True, f"Local Ray {ray.__version__} is installed; it starts inside the task."
            version = self.job_client.get_version()
            return True, f"Ray Jobs API {version} at {self.address}"
        except Exception as err:
            return False, str(err)

    # ------------------------------------------------------------------------------ local Ray

    @contextmanager
    def local_ray(self, num_cpus: int | None = None, *, bytecode_cache: bool = True) -> Iterator[None]:
        """Ray started in this process for the block (reused when this process already runs one).

        :param num_cpus: CPUs for Ray; default ``[mlops] ray_num_cpus`` (empty: all of them).
        :param bytecode_cache: when this process may not write bytecode (``PYTHONDONTWRITEBYTECODE``),
            let Ray's processes (its agents and every trial worker) cache theirs under
            ``<[mlops] state_dir>/pycache`` (see :func:`bytecode_cache_env`): a trial worker then
            starts in seconds instead of compiling ray.tune, pandas and scikit-learn again.

        Tune's trial actors start on the workers Ray starts with it (see :func:`trial_env_inherited`),
        and those import :data:`TRIAL_WORKER_MODULES` as soon as they start. Measured with 20 one-second
        trials on 2 CPUs (``benchmarks/bench_tuning.py``, quiet machine): the search's overhead over the
        ideal 10 s went from +19-25 % to +17-22 % (median +17 %); on a fresh Ray the first trial ran
        about 1 s sooner.
        """
        import ray

        if ray.is_initialized():
            yield
            return
        from airflow_mlops.config import load_settings

        settings = load_settings()
        if num_cpus is None:
            num_cpus = settings.ray_num_cpus
        self.log.info("Starting local Ray with %s CPUs", num_cpus or "all")
        # Ray's processes inherit the environment of the moment they start: the raylet passes it on
        # to every worker it spawns later
        # Tune's trial actors get their default variables from Ray's environment instead of a runtime
        # env (for as long as this Ray runs): they start on the workers Ray has already started, which
        # have imported Tune meanwhile (while this task reads its training set)
        with trial_env_inherited():
            with bytecode_cache_env(
                settings.state_dir / BYTECODE_CACHE_FOLDER if bytecode_cache else None
            ) as cache:
                if cache:
                    self.log.info("Ray's workers cache their Python bytecode under %s", cache)
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                    _system_config={"preload_python_modules": list(TRIAL_WORKER_MODULES)},
                )
            try:
                yield
            finally:
                ray.shutdown()

    # ------------------------------------------------------------------------------- Ray Jobs

    def runtime_env(self, runtime_env: dict[str, Any] | None) -> dict[str, Any]:
        """The connection's ``runtime_env`` extra merged under the given one."""
        return merge_runtime_env(self.extra.get("runtime_env"), runtime_env)

    def submit_job(
        self,
        entrypoint: str,
        *,
        runtime_env: dict[str, Any] | None = None,
        submission_id: str | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
    ) -> str:
        """Submit a Ray Job; returns its submission id.

        A cluster that has just started answers "No available agent to submit job" until its job agent
        is up; that answer is retried for up to ``agent_wait_s`` seconds (a fresh head node needs a few).
        """
        import time

        deadline = time.monotonic() + self.agent_wait_s
        while True:
            try:
                return self.job_client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=self.runtime_env(runtime_env),
                    submission_id=submission_id,
                    metadata=metadata,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                )
            except RayClusterError:
                raise
            except Exception as err:
                if "No available agent" in str(err) and time.monotonic() < deadline:
                    self.log.info("Ray cluster at %s has no job agent yet; retrying", self.address)
                    time.sleep(2)
                    continue
                raise RayClusterError(
                    f"the Ray cluster at {self.address} refused job {submission_id!r}: {err}",
                    fix="read the message: a runtime_env the cluster cannot build, or a duplicate submission id.",
                ) from err

    def jobs_api(self, timeout: float = 30.0) -> RayJobsApi:
        """An async client of the cluster's Jobs REST API, for triggers (reads the connection now)."""
        return RayJobsApi(self.address, self._headers(), self.extra.get("verify", True), timeout=timeout)

    def get_job_status(self, job_id: str) -> str:
        status = self.job_client.get_job_status(job_id)
        return str(getattr(status, "value", status))

    def get_job_info(self, job_id: str) -> Any:
        return self.job_client.get_job_info(job_id)

    def get_job_logs(self, job_id: str) -> str:
        return self.job_client.get_job_logs(job_id)

    def stop_job(self, job_id: str, wait: float | None = None) -> bool:
        """Ask the cluster to stop the job; False when it had already ended.

        :param wait: seconds to wait until the job has reached a terminal state (then it writes no more
            to its outputs); None returns at once.
        :raises RayClusterError: the job is still running after ``wait`` seconds.
        """
        import time

        stopped = bool(self.job_client.stop_job(job_id))
        if wait is None:
            return stopped
        deadline = time.monotonic() + wait
        while (status := self.get_job_status(job_id)) not in TERMINAL_JOB_STATES:
            if time.monotonic() > deadline:
                raise RayClusterError(
                    f"Ray Job {job_id} on {self.address} is still {status} {wait:.0f} s after it was asked to stop.",
                    fix=f"stop it (`ray job stop {job_id}`), then clear the task.",
                )
            time.sleep(0.5)
        return stopped

    def jobs_with_prefix(self, prefix: str) -> dict[str, str]:
        """``{submission id: status}`` of the cluster's jobs whose submission id starts with ``prefix``."""
        jobs = {}
        for job in self.job_client.list_jobs():
            submission_id = getattr(job, "submission_id", None) or ""
            if submission_id.startswith(prefix):
                jobs[submission_id] = str(getattr(job.status, "value", job.status))
        return jobs


class RayJobsApi:
    """What a trigger asks Ray's Jobs REST API (``GET /api/jobs/<id>`` and ``.../logs``), over async HTTP.

    Ray's own ``JobSubmissionClient`` is synchronous and needs ``import ray``, several seconds of CPU in a
    triggerer process shared with other triggers (even from a worker thread it holds the interpreter while
    it imports). This client imports nothing of Ray and never blocks the event loop. Use it as an async
    context manager.

    :param address: the Jobs API address (``http://head:8265``).
    :param headers: sent with every request (e.g. ``Authorization``).
    :param verify: TLS verification, as in the connection's ``verify`` extra.
    :param timeout: seconds for one request.
    """

    def __init__(
        self, address: str, headers: dict[str, str], verify: Any = True, timeout: float = 30.0
    ) -> None:
        import httpx

        self.address = address
        self._client = httpx.AsyncClient(base_url=address, headers=headers, verify=verify, timeout=timeout)

    async def __aenter__(self) -> RayJobsApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _get(self, job_id: str, suffix: str = "") -> Any:
        from urllib.parse import quote

        answer = await self._client.get(f"/api/jobs/{quote(job_id, safe='')}{suffix}")
        if answer.status_code == 404:
            raise RayClusterError(
                f"the Ray cluster at {self.address} does not know job {job_id!r}.",
                fix="the cluster may have been restarted (its job table is in memory); run the task again.",
            )
        answer.raise_for_status()
        return answer.json()

    async def status(self, job_id: str) -> str:
        """The job's status: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
        return str((await self._get(job_id))["status"])

    async def logs(self, job_id: str) -> str:
        """The job's driver log so far."""
        return str((await self._get(job_id, "/logs")).get("logs") or "")

    async def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job (``POST /api/jobs/<id>/stop``); False when it had ended."""
        from urllib.parse import quote

        answer = await self._client.post(f"/api/jobs/{quote(job_id, safe='')}/stop")
        if answer.status_code == 404:
            return False
        answer.raise_for_status()
        return bool(answer.json().get("stopped"))
