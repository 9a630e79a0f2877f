"""Deploy models onto a shared multi-model endpoint (:mod:`airflow_mlops.ml.multi_service`).

One ``bentoml serve`` process per endpoint serves every model deployed on it under
``/models/<name>/predict``; each lifecycle deploys its model there with :class:`MultiModelDeployOperator`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_mlops.exceptions import ServingError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError, check_model_name
from airflow_mlops.ml.multi_model import deployments_path, register_deployment, restore_deployment
from airflow_mlops.net import free_port
from airflow_mlops.operators.serving import (
    _bento_executable,
    _log_tail,
    _write_json_atomic,
    check_api_key,
    check_signature,
    identify,
    process_alive,
    serving_env,
    start_detached,
    stop_tree,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: what ``bentoml serve`` runs for a multi-model endpoint
MULTI_SERVICE_IMPORT = "airflow_mlops.ml.multi_service:MultiModelService"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class MultiModelEndpoint:
    """The endpoint's server on this machine: its state file (``<state_dir>/deployments/multi/<endpoint>.json``:
    the server's pid and process identity, port, settings, history) beside its deployments file.

    :param hook: the BentoML hook (registry, BentoML home, settings).
    :param name: the endpoint's name.
    """

    def __init__(self, hook: BentoMLHook, name: str) -> None:
        self.hook = hook
        self.name = check_model_name(name)

    @property
    def folder(self) -> Path:
        return self.hook.store.settings.state_dir / "deployments" / "multi"

    @property
    def state_path(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def deployments(self) -> Path:
        return deployments_path(self.hook.store.settings.state_dir, self.name)

    def read_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"endpoint": self.name, "server": None, "history": []}

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the endpoint's state under an exclusive lock (written also when the block
        raises, so a started server is never forgotten)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f".{self.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            state = self.read_state()
            try:
                yield state
            finally:
                _write_json_atomic(self.state_path, state)

    def server_ready(self, server: dict[str, Any] | None) -> bool:
        from airflow_mlops.sensors.serving import probe

        return bool(server) and process_alive(server) and probe(server["url"], "/ready")[0]

    def ensure_server(
        self, state: dict[str, Any], *, port: int | None, settings: dict[str, Any], ready_timeout: float
    ) -> dict[str, Any]:
        """The endpoint's running server, started when none runs (a recorded one that is gone, or whose pid
        now belongs to another process, is never signalled: :func:`stop_tree` checks its identity).

        :raises ServingError: a running server with other connections or Feast settings, or a server that
            did not become ready.
        """
        server = state.get("server")
        if self.server_ready(server):
            different = {
                k: (server.get("settings", {}).get(k), v)
                for k, v in settings.items()
                if k != "env" and v is not None and server.get("settings", {}).get(k) != v
            }
            if different:
                raise ServingError(
                    f"endpoint {self.name!r} runs with other settings than this deploy asks for "
                    f"({', '.join(f'{k}: {old!r} running, {new!r} asked' for k, (old, new) in different.items())}).",
                    fix="deploy with the endpoint's settings, or onto another endpoint.",
                )
            return server
        stop_tree(server, timeout=15)
        port = int(port or free_port())
        env = serving_env(self.hook, **{k: v for k, v in settings.items() if k != "memory_budget_mb"})
        env.update(
            {
                "MLOPS_MULTI_ENDPOINT": self.name,
                "MLOPS_MULTI_DEPLOYMENTS": str(self.deployments),
                "MLOPS_MULTI_MEMORY_BUDGET_MB": str(settings["memory_budget_mb"]),
                **{k: str(v) for k, v in (settings.get("env") or {}).items()},
            }
        )
        env.pop("MLOPS_SERVE_ENV", None)
        log_path = self.folder / "logs" / f"{self.name}-{port}.log"
        pid = start_detached(
            [_bento_executable(), "serve", MULTI_SERVICE_IMPORT, "--host", "127.0.0.1", "--port", str(port)],
            env,
            log_path,
        )
        server = {
            "pid": pid,
            "process": identify(pid),
            "port": port,
            "url": f"http://127.0.0.1:{port}",
            "log": str(log_path),
            "started_at": _now(),
            "settings": {k: v for k, v in settings.items() if k != "env"},
        }
        state["server"] = server
        state["history"].append({"at": _now(), "action": "start", "port": port})
        deadline = time.monotonic() + ready_timeout
        while not self.server_ready(server):
            if time.monotonic() > deadline or not process_alive(server):
                stop_tree(server, timeout=10)
                state["server"] = None
                raise ServingError(
                    f"the server of endpoint {self.name!r} did not become ready on port {port}.\n"
                    f"server log {log_path}:\n{_log_tail(str(log_path))}",
                    fix="fix the cause in the server log (a port in use, an empty API key, a bad deployments file).",
                )
            time.sleep(0.5)
        return server

    def stop(self) -> None:
        """Stop the endpoint's server (its deployments file and history are kept)."""
        with self.locked() as state:
            stop_tree(state.get("server"), timeout=15)
            state["server"] = None
            state["history"].append({"at": _now(), "action": "stop"})


class MultiModelDeployOperator(BaseOperator):
    """Deploy a registered model version onto a shared multi-model endpoint, where it answers under
    ``/models/<model_name>/predict`` and ``/predict_batch``.

    It records the version in the endpoint's deployments file (atomically, under a lock), starts the
    endpoint's server when none runs (``bentoml serve`` of :mod:`airflow_mlops.ml.multi_service`; its
    process identity is recorded, as for :class:`~airflow_mlops.operators.serving.BentoDeployOperator`),
    then waits until the model answers on the endpoint at that version (the server loads it, verifying its
    signed record and files). A version that does not come up is taken out of the deployments file again
    (the version deployed before, if any, is put back) and the task fails with the server's reason; the
    other models of the endpoint are not touched. Deploying onto an endpoint whose server runs with other
    connections or Feast settings is refused. The wait happens in the task (a model loads in about a
    second, a new server starts in 20-40 s), so the operator does not defer.

    A dedicated operator rather than ``BentoDeployOperator(target="multi_model")``: that operator's whole
    life is a blue/green (and shadow, canary) switch of one model behind a router, with a pending and an
    active server per deployment; onto a shared endpoint, a deploy is an entry in a file and a wait for one
    model, with no router, no second server and nothing to drain. Sharing its ``execute`` would mean a
    branch in every step of it; the pieces both need (the server's environment, process identity, the
    signature and integrity checks) are shared functions of :mod:`airflow_mlops.operators.serving`.

    :param model_name: registry name (templated).
    :param endpoint: name of the endpoint (templated); several lifecycles deploying onto the same name
        share one server.
    :param version: version to serve; default the registry's ``production`` version now (templated). The
        endpoint keeps serving this version until the next deploy.
    :param port: port of the endpoint's server when this deploy starts it (default: a free one); a running
        server keeps its port (the result gives its URL).
    :param memory_budget_mb: memory budget of the endpoint's loaded models; default ``[mlops]
        multi_model_memory_budget_mb``. Written to the deployments file: it applies to the running server.
    :param feast_repo_path: Feast repository for online features (templated).
    :param feast_conn_id: optional ``feast`` connection of the online store.
    :param feature_service: Feast feature service of this model; default the one recorded with the version.
    :param bentoml_conn_id: optional ``bentoml`` connection; its password becomes the endpoint's API key.
    :param ready_timeout: seconds the server may take to start and the model to load.
    :param serve_env: extra environment for the server when this deploy starts it.
    """

    template_fields: Sequence[str] = ("model_name", "endpoint", "version", "feast_repo_path")
    ui_color = "#fde8c8"

    def __init__(
        self,
        *,
        model_name: str,
        endpoint: str,
        version: str | None = None,
        port: int | None = None,
        memory_budget_mb: float | None = None,
        feast_repo_path: str | None = None,
        feast_conn_id: str | None = None,
        feature_service: str | None = None,
        bentoml_conn_id: str | None = None,
        ready_timeout: float = 300.0,
        serve_env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.endpoint = endpoint
        self.version = version
        self.port = port
        self.memory_budget_mb = memory_budget_mb
        self.feast_repo_path = feast_repo_path
        self.feast_conn_id = feast_conn_id
        self.feature_service = feature_service
        self.bentoml_conn_id = bentoml_conn_id
        self.ready_timeout = ready_timeout
        self.serve_env = serve_env

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    def resolve(self) -> str:
        """The version to deploy, after the checks the single-model deploy makes before starting anything."""
        index = self.hook.read_index(self.model_name)
        version = self.version or self.hook.production_version(self.model_name, index)
        if not version:
            raise ModelRegistryError(
                f"model {self.model_name!r} has no production version to deploy.",
                fix="pass version= or promote a version first.",
            )
        check_signature(self.hook.version_record(index, version), version)
        self.hook.model_dir(self.model_name, version)  # refuse a tampered model before anything changes
        return version

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_mlops.config import load_serving_settings

        check_api_key(self.hook)
        version = self.resolve()
        budget = float(self.memory_budget_mb or load_serving_settings().multi_model_memory_budget_mb)
        endpoint = MultiModelEndpoint(self.hook, self.endpoint)
        run_key = f"{context['ti'].dag_id}/{context['run_id']}/{context['ti'].task_id}"
        settings = {
            "bentoml_conn_id": self.bentoml_conn_id,
            "feast_repo": self.feast_repo_path,
            "feast_conn_id": self.feast_conn_id,
            "memory_budget_mb": budget,
        }
        with endpoint.locked() as state:
            previous = register_deployment(
                endpoint.deployments,
                endpoint.name,
                self.model_name,
                version,
                feature_service=self.feature_service,
                memory_budget_mb=budget,
                by=run_key,
            )
            try:
                server = endpoint.ensure_server(
                    state,
                    port=self.port,
                    settings={**settings, "env": self.serve_env},
                    ready_timeout=float(self.ready_timeout),
                )
            except BaseException:
                restore_deployment(endpoint.deployments, self.model_name, previous)
                raise
        self.log.info(
            "Endpoint %s runs at %s; waiting for %s:%s",
            endpoint.name,
            server["url"],
            self.model_name,
            version,
        )
        answered, seen = self.wait_for_model(server, version)
        with endpoint.locked() as state:
            if not answered:
                restore_deployment(endpoint.deployments, self.model_name, previous)
                state["history"].append(
                    {
                        "at": _now(),
                        "action": "deploy-failed",
                        "model": self.model_name,
                        "version": version,
                        "by": run_key,
                    }
                )
                raise ServingError(
                    f"version {version} of {self.model_name!r} did not answer on endpoint {endpoint.name!r} "
                    f"({seen}); the endpoint serves what it served before.",
                    fix="fix the cause named above (a refused model, a missing feature service), then deploy again.",
                )
            state["history"].append(
                {
                    "at": _now(),
                    "action": "deploy",
                    "model": self.model_name,
                    "version": version,
                    "by": run_key,
                }
            )
        url = f"{server['url']}/models/{self.model_name}"
        self.log.info("%s:%s answers at %s/predict", self.model_name, version, url)
        return {
            "endpoint": endpoint.name,
            "url": url,
            "server_url": server["url"],
            "model": self.model_name,
            "version": version,
            "server_pid": server["pid"],
        }

    def wait_for_model(self, server: dict[str, Any], version: str) -> tuple[bool, str]:
        """Ask the endpoint for the model (``GET /models/<name>`` loads it) until it answers at ``version``;
        ``(False, why)`` when it is refused (at once) or does not in ``ready_timeout``."""
        import httpx

        key = self.hook.api_key
        headers = {"X-API-Key": key} if key else {}
        deadline = time.monotonic() + float(self.ready_timeout)
        seen = ""
        while time.monotonic() < deadline and process_alive(server):
            try:
                response = httpx.get(f"{server['url']}/models/{self.model_name}", headers=headers, timeout=60)
            except httpx.HTTPError as err:
                seen = f"{type(err).__name__}: {err}"
            else:
                body = (
                    response.json()
                    if response.headers.get("content-type", "").startswith("application/json")
                    else {}
                )
                if response.status_code == 200 and body.get("version") == version:
                    return True, ""
                seen = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code == 401 or (
                    response.status_code == 503 and "is not served" in response.text
                ):
                    return False, seen  # a wrong key, a refused model: waiting changes nothing
            time.sleep(0.3)
        return False, seen or "the server stopped"
