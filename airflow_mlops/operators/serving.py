"""Package a registered model as a Bento and serve it with blue/green deploys.

* :class:`BentoBuildOperator` builds a Bento (service code, the model from the registry, a generated
  ``bentofile.yaml``) in a build context kept under ``<state_dir>/bentos/<bento>/<version>/``, copies the
  Bento's generated ``Dockerfile`` into that context, and containerizes only when a Docker engine answers.
* :class:`BentoDeployOperator` puts a version behind a deployment's stable address. Target ``local``
  (the embedded default, :class:`LocalDeploymentTarget`): the new version starts with ``bentoml serve`` as a
  detached process on its own port beside the old one; once its readiness probe answers
  (:class:`~airflow_mlops.triggers.serving.BentoEndpointTrigger`, deferrable) the deployment's reverse
  proxy (:mod:`airflow_mlops.ml.router`) is switched by an atomic rename of its routes file, the old
  version is drained (no request in flight) and stopped. Deploying the live version again does nothing.
  With ``strategy="shadow"`` the new version starts beside the live one and gets a copy of every live
  request instead (its answers are logged, never returned; the live version keeps all traffic); a later
  blue/green deploy switches as usual and stops the shadow. :class:`~airflow_mlops.operators.shadow.ShadowReportOperator`
  compares the two from the prediction log.
* :class:`BentoRollbackOperator` deploys the previous version the same way.

Deployment state lives in the shared state database (:mod:`airflow_mlops.hooks.state`, namespace
``deployment``, changed in transactions); the router's routes and the server logs in
``<state_dir>/deployments/``. Other targets (Kubernetes, SageMaker) implement
:class:`DeploymentTarget`; see ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_mlops.exceptions import MLOpsArgumentError, ServingError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError, check_model_name
from airflow_mlops.net import free_port

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_mlops.hooks.state import MLOpsStateHook

SERVICE_IMPORT = "airflow_mlops.ml.service:ModelService"
#: distributions the Bento's image installs (pinned to the versions installed here)
BENTO_PACKAGES = (
    "bentoml",
    "apache-airflow-task-sdk",
    "scikit-learn",
    "skops",
    "lightgbm",
    "pandas",
    "numpy",
    "pyarrow",
    "pydantic",
    "httpx",
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _bento_executable() -> str:
    candidate = Path(sys.executable).with_name("bentoml")
    return str(candidate) if candidate.exists() else "bentoml"


def _installed(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution}=={version(distribution)}"
    except PackageNotFoundError:
        return None


def docker_available() -> bool:
    """Whether a Docker engine answers here (``docker info``)."""
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


#: Variables the model server, its build and the router inherit from the worker; a trailing ``*`` matches a
#: prefix. Everything else (Airflow's JWT secret and fernet key, the metadata-DB URL, other connections,
#: cloud keys) stays with the worker. ``[mlops] serving_env_allow`` adds names (docs/security.md).
SERVING_ENV_ALLOW: tuple[str, ...] = (
    # the process itself: where programs, the user's home, the locale and the time zone are
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    # Python and the virtualenv the worker runs in
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONPYCACHEPREFIX",
    "PYTHONUNBUFFERED",
    # threads of the numeric libraries
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    # the installation's configuration file (the server reads [mlops] and [logging] from it)
    "AIRFLOW_HOME",
    "AIRFLOW_CONFIG",
    # our own settings and the variables a Feast repository of ours names
    "AIRFLOW__MLOPS__*",
    "AIRFLOW_MLOPS_*",
    "MLOPS_*",
    # BentoML's own settings (not BentoCloud's tokens)
    "BENTOML_HOME",
    "BENTOML_CONFIG",
    "BENTOML_CONFIG_OPTIONS",
    "BENTOML_DO_NOT_TRACK",
    "BENTOML_DEBUG",
    "BENTOML_QUIET",
    # proxies and the certificates to trust
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)

#: Cloud variables passed only when the artifact store is on that cloud: the server reads the registry and
#: writes the prediction log there, through the ``[mlops] artifact_conn_id`` connection, which may rely on
#: the ambient credentials of the worker (a profile, a web-identity token, a key file).
CLOUD_ENV_FOR_SCHEME: dict[str, tuple[str, ...]] = {
    "s3": ("AWS_*",),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_*"),
    "gcs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_*"),
}


def _allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def _feast_variables(feast_repo: str | None) -> list[str]:
    """The ``${VAR}`` names the served Feast repository's ``feature_store.yaml`` uses (the server fills them
    in when it opens the online store, so it needs them)."""
    if not feast_repo:
        return []
    from airflow_mlops.hooks.feast import _VAR, FEATURE_STORE_YAML

    try:
        return _VAR.findall((Path(feast_repo) / FEATURE_STORE_YAML).read_text())
    except OSError:
        return []


def serving_env(
    hook: BentoMLHook,
    connections: Iterable[str | None] = (),
    *,
    store_access: bool = True,
    **serve: str | None,
) -> dict[str, str]:
    """Environment of a ``bentoml`` subprocess or the router: only what it needs, never the worker's whole
    environment.

    It holds the variables of :data:`SERVING_ENV_ALLOW` and ``[mlops] serving_env_allow`` found in the
    worker's environment, the cloud variables of the artifact store's scheme (:data:`CLOUD_ENV_FOR_SCHEME`),
    the variables the served Feast repository names, BentoML home inside the state folder with usage
    tracking off, the ``[mlops]`` settings, the request limits, ``MLOPS_SERVE_<KEY>`` for each non-empty
    ``serve`` entry, and each connection the server uses (``bentoml_conn_id``, ``feast_conn_id`` and the
    connections its extras ``registry_conn_id`` and ``ray_conn_id`` name, the artifact store's,
    ``connections``, :meth:`BentoMLHook.server_environment`) as ``AIRFLOW_CONN_<ID>``, so
    the server reads them without access to Airflow's metadata database or secrets backend. With
    ``store_access=False`` (the router, which only forwards requests) neither connections nor cloud
    variables are passed.
    """
    from airflow_mlops.config import load_serving_settings

    settings = hook.store.settings
    limits = load_serving_settings()
    allow = [*SERVING_ENV_ALLOW, *limits.env_allow]
    if store_access:
        allow += CLOUD_ENV_FOR_SCHEME.get(settings.artifact_scheme, ())
    allow += _feast_variables(serve.get("feast_repo"))
    env = {name: value for name, value in os.environ.items() if _allowed(name, allow)}
    env.update(
        {
            "BENTOML_HOME": str(hook.home),
            "BENTOML_DO_NOT_TRACK": "True",
            "AIRFLOW__MLOPS__STATE_DIR": str(settings.state_dir),
            "AIRFLOW__MLOPS__ARTIFACT_ROOT": settings.artifact_root,
            "AIRFLOW__MLOPS__OFFLINE_ROOT": settings.offline_root,
            "AIRFLOW__MLOPS__LANDING_ROOT": settings.landing_root,
            "MLOPS_SERVE_MAX_ROWS": str(limits.max_rows),
            "MLOPS_SERVE_MAX_BODY_BYTES": str(limits.max_body_bytes),
            # [mlops] shadow_cpu, read by a shadow's server and by the router's shadow sender
            "MLOPS_SHADOW_CPU": limits.shadow_cpu,
        }
    )
    if settings.artifact_conn_id:
        env["AIRFLOW__MLOPS__ARTIFACT_CONN_ID"] = settings.artifact_conn_id
    serve = {**serve, "feast_conn_id": _served_feast_conn_id(hook, serve)}
    for key, value in serve.items():
        if value:
            env[f"MLOPS_SERVE_{key.upper()}"] = str(value)
    conn_ids = {serve.get("bentoml_conn_id"), serve.get("feast_conn_id"), settings.artifact_conn_id}
    if not store_access:
        return env
    if serve.get("feast_conn_id"):
        # the connections the feast connection names: Feast's SQL registry, and the Ray cluster its batch
        # engine materializes on (the server's Feast configuration is built with that engine section)
        extra = hook.get_connection(serve["feast_conn_id"]).extra_dejson or {}
        conn_ids |= {extra.get("registry_conn_id"), extra.get("ray_conn_id")}
    for conn_id in sorted(c for c in {*conn_ids, *connections} if c):
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = hook.get_connection(conn_id).as_json()
    env.update(hook.server_environment())
    return env


def _served_feast_conn_id(hook: BentoMLHook, serve: dict[str, Any]) -> str | None:
    """The feast connection of the served repository: the one given, else the Feast operators' default
    (``feast_default``) when it exists, so that the server reads the registry and online store the
    training and materialization tasks used (a SQL registry, Redis), not a file of its own state folder."""
    if serve.get("feast_conn_id") or not serve.get("feast_repo"):
        return serve.get("feast_conn_id")
    from airflow.sdk.exceptions import AirflowNotFoundException

    from airflow_mlops.hooks.feast import FeastHook

    try:
        hook.get_connection(FeastHook.default_conn_name)
    except AirflowNotFoundException:
        return None
    return FeastHook.default_conn_name


def check_api_key(hook: BentoMLHook) -> None:
    """Refuse to serve with an API key configured (a ``bentoml`` connection) but empty: the service would
    answer anyone, silently.

    :raises ServingAuthError: naming the connection and the two ways out.
    """
    if hook.bentoml_conn_id and not (hook.api_key or "").strip():
        raise ServingAuthError(
            f"connection {hook.bentoml_conn_id!r} sets the served endpoint's API key, but its password is "
            "empty: the endpoint would answer requests without any key.",
            fix=f"set the password of connection {hook.bentoml_conn_id!r} to the API key clients must send, "
            "or deploy without bentoml_conn_id to serve without an API key on purpose.",
        )


class ServingAuthError(ServingError, AirflowFailException):
    """Serving was configured with an API key that is empty; nothing is started (retrying cannot help)."""


def check_signature(record: dict[str, Any], version: str) -> None:
    """Refuse a version registered without a valid signature: the service could not describe its requests.

    :raises SignatureError: naming the version and how to register it with one.
    """
    from airflow_mlops.ml.signature import SignatureError, signature_of

    tag = record.get("tag") or version
    try:
        signature_of(record, tag=tag)
    except SignatureError as err:
        raise SignatureError(
            f"version {version!r} cannot be served: {err.problem}",
            fix=err.fix or "register it again with RegisterModelOperator.",
        ) from None


# ---------------------------------------------------------------------------------------------- build
class BentoBuildOperator(BaseOperator):
    """Build a Bento that serves one registered model version; returns its tag.

    The build context (``<state_dir>/bentos/<bento_name>/<version>/``) holds the service code, the
    generated ``bentofile.yaml`` and, after the build, the Bento's ``Dockerfile``. Building the same
    version again returns the existing Bento. The image is built only when a Docker engine is present.

    :param model_name: registry name (templated).
    :param version: registered version; default the registry's ``production`` version (templated).
    :param bento_name: Bento name; default ``<model_name>-service``.
    :param containerize: build the container image: ``True``, ``False`` or ``None`` (when Docker is present).
    :param bentoml_conn_id: optional ``bentoml`` connection (BentoML home, API key).
    """

    template_fields: Sequence[str] = ("model_name", "version")
    ui_color = "#fde8c8"

    def __init__(
        self,
        *,
        model_name: str,
        version: str | None = None,
        bento_name: str | None = None,
        containerize: bool | None = None,
        bentoml_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.version = version
        self.bento_name = bento_name
        self.containerize = containerize
        self.bentoml_conn_id = bentoml_conn_id

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        index = self.hook.read_index(self.model_name)
        version = self.version or self.hook.production_version(self.model_name, index)
        if not version:
            raise ModelRegistryError(
                f"model {self.model_name!r} has no production version to build.",
                fix="pass version= or promote a version first.",
            )
        record = self.hook.version_record(index, version)
        check_signature(record, version)
        self.hook.model_dir(self.model_name, version, record)  # sha256 check; imports it if missing here
        bento_name = check_model_name(self.bento_name or f"{self.model_name}-service")
        tag = f"{bento_name}:{version}"
        context_dir = self.hook.store.settings.state_dir / "bentos" / bento_name / version
        bento_dir = self.hook.home / "bentos" / bento_name / version
        # the build imports the service, which reads the version's signature for the Bento's API schema
        env = serving_env(self.hook, model=self.model_name, version=version)
        if (bento_dir / "bento.yaml").exists():
            self.log.info("Bento %s already exists; not rebuilding", tag)
        else:
            self._write_context(context_dir, tag, record)
            result = subprocess.run(
                [
                    _bento_executable(),
                    "build",
                    str(context_dir),
                    "-f",
                    str(context_dir / "bentofile.yaml"),
                    "--name",
                    bento_name,
                    "--version",
                    version,
                    "-o",
                    "tag",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                cwd=context_dir,
            )
            if result.returncode != 0:
                raise ServingError(
                    f"bentoml build of {tag} failed: {(result.stderr or result.stdout)[-3000:]}",
                    fix=f"read the build context {context_dir} and fix the error above.",
                )
            self.log.info("Built Bento %s", tag)
        dockerfile = context_dir / "Dockerfile"
        shutil.copyfile(bento_dir / "env" / "docker" / "Dockerfile", dockerfile)
        image = None
        wanted = docker_available() if self.containerize is None else self.containerize
        if wanted:
            result = subprocess.run(
                [_bento_executable(), "containerize", tag, "-t", tag],
                env=env,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if result.returncode != 0:
                raise ServingError(
                    f"bentoml containerize {tag} failed: {(result.stderr or result.stdout)[-3000:]}",
                    fix="check that the Docker engine is running and can pull the base image.",
                )
            image = tag
        else:
            self.log.info("No Docker engine here: image not built (Dockerfile at %s)", dockerfile)
        return {
            "tag": tag,
            "model": record["tag"],
            "version": version,
            "build_context": str(context_dir),
            "dockerfile": str(dockerfile),
            "image": image,
        }

    def _write_context(self, context_dir: Path, tag: str, record: dict[str, Any]) -> None:
        import yaml

        import airflow_mlops

        shutil.rmtree(context_dir, ignore_errors=True)
        context_dir.mkdir(parents=True)
        package = Path(airflow_mlops.__file__).parent
        shutil.copytree(
            package,
            context_dir / "airflow_mlops",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "plugins", "demo"),
        )
        packages = [p for p in (_installed(d) for d in BENTO_PACKAGES) if p]
        if record.get("feature_service"):
            packages += [p for p in (_installed("feast"),) if p]
        bentofile = {
            "service": SERVICE_IMPORT,
            "description": f"airflow-mlops service of registered model {record['tag']}",
            "labels": {
                "model": self.model_name,
                "model-version": record["version"],
                "built-by": "airflow-mlops",
            },
            "include": ["airflow_mlops/**/*.py"],
            "models": [record["tag"]],
            "envs": [
                {"name": "MLOPS_SERVE_MODEL", "value": self.model_name},
                {"name": "MLOPS_SERVE_VERSION", "value": record["version"]},
            ],
            "python": {"packages": packages, "lock_packages": False},
            "docker": {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
        }
        (context_dir / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False))


# ---------------------------------------------------------------------------------------------- processes
_CHILDREN: dict[int, subprocess.Popen] = {}
log = logging.getLogger(__name__)

#: a process given as its pid (a child of this process), or as a record holding ``pid`` and the
#: ``process`` identity :func:`identify` took when it started (a backend or router of the state file)
ProcessRef = int | dict[str, Any] | None
NO_PROCESS = "no process recorded"


def identify(pid: int) -> dict[str, Any] | None:
    """``{"pid", "create_time", "exe", "cmdline"}`` of a running process, recorded when we start it so that a
    later stop can tell it from another process that got the same pid after it exited; None when it is gone.

    A later check compares the start time and the executable, not the command line: ``bentoml serve``'s
    process manager (circus) retitles itself with ``setproctitle`` once it runs, which rewrites what
    ``/proc/<pid>/cmdline`` shows. The command line is kept to name the process in messages."""
    import psutil

    try:
        process = psutil.Process(pid)
        cmdline, deadline = process.cmdline(), time.monotonic() + 2
        while not cmdline and time.monotonic() < deadline:  # read right after exec, it can still be empty
            time.sleep(0.01)
            cmdline = process.cmdline()
        return {"pid": pid, "create_time": process.create_time(), "exe": process.exe(), "cmdline": cmdline}
    except psutil.Error:
        return None


def _verified(ref: ProcessRef) -> tuple[Any, str]:
    """``(psutil.Process, "")`` when ``ref`` still names the process it was recorded for, else
    ``(None, why not)``. A pid alone is trusted only for a child of this process not yet reaped (its pid
    cannot have been given to another process); a record only when start time and executable match."""
    import psutil

    if isinstance(ref, dict):
        pid, identity = ref.get("pid"), ref.get("process")
    else:
        pid, identity = ref, None
    if not pid:
        return None, NO_PROCESS
    try:
        process = psutil.Process(int(pid))
        if identity is None:
            child = _CHILDREN.get(int(pid))
            if isinstance(ref, dict) or (child is None and process.ppid() != os.getpid()):
                return None, (
                    f"pid {pid} was recorded without the identity of its process (start time, executable), "
                    "so it cannot be told apart from another process that got the same pid"
                )
            if child is not None and child.poll() is not None:
                return None, f"pid {pid} has exited"
            return process, ""
        same_start = abs(process.create_time() - float(identity.get("create_time") or 0)) < 0.01
        if not same_start or process.exe() != identity.get("exe"):
            return None, (
                f"pid {pid} now belongs to another process ({' '.join(process.cmdline())[:200]!r}, started "
                f"{datetime.fromtimestamp(process.create_time(), UTC).isoformat()}); the recorded one "
                f"({' '.join(identity.get('cmdline') or [])[:200]!r}) has exited"
            )
        return process, ""
    except psutil.NoSuchProcess:
        return None, f"pid {pid} has exited"
    except psutil.Error as err:
        return None, f"pid {pid} cannot be inspected ({type(err).__name__})"


def process_alive(ref: ProcessRef) -> bool:
    """Whether the process ``ref`` names runs (a child of ours that exited, not yet reaped, does not; nor
    does another process that got a recorded pid)."""
    import psutil

    process, _ = _verified(ref)
    if process is None:
        return False
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_detached(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start ``command`` in its own session (it outlives the task), output appended to ``log_path``.
    Record its :func:`identify` with the pid wherever it is kept for a later :func:`stop_tree`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log_path.parent,
        )
    _CHILDREN[process.pid] = process
    return process.pid


def stop_tree(ref: ProcessRef, timeout: float = 30.0) -> bool:
    """Stop a process and everything it started: SIGTERM (graceful), then SIGKILL after ``timeout``.

    The process is checked first (:func:`_verified`): a pid that now belongs to another process is never
    signalled; a warning says which pid was left alone and why. ``bentoml serve`` runs its workers in
    sessions of their own, so they are collected before the stop. Returns whether something was stopped.
    """
    import psutil

    pid = ref.get("pid") if isinstance(ref, dict) else ref
    root, why = _verified(ref)
    if root is None:
        if why not in (NO_PROCESS, f"pid {pid} has exited"):
            log.warning("Not stopping pid %s: %s. Nothing was signalled.", pid, why)
        _CHILDREN.pop(int(pid or 0), None)
        return False
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        tree = []
    for process in tree[:1]:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    child = _CHILDREN.pop(int(pid), None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- targets
class DeploymentTarget:
    """Where a deployment runs. A target starts a version beside the live one (:meth:`start`), says
    where to probe it (:meth:`probe_url`), moves traffic (:meth:`switch`) and stops what is no longer
    needed (:meth:`retire`). See ``docs/serving.md`` for the Kubernetes and SageMaker mappings."""

    name = "abstract"

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def switch(self, deployment: str) -> dict[str, Any]:
        raise NotImplementedError


def router_host() -> str:
    """``[mlops] serving_router_host``: the address a deployment's router (its stable endpoint) listens
    on and is announced at in the deploy's ``url``; default ``127.0.0.1``, this host only. Set it to the
    serving host's own address for other hosts to reach the endpoint (``0.0.0.0`` listens everywhere but
    announces ``127.0.0.1``)."""
    return (conf.get("mlops", "serving_router_host", fallback="") or "").strip() or "127.0.0.1"


class LocalDeploymentTarget(DeploymentTarget):
    """Blue/green on this machine: ``bentoml serve`` processes behind :mod:`airflow_mlops.ml.router`.

    :param hook: the BentoML hook (registry, BentoML home, settings).
    :param drain_timeout: seconds to wait for requests in flight on the old version before stopping it.
    """

    name = "local"

    def __init__(self, hook: BentoMLHook, drain_timeout: float = 30.0) -> None:
        self.hook = hook
        self.drain_timeout = drain_timeout

    @property
    def folder(self) -> Path:
        return self.hook.store.settings.state_dir / "deployments"

    def state_path(self, deployment: str) -> Path:
        return self.folder / f"{check_model_name(deployment)}.json"

    def routes_path(self, deployment: str) -> Path:
        return self.folder / f"{check_model_name(deployment)}.routes.json"

    @cached_property
    def state_store(self) -> MLOpsStateHook:
        """The shared state database holding the deployments' state (namespace ``deployment``)."""
        from airflow_mlops.hooks.state import MLOpsStateHook

        return MLOpsStateHook()

    def _empty_state(self, deployment: str) -> dict[str, Any]:
        return {
            "name": deployment,
            "target": self.name,
            "router": None,
            "active": None,
            "previous": None,
            "pending": None,
            "history": [],
        }

    def read_state(self, deployment: str) -> dict[str, Any]:
        """The deployment's state as committed in the state database (a ``<deployment>.json`` a former
        release left in the state folder is imported once)."""
        from airflow_mlops.hooks.state import read_legacy_json

        legacy = read_legacy_json(self.state_path(deployment))
        return self.state_store.get("deployment", deployment, legacy=legacy) or self._empty_state(deployment)

    @contextlib.contextmanager
    def locked(self, deployment: str) -> Iterator[dict[str, Any]]:
        """Read-modify-write of a deployment's state in one transaction of the state database (written when
        the block ends, also when it raises, so started processes are never forgotten)."""
        from airflow_mlops.hooks.state import read_legacy_json

        with self.state_store.locked(
            "deployment",
            check_model_name(deployment),
            default=lambda: self._empty_state(deployment),
            legacy=read_legacy_json(self.state_path(deployment)),
            write_on_error=True,
        ) as state:
            yield state

    # -- router ----------------------------------------------------------------------------------
    def router_status(self, router: dict[str, Any] | None) -> dict[str, Any] | None:
        import httpx

        if not router or not process_alive(router):
            return None
        try:
            response = httpx.get(router["url"] + "/__router__", timeout=5)
        except httpx.HTTPError:
            return None
        status = response.json() if response.status_code == 200 else None
        if status is not None and status.get("pid") != router.get("pid"):
            # another router answers at this address (another deployment's, or one left running by an
            # earlier state folder): this router is not serving, whatever that one says
            return None
        return status

    def ensure_router(self, state: dict[str, Any], port: int) -> dict[str, Any]:
        if self.router_status(state.get("router")):
            return state["router"]
        stop_tree(state.get("router"), timeout=5)
        routes = self.routes_path(state["name"])
        if not routes.exists():
            _write_json_atomic(routes, {"active": None, "generation": 0})
        host = router_host()
        pid = start_detached(
            [sys.executable, "-m", "airflow_mlops.ml.router", "--host", host, "--port", str(port)]
            + ["--routes", str(routes)],
            serving_env(self.hook, store_access=False),  # it only forwards requests
            self.folder / "logs" / f"{state['name']}-router.log",
        )
        reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"
        router = {"pid": pid, "process": identify(pid), "port": port, "url": url}
        deadline = time.monotonic() + 30
        while not self.router_status(router):
            if time.monotonic() > deadline or not process_alive(router):
                stop_tree(router, timeout=5)
                raise ServingError(
                    f"the router of deployment {state['name']!r} did not start on port {port}.",
                    fix=f"free the port or choose another one; see {self.folder / 'logs'}.",
                )
            time.sleep(0.2)
        state["router"] = router
        return router

    # -- backends --------------------------------------------------------------------------------
    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start a backend for ``spec`` (``version``, ``bento`` or None, serve settings); not yet routed."""
        port = free_port()
        target = spec.get("bento") or SERVICE_IMPORT
        env = serving_env(
            self.hook,
            model=spec["model"],
            version=spec["version"],
            feature_service=spec.get("feature_service"),
            feast_repo=spec.get("feast_repo"),
            feast_conn_id=spec.get("feast_conn_id"),
            bentoml_conn_id=spec.get("bentoml_conn_id"),
        )
        env.update({k: str(v) for k, v in (spec.get("env") or {}).items()})
        log_path = self.folder / "logs" / f"{spec['deployment']}-{spec['version']}-{port}.log"
        pid = start_detached(
            [_bento_executable(), "serve", target, "--host", "127.0.0.1", "--port", str(port)], env, log_path
        )
        return {
            **spec,
            "pid": pid,
            "process": identify(pid),  # checked before any later stop: the pid may be another's by then
            "port": port,
            "url": f"http://127.0.0.1:{port}",
            "log": str(log_path),
            "started_at": _now(),
        }

    def switch(
        self,
        deployment: str,
        backend: dict[str, Any],
        router: dict[str, Any],
        standby: dict[str, Any] | None = None,
        shadow: dict[str, Any] | None = None,
        canary: dict[str, Any] | None = None,
        canary_weight: float | None = None,
    ) -> int:
        """Point the stable address at ``backend``: atomic rename of the routes file, then wait until the
        router has seen it. ``standby`` (the version that served before, until it is drained) takes the
        requests ``backend`` refuses or drops; ``shadow`` gets a copy of every request (its answers are
        dropped); ``canary`` gets ``canary_weight`` percent of the requests (``backend`` answers those it
        fails). Routes written without ``shadow`` or ``canary`` stop the mirroring or the split. Returns the
        routes' new generation (the router's per-backend figures start afresh with it)."""
        routes_path = self.routes_path(deployment)
        current = json.loads(routes_path.read_text()) if routes_path.exists() else {"generation": 0}
        generation = int(current.get("generation") or 0) + 1
        routes = {"active": backend["url"], "version": backend["version"], "generation": generation}
        if standby and standby.get("url") != backend["url"]:
            routes["standby"] = standby["url"]
        if shadow and shadow.get("url") != backend["url"]:
            routes["shadow"] = shadow["url"]
            routes["shadow_version"] = shadow["version"]
        if canary and canary.get("url") != backend["url"]:
            routes["canary"] = canary["url"]
            routes["canary_version"] = canary["version"]
            routes["canary_weight"] = float(canary_weight or 0)
        _write_json_atomic(routes_path, routes)
        deadline = time.monotonic() + 30
        while True:
            status = self.router_status(router)
            if status and status["generation"] >= generation:
                return generation
            if time.monotonic() > deadline:
                raise ServingError(
                    f"the router of deployment {deployment!r} did not pick up the switch to {backend['url']}.",
                    fix=f"see the router log in {self.folder / 'logs'}.",
                )
            time.sleep(0.05)

    def drain_and_stop(self, backend: dict[str, Any] | None, router: dict[str, Any]) -> None:
        """Wait until no request is in flight on ``backend`` (bounded by ``drain_timeout``), then stop it."""
        if not backend:
            return
        deadline = time.monotonic() + self.drain_timeout
        quiet = 0
        while quiet < 3 and time.monotonic() < deadline:
            status = self.router_status(router) or {"inflight": {}}
            quiet = quiet + 1 if not status["inflight"].get(backend["url"]) else 0
            time.sleep(0.05)
        stop_tree(backend, timeout=self.drain_timeout)

    def backend_ready(self, backend: dict[str, Any] | None) -> bool:
        from airflow_mlops.sensors.serving import probe

        return bool(backend) and process_alive(backend) and probe(backend["url"])[0]

    def still_serving(self, backend: dict[str, Any], checks: int = 3, every: float = 0.5) -> bool:
        """Whether ``backend`` keeps running and ready for ``checks`` probes ``every`` seconds apart (after
        traffic moved to it, before the version it replaced is stopped)."""
        for _ in range(checks):
            if not self.backend_ready(backend):
                return False
            time.sleep(every)
        return self.backend_ready(backend)

    def teardown(self, deployment: str) -> None:
        """Stop everything of a deployment (router, live and pending versions); its history is kept."""
        with self.locked(deployment) as state:
            for key in ("pending", "active", "shadow", "canary"):
                stop_tree(state.get(key), timeout=15)
                if state.get(key):
                    state[key]["pid"] = None
            stop_tree(state.get("router"), timeout=15)
            state["router"] = None
            state["history"].append({"at": _now(), "action": "teardown"})


#: what a canary's state entry holds besides its backend's fields
CANARY_FIELDS = frozenset(
    {
        "run_key",
        "steps",
        "step",
        "weight",
        "generation",
        "since",
        "step_minutes",
        "guardrails",
        "production_version",
        "figures",
    }
)


class CanaryRollbackError(ServingError, AirflowFailException):
    """A canary breached a guardrail: it was rolled back (the old version serves all traffic) and the deploy
    fails with the figures; a retry would only deploy the same version again."""


async def _first_event(trigger: Any) -> dict[str, Any]:
    """The payload of the first event ``trigger`` yields (a trigger's wait run in the task's process)."""
    async for event in trigger.run():
        return dict(event.payload)
    raise ServingError(f"{type(trigger).__name__} ended without an event.")


def _log_tail(path: str | None, lines: int = 40) -> str:
    if not path or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- deploy
def check_canary(steps: Sequence[float], step_minutes: float, guardrails: dict[str, Any] | None) -> None:
    """Refuse canary settings that cannot work: steps not increasing within (0, 100] or none below 100, a
    step that is not a positive number of minutes, an unknown guardrail.

    :raises MLOpsArgumentError: naming the setting and what to write instead.
    """
    from airflow_mlops.ml.canary import Guardrails

    try:
        weights = [float(x) for x in steps]
    except (TypeError, ValueError):
        weights = []
    if (
        not weights
        or any(not 0 < w <= 100 for w in weights)
        or any(b <= a for a, b in zip(weights, weights[1:], strict=False))
        or weights[0] >= 100
    ):
        raise MLOpsArgumentError(
            f"canary_steps {list(steps)!r} are not increasing percentages in (0, 100] starting below 100.",
            fix="give the canary's share of the traffic per step, e.g. [10, 50, 100].",
        )
    try:
        minutes = float(step_minutes)
    except (TypeError, ValueError):
        minutes = 0.0
    if not minutes > 0:
        raise MLOpsArgumentError(
            f"step_minutes={step_minutes!r} is not a positive number.", fix="give e.g. 5 (fractions allowed)."
        )
    Guardrails.parse(guardrails)


class BentoDeployOperator(BaseOperator):
    """Deploy a registered model version behind a stable address, blue/green, without dropping requests.

    Deploying the version that is already live (and ready) is a no-op. On failure to become ready the new
    version is stopped and the old one keeps serving. A version registered without a signature is refused
    before anything starts (:class:`~airflow_mlops.ml.signature.SignatureError`): the service builds its
    request and answer schemas from it.

    :param model_name: registry name (templated).
    :param version: version to serve; default the registry's ``production`` version (templated).
    :param bento_tag: Bento to serve (from :class:`BentoBuildOperator`); default the service module with the
        model from the registry (templated).
    :param deployment_name: name of the deployment; default ``model_name``.
    :param target: ``local`` (this machine). Kubernetes / SageMaker targets: see ``docs/serving.md``.
    :param port: port of the stable address (local target).
    :param feast_repo_path: Feast repository for online features (templated).
    :param feast_conn_id: optional ``feast`` connection of the online store.
    :param bentoml_conn_id: optional ``bentoml`` connection; its password becomes the endpoint's API key
        (an empty password fails the task before anything starts: :class:`ServingAuthError`).
    :param ready_timeout: seconds the new version may take to become ready.
    :param drain_timeout: seconds to wait for the old version's requests in flight.
    :param serve_env: extra environment for the server (e.g. ``MLOPS_SERVE_LOG_FLUSH_SECONDS``).
    :param deferrable: wait for readiness in the triggerer; default ``[operators] default_deferrable``.
    :param strategy: ``blue_green`` (default): the new version takes all traffic once ready, and a shadow
        version running (if any) is stopped. ``shadow``: the new version starts beside the live one, which
        keeps all traffic, and the router sends it a copy of every request; its answers are written to the
        prediction log marked ``shadow`` and never returned (compare them with
        :class:`~airflow_mlops.operators.shadow.ShadowReportOperator`). A new shadow replaces the previous
        one; the live version cannot shadow itself. ``canary``: the new version starts beside the live one
        and gets ``canary_steps[0]`` percent of the requests (the live version answers the rest, and any
        request the canary refuses or fails); after ``step_minutes`` (waited deferred,
        :class:`~airflow_mlops.triggers.serving.CanaryStepTrigger`) the ``guardrails`` compare the two on the
        traffic each got (:mod:`airflow_mlops.ml.canary`: error rate, p99 latency, distribution of the
        predictions). A breach routes all traffic back to the live version, stops the canary and fails the
        task with the figures (:class:`CanaryRollbackError`); a pass moves to the next step; after the last
        step (100 or the end of the list) the switch completes as blue/green. The figures of each step are in
        the result (``canary_steps``) and the deployment's history. Rerunning the task while its canary runs
        resumes the current step. With nothing live yet, the deploy is blue/green.
    :param canary_steps: canary weights in percent, increasing, each in (0, 100]; default ``[10, 50, 100]``.
    :param step_minutes: minutes each canary step lasts before it is judged (fractions allowed).
    :param guardrails: canary thresholds: ``max_error_rate_increase`` (0.01), ``max_p99_ratio`` (2.0),
        ``max_prediction_shift`` (0.2, the KS statistic), ``min_requests`` (0), ``min_latency_samples``
        (20), ``min_predictions`` (20); see :mod:`airflow_mlops.ml.canary`.
    """

    template_fields: Sequence[str] = ("model_name", "version", "bento_tag", "feast_repo_path")
    #: the values of ``strategy=``
    STRATEGIES = ("blue_green", "shadow", "canary")
    ui_color = "#fde8c8"

    def __init__(
        self,
        *,
        model_name: str,
        version: str | None = None,
        bento_tag: str | None = None,
        deployment_name: str | None = None,
        target: str = "local",
        port: int = 3000,
        feast_repo_path: str | None = None,
        feast_conn_id: str | None = None,
        bentoml_conn_id: str | None = None,
        ready_timeout: float = 300.0,
        drain_timeout: float = 30.0,
        serve_env: dict[str, str] | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        strategy: str = "blue_green",
        canary_steps: Sequence[float] = (10, 50, 100),
        step_minutes: float = 5.0,
        guardrails: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if strategy not in self.STRATEGIES:
            raise MLOpsArgumentError(
                f"unknown deployment strategy {strategy!r}.", fix=f"use one of {list(self.STRATEGIES)}."
            )
        check_canary(canary_steps, step_minutes, guardrails)
        if target != "local":
            raise MLOpsArgumentError(
                f"deployment target {target!r} is not available in this package.",
                fix="use target='local'; Kubernetes and SageMaker targets plug in as described in docs/serving.md.",
            )
        self.model_name = model_name
        self.version = version
        self.bento_tag = bento_tag
        self.deployment_name = deployment_name
        self.target = target
        self.port = port
        self.feast_repo_path = feast_repo_path
        self.feast_conn_id = feast_conn_id
        self.bentoml_conn_id = bentoml_conn_id
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.serve_env = serve_env
        self.deferrable = deferrable
        self.strategy = strategy
        self.canary_steps = list(canary_steps)
        self.step_minutes = step_minutes
        self.guardrails = guardrails

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    @cached_property
    def local(self) -> LocalDeploymentTarget:
        return LocalDeploymentTarget(self.hook, drain_timeout=self.drain_timeout)

    @property
    def deployment(self) -> str:
        return self.deployment_name or self.model_name

    def _bento_for(self, version: str) -> str | None:
        bento = self.bento_tag
        if bento and not bento.endswith(f":{version}"):
            raise MLOpsArgumentError(
                f"Bento {bento!r} does not serve version {version!r} of {self.model_name!r}.",
                fix="pass the tag BentoBuildOperator returned for this version, or leave bento_tag empty.",
            )
        return bento

    def resolve(self) -> dict[str, Any]:
        index = self.hook.read_index(self.model_name)
        version = self.version or self.hook.production_version(self.model_name, index)
        if not version:
            raise ModelRegistryError(
                f"model {self.model_name!r} has no production version to deploy.",
                fix="pass version= or promote a version first.",
            )
        record = self.hook.version_record(index, version)
        check_signature(record, version)  # the service builds its schemas from it: refuse before starting
        self.hook.model_dir(self.model_name, version)  # refuse a tampered model before starting anything
        return {"version": version, "bento": self._bento_for(version)}

    def execute(self, context: Context) -> dict[str, Any]:
        return self.deploy(self.resolve(), action="deploy", context=context)

    @staticmethod
    def run_key(context: Context) -> str:
        """``<dag_id>/<run_id>/<task_id>``: which task run made a history entry (a rerun recognises its own)."""
        return f"{context['ti'].dag_id}/{context['run_id']}/{context['ti'].task_id}"

    def deploy(self, what: dict[str, Any], *, action: str, context: Context) -> dict[str, Any]:
        check_api_key(self.hook)  # before anything starts: an empty key must not mean "no auth"
        shadow_mode = self.strategy == "shadow" and action == "deploy"
        canary_mode = self.strategy == "canary" and action == "deploy"
        run_key = self.run_key(context)
        with self.local.locked(self.deployment) as state:
            router = self.local.ensure_router(state, int(self.port))
            if self._canary_resumes(state, what, router, canary_mode):
                resume = True
            else:
                resume = False
                active = state.get("active")
                if canary_mode and not active:
                    self.log.info("Nothing is live yet to compare a canary with: deploying blue/green")
                    canary_mode = False
                if shadow_mode:
                    done = self._shadow_in_place(state, what, router)
                    if done is not None:
                        return done
                elif (
                    active
                    and active["version"] == what["version"]
                    and self.local.backend_ready(active)
                    and (self.local.router_status(router) or {}).get("active") == active["url"]
                ):
                    self.log.info(
                        "Version %s is already live at %s; nothing to do", active["version"], router["url"]
                    )
                    if state.get("shadow"):  # a blue/green deploy ends a shadow period
                        self.local.switch(self.deployment, active, router)
                        self._stop_shadow(state)
                    return self._result(state, switched=False)
                stop_tree(state.get("pending"), timeout=10)
                spec = {
                    "deployment": self.deployment,
                    "model": self.model_name,
                    "version": what["version"],
                    "bento": what.get("bento"),
                    "feast_repo": self.feast_repo_path,
                    "feast_conn_id": self.feast_conn_id,
                    "bentoml_conn_id": self.bentoml_conn_id,
                    "env": {
                        **(self.serve_env or {}),
                        **({"MLOPS_SERVE_SHADOW": "true"} if shadow_mode else {}),
                    },
                    "action": "shadow" if shadow_mode else "canary" if canary_mode else action,
                }
                state["pending"] = self.local.start(spec)
                self.log.info(
                    "Started %s %s on %s (pid %s); waiting for readiness",
                    self.model_name,
                    what["version"],
                    state["pending"]["url"],
                    state["pending"]["pid"],
                )
        if resume:
            return self._canary_wait(run_key)
        pending = state["pending"]
        if self.deferrable:
            from airflow_mlops.triggers.serving import BentoEndpointTrigger

            # the resumed task is a new instance: what complete() records travels in next_kwargs
            self.defer(
                trigger=BentoEndpointTrigger(url=pending["url"], timeout=float(self.ready_timeout)),
                method_name="execute_complete",
                kwargs={"run_key": run_key},
                timeout=timedelta(seconds=float(self.ready_timeout) + 120),
            )
        from airflow_mlops.sensors.serving import probe

        deadline = time.monotonic() + float(self.ready_timeout)
        seen = ""
        while True:
            ready, seen = probe(pending["url"])
            if ready:
                return self._continue(
                    self.complete({"status": "ready", "url": pending["url"]}, run_key), run_key
                )
            if time.monotonic() > deadline or not process_alive(pending):
                return self.complete(
                    {"status": "timeout", "url": pending["url"], "message": seen}, run_key=run_key
                )
            time.sleep(0.5)

    def execute_complete(
        self, context: Context, event: dict[str, Any], run_key: str | None = None
    ) -> dict[str, Any]:
        run_key = run_key or self.run_key(context)
        return self._continue(self.complete(event, run_key=run_key), run_key)

    def complete(self, event: dict[str, Any], run_key: str | None = None) -> dict[str, Any]:
        """Switch to the pending version if it became ready (state read from the state file and the event);
        the history entry records ``run_key``, the task run that made it."""
        with self.local.locked(self.deployment) as state:
            pending = state.get("pending")
            if not pending or pending["url"] != event.get("url"):
                raise ServingError(
                    f"deployment {self.deployment!r} has no pending version at {event.get('url')} any more "
                    "(another deploy replaced it).",
                    fix="rerun the deploy task.",
                )
            if event.get("status") != "ready":
                self._give_up(
                    state,
                    pending,
                    f"did not become ready ({event.get('message') or event.get('status')}); the live version "
                    "keeps serving",
                    fix="fix the cause in the server log (a refused model, a missing feature service, a port).",
                )
            router = self.local.ensure_router(state, int(self.port))
            if pending["action"] == "shadow":
                return self._complete_shadow(state, pending, router, run_key)
            if pending["action"] == "canary":
                return self._start_canary(state, pending, router, run_key)
            return self._switch_to(state, pending, router, run_key)

    def _give_up(self, state: dict[str, Any], pending: dict[str, Any], what: str, fix: str) -> NoReturn:
        """Stop the pending version, record its failure and fail the task with ``what`` happened and the
        tail of its server log (the live version, if any, keeps the traffic)."""
        stop_tree(pending, timeout=10)
        state["pending"] = None
        state["history"].append(
            {"at": _now(), "action": f"{pending['action']}-failed", "version": pending["version"]}
        )
        raise ServingError(
            f"version {pending['version']} of {self.model_name!r} {what}.\n"
            f"server log {pending['log']}:\n{_log_tail(pending['log'])}",
            fix=fix,
        )

    def _switch_to(
        self,
        state: dict[str, Any],
        pending: dict[str, Any],
        router: dict[str, Any],
        run_key: str | None,
        record: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Blue/green: ``pending`` takes all traffic, the old version is drained and stopped (``record``:
        more fields of the history entry)."""
        old = state.get("active")
        replaced = old if old and old.get("url") != pending["url"] and process_alive(old) else None
        self.local.switch(self.deployment, pending, router, standby=replaced)
        if replaced and not self.local.still_serving(pending):
            # the new version died (or stopped answering) right after taking the traffic: the old one,
            # still running, takes it back before anything else (with its shadow, if it had one)
            self.local.switch(self.deployment, replaced, router, shadow=state.get("shadow"))
            self._give_up(
                state,
                pending,
                f"stopped answering right after the switch; traffic went back to version "
                f"{replaced['version']}, which keeps serving",
                fix="read the server log above (a crash, out of memory), then deploy again.",
            )
        state["active"], state["pending"] = pending, None
        self._stop_shadow(state)  # the switch above wrote routes without it: it gets no more copies
        if old and old.get("url") != pending["url"]:
            self.local.drain_and_stop(old, router)
            old["pid"] = None
            state["previous"] = old
            if replaced:
                self.local.switch(self.deployment, pending, router)  # the standby is gone
        state["history"].append(
            {
                "at": _now(),
                "action": pending["action"],
                "version": pending["version"],
                "bento": pending.get("bento"),
                "previous_version": old["version"] if old else None,
                "run_key": run_key,
                **(record or {}),
            }
        )
        self.log.info(
            "%s now serves %s %s (was %s)",
            router["url"],
            self.model_name,
            pending["version"],
            old["version"] if old else "nothing",
        )
        return self._result(state, switched=True)

    def _shadow_in_place(
        self, state: dict[str, Any], what: dict[str, Any], router: dict[str, Any]
    ) -> dict[str, Any] | None:
        """For ``strategy="shadow"``: refuse what cannot be shadowed; the result when ``what`` already
        shadows the live version (nothing to do), else ``None``."""
        active = state.get("active")
        if not active:
            raise ServingError(
                f"deployment {self.deployment!r} has no live version for version {what['version']} to shadow.",
                fix="deploy a version with strategy='blue_green' first.",
            )
        if active["version"] == what["version"]:
            raise MLOpsArgumentError(
                f"version {what['version']} is the live version of {self.deployment!r}; a shadow of it would "
                "only compare it with itself.",
                fix="deploy another version with strategy='shadow'.",
            )
        shadow = state.get("shadow")
        status = self.local.router_status(router) or {}
        if (
            shadow
            and shadow["version"] == what["version"]
            and self.local.backend_ready(shadow)
            and (status.get("shadow") or {}).get("backend") == shadow["url"]
        ):
            self.log.info(
                "Version %s already shadows %s; nothing to do", shadow["version"], active["version"]
            )
            return self._result(state, switched=False)
        return None

    def _complete_shadow(
        self, state: dict[str, Any], pending: dict[str, Any], router: dict[str, Any], run_key: str | None
    ) -> dict[str, Any]:
        """The ready shadow gets copies of the live version's requests (the live version keeps all traffic);
        a shadow it replaces is stopped."""
        active = state.get("active")
        if not active:
            stop_tree(pending, timeout=10)
            state["pending"] = None
            raise ServingError(
                f"deployment {self.deployment!r} lost its live version while version {pending['version']} "
                "started as its shadow.",
                fix="deploy a version with strategy='blue_green', then the shadow again.",
            )
        self.local.switch(self.deployment, active, router, shadow=pending)
        old = state.get("shadow")
        state["shadow"], state["pending"] = pending, None
        if old and old.get("url") != pending["url"]:
            stop_tree(old, timeout=10)
        state["history"].append(
            {
                "at": _now(),
                "action": "shadow",
                "version": pending["version"],
                "bento": pending.get("bento"),
                "production_version": active["version"],
                "run_key": run_key,
            }
        )
        self.log.info(
            "%s: version %s gets a copy of every request to %s %s (which keeps answering them)",
            router["url"],
            pending["version"],
            self.model_name,
            active["version"],
        )
        return self._result(state, switched=False)

    def _stop_shadow(self, state: dict[str, Any]) -> None:
        """Stop the shadow version (the routes no longer name it) and record it."""
        shadow = state.get("shadow")
        if not shadow:
            return
        stop_tree(shadow, timeout=10)
        state["shadow"] = None
        state["history"].append({"at": _now(), "action": "shadow-stopped", "version": shadow["version"]})
        self.log.info("Stopped shadow version %s", shadow["version"])

    # -- canary ----------------------------------------------------------------------------------
    def _canary_resumes(
        self, state: dict[str, Any], what: dict[str, Any], router: dict[str, Any], canary_mode: bool
    ) -> bool:
        """Whether ``what`` is the canary already in progress (a retry or rerun of the deploy that started
        it goes on with its step, never starts the version twice); any other canary in progress ends (the
        old version takes all traffic back) before another deploy goes on."""
        canary = state.get("canary")
        if not canary:
            return False
        routed = ((self.local.router_status(router) or {}).get("canary") or {}).get("backend")
        if (
            canary_mode
            and canary["version"] == what["version"]
            and routed == canary["url"]
            and self.local.backend_ready(canary)
        ):
            self.log.info(
                "Version %s is already a canary at step %d (%s%% of traffic); resuming",
                canary["version"],
                canary["step"] + 1,
                canary["weight"],
            )
            return True
        self._end_canary(state, router, "canary-replaced")
        return False

    def _end_canary(self, state: dict[str, Any], router: dict[str, Any], action: str) -> None:
        """Route all traffic to the live version again, drain and stop the canary, record ``action``."""
        canary = state.get("canary")
        if not canary:
            return
        active = state.get("active")
        if active:
            self.local.switch(self.deployment, active, router, shadow=state.get("shadow"))
        self.local.drain_and_stop(canary, router)
        state["canary"] = None
        state["history"].append(
            {
                "at": _now(),
                "action": action,
                "version": canary["version"],
                "backend": canary["url"],
                "step": canary["step"],
                "weight": canary["weight"],
                "run_key": canary.get("run_key"),
            }
        )

    def _start_canary(
        self, state: dict[str, Any], pending: dict[str, Any], router: dict[str, Any], run_key: str | None
    ) -> dict[str, Any]:
        """The ready new version gets the first step's share of the traffic, beside the live version."""
        from airflow_mlops.ml.canary import Guardrails

        active = state.get("active")
        if not active or not process_alive(active):
            # nothing left to compare with: the new version takes the traffic as blue/green does
            self.log.warning("The live version is gone; %s takes all traffic", pending["version"])
            return self._switch_to(state, pending, router, run_key)
        steps = [float(x) for x in self.canary_steps]
        generation = self.local.switch(
            self.deployment,
            active,
            router,
            shadow=state.get("shadow"),
            canary=pending,
            canary_weight=steps[0],
        )
        state["canary"] = {
            **pending,
            "run_key": run_key,
            "steps": steps,
            "step": 0,
            "weight": steps[0],
            "generation": generation,
            "since": _now(),
            "step_minutes": float(self.step_minutes),
            "guardrails": Guardrails.parse(self.guardrails).as_dict(),
            "production_version": active["version"],
            "figures": [],
        }
        state["pending"] = None
        state["history"].append(
            {
                "at": _now(),
                "action": "canary-started",
                "version": pending["version"],
                "production_version": active["version"],
                "weight": steps[0],
                "run_key": run_key,
            }
        )
        self.log.info(
            "%s: version %s gets %g%% of the traffic for %g minutes (version %s the rest)",
            router["url"],
            pending["version"],
            steps[0],
            self.step_minutes,
            active["version"],
        )
        return {"canary_step": 0}

    def _continue(self, result: dict[str, Any], run_key: str | None) -> dict[str, Any]:
        """Wait out the canary's step when ``result`` says one is running, else return ``result``."""
        if "canary_step" in result:
            return self._canary_wait(run_key)
        return result

    def _canary_wait(self, run_key: str | None) -> dict[str, Any]:
        """Wait until the canary's current step ends (deferred: :class:`CanaryStepTrigger`, no worker slot
        held), then judge it (:meth:`canary_step`)."""
        from airflow_mlops.triggers.serving import CanaryStepTrigger

        state = self.local.read_state(self.deployment)
        canary, active = state["canary"], state["active"]
        until = datetime.fromisoformat(canary["since"]).timestamp() + float(canary["step_minutes"]) * 60
        trigger = CanaryStepTrigger(
            router_url=state["router"]["url"],
            active_url=active["url"],
            canary_url=canary["url"],
            generation=int(canary["generation"]),
            until=until,
            guardrails=canary["guardrails"],
            poll_interval=min(2.0, max(0.2, float(canary["step_minutes"]) * 6)),
        )
        if self.deferrable:
            self.defer(
                trigger=trigger,
                method_name="canary_step_complete",
                kwargs={"run_key": run_key, "step": canary["step"]},
                timeout=timedelta(seconds=max(0.0, until - time.time()) + 600),
            )
        event = asyncio.run(_first_event(trigger))  # the same wait, in this process
        return self._continue(self.canary_step(event, run_key=run_key, step=canary["step"]), run_key)

    def canary_step_complete(
        self, context: Context, event: dict[str, Any], run_key: str | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """Resume after a canary step's trigger fired: judge the step, then go on, roll back or finish."""
        run_key = run_key or self.run_key(context)
        return self._continue(self.canary_step(event, run_key=run_key, step=step), run_key)

    def canary_step(self, event: dict[str, Any], *, run_key: str | None, step: int | None) -> dict[str, Any]:
        """Judge the step that just ended on the guardrails (:func:`airflow_mlops.ml.canary.evaluate`): a
        breach routes all traffic back to the old version, stops the canary and fails the task with the
        figures (:class:`CanaryRollbackError`); a pass gives the canary the next step's weight
        (``{"canary_step": n}``), or after the last step switches to it as blue/green does."""
        from airflow_mlops.ml.canary import Guardrails, evaluate, window_predictions
        from airflow_mlops.ml.prediction_log import log_root, read_records

        with self.local.locked(self.deployment) as state:
            canary = state.get("canary")
            if (
                not canary
                or canary["url"] != event.get("canary_url")
                or (step is not None and canary["step"] != step)
            ):
                raise ServingError(
                    f"deployment {self.deployment!r} has no canary at {event.get('canary_url')} in step "
                    f"{step} any more (another deploy replaced it).",
                    fix="rerun the deploy task.",
                )
            router = self.local.ensure_router(state, int(self.port))
            active = state["active"]
            split = (self.local.router_status(router) or {}).get("split") or {}
            if split.get("generation") != canary["generation"]:
                self.log.warning(
                    "The router's figures are of routes generation %s, not the step's %s (it restarted?): "
                    "judging on the prediction log alone",
                    split.get("generation"),
                    canary["generation"],
                )
                split = {}
            start, end = datetime.fromisoformat(canary["since"]), datetime.now(UTC)
            days = [
                (start + timedelta(days=n)).date().isoformat()
                for n in range((end.date() - start.date()).days + 1)
            ]
            records = read_records(
                log_root(str(self.model_name), self.hook.store.settings.artifact_root), days
            )
            figures = evaluate(
                split,
                old_backend=active["url"],
                new_backend=canary["url"],
                old_predictions=window_predictions(records, active["version"], start, end),
                new_predictions=window_predictions(records, canary["version"], start, end),
                guardrails=Guardrails.parse(canary["guardrails"]),
            )
            figures = {
                "step": canary["step"] + 1,
                "weight": canary["weight"],
                "since": canary["since"],
                "until": end.isoformat(),
                "woken_by": event.get("status"),
                **figures,
            }
            canary["figures"].append(figures)
            state["history"].append(
                {
                    "at": _now(),
                    "action": "canary-step",
                    "version": canary["version"],
                    "run_key": run_key,
                    "figures": figures,
                }
            )
            self.log.info(
                "Canary %s, step %d (%g%%): %s; new %s, old %s, p99 ratio %s, prediction shift %s",
                canary["version"],
                figures["step"],
                canary["weight"],
                "passed" if figures["passed"] else "BREACH",
                figures["new"],
                figures["old"],
                figures["p99_ratio"],
                figures["prediction_shift"],
            )
            if not figures["passed"]:
                self._end_canary(state, router, "canary-rolled-back")
                raise CanaryRollbackError(
                    f"canary version {canary['version']} of {self.model_name!r} was rolled back at step "
                    f"{figures['step']} ({canary['weight']:g}% of the traffic): {'; '.join(figures['breaches'])}. "
                    f"Version {active['version']} serves all traffic again; it served throughout. "
                    f"Figures of each step: {json.dumps(canary['figures'])}",
                    fix="look at the new version's server log and its answers in the prediction log; deploy a "
                    "fixed version, or relax the guardrails if the difference is intended.",
                )
            following = canary["step"] + 1
            steps = canary["steps"]
            if following < len(steps) and steps[following] < 100:
                canary["generation"] = self.local.switch(
                    self.deployment,
                    active,
                    router,
                    shadow=state.get("shadow"),
                    canary=canary,
                    canary_weight=steps[following],
                )
                canary.update(step=following, weight=steps[following], since=_now())
                self.log.info("Version %s now gets %g%% of the traffic", canary["version"], steps[following])
                return {"canary_step": following}
            # every step passed: the switch completes as blue/green does (the old version drained, stopped)
            state["canary"] = None
            backend = {k: v for k, v in canary.items() if k not in CANARY_FIELDS}
            result = self._switch_to(
                state,
                backend,
                router,
                run_key,
                record={"strategy": "canary", "canary_steps": canary["figures"]},
            )
            return {**result, "strategy": "canary", "canary_steps": canary["figures"]}

    def _result(self, state: dict[str, Any], *, switched: bool) -> dict[str, Any]:
        active = state["active"]
        previous = state.get("previous") or {}
        shadow = state.get("shadow") or {}
        return {
            "deployment": state["name"],
            "url": state["router"]["url"],
            "version": active["version"],
            "bento": active.get("bento"),
            "backend": active["url"],
            "previous_version": previous.get("version"),
            "switched": switched,
            "shadow_version": shadow.get("version"),
            "shadow_backend": shadow.get("url"),
        }


class BentoRollbackOperator(BentoDeployOperator):
    """Put the previously live version of a deployment back (blue/green, like a deploy).

    Rerunning the same task after it succeeded does nothing (the rollback it made is still live).

    :param model_name: registry name (templated).
    :param deployment_name: name of the deployment; default ``model_name``.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        state = self.local.read_state(self.deployment)
        run_key = self.run_key(context)
        last = state["history"][-1] if state["history"] else {}
        if last.get("action") == "rollback" and last.get("run_key") == run_key and state.get("active"):
            self.log.info("This task already rolled back to %s", state["active"]["version"])
            return self.deploy(
                {"version": state["active"]["version"], "bento": state["active"].get("bento")},
                action="rollback",
                context=context,
            )
        previous = state.get("previous")
        if not previous:
            raise ServingError(
                f"deployment {self.deployment!r} has no previous version to roll back to.",
                fix="deploy a second version first.",
            )
        index = self.hook.read_index(self.model_name)
        check_signature(self.hook.version_record(index, previous["version"]), previous["version"])
        self.hook.model_dir(self.model_name, previous["version"])
        # complete() records the run key with the rollback, also when the task resumes after deferring
        return self.deploy(
            {"version": previous["version"], "bento": previous.get("bento")},
            action="rollback",
            context=context,
        )
