"""Feast feature store access for Airflow tasks: the ``feast`` connection type and :class:`FeastHook`.

The hook resolves a Feast repository (``feature_store.yaml`` plus Python definitions) into a
``FeatureStore`` without depending on the working directory: ``${VAR}`` references in the YAML are
filled from the environment and from ``[mlops]`` (``MLOPS_STATE_DIR``, ``MLOPS_FEAST_DIR``,
``MLOPS_OFFLINE_ROOT``), and the online store can be overridden by the Airflow connection (e.g. Redis
with its password in the connection's password field), and so can the registry (Feast's SQL registry on
PostgreSQL, reached through an Airflow ``postgres`` connection, so every worker sees one registry).
Feast and pandas are imported only when a method runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import string
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_mlops.config import environ_set
from airflow_mlops.exceptions import ArtifactStoreError, FeatureRepoError, FeatureStoreError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureService, FeatureStore, RepoConfig

    from airflow_mlops.config import MLOpsSettings

FEATURE_STORE_YAML = "feature_store.yaml"
#: Feast's ``duckdb`` offline store with object-store sources read through fsspec (hooks/feast_offline.py)
FSSPEC_DUCKDB_OFFLINE_STORE = "airflow_mlops.hooks.feast_offline.FsspecDuckDBOfflineStore"
#: Feast's Ray compute engine materializing like its local engine (hooks/feast_ray.py)
RAY_ENGINE = "airflow_mlops.hooks.feast_ray.MLOpsRayComputeEngine"
#: Ray Client's port on a head started with ``ray start --head`` (its default)
RAY_CLIENT_PORT = 10001
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CWD_LOCK = threading.Lock()


def _redact(text: str, secrets: str | Sequence[str | None] | None) -> str:
    """``text`` with every secret (and its URL-quoted form, as it appears in a database URL) replaced."""
    from urllib.parse import quote, quote_plus

    if isinstance(secrets, str) or secrets is None:
        secrets = [secrets]
    for secret in secrets:
        if secret:
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
    return text


@contextlib.contextmanager
def _repo_on_path(repo: Path, env: dict[str, str]) -> Iterator[None]:
    """Feast's repository parser names modules relative to the working directory: enter the repository
    for the parse only, with ``env`` set for the definitions, and forget its modules afterwards so
    another repository (or the same one with other settings) can be parsed."""
    with _CWD_LOCK, environ_set(env):
        previous = os.getcwd()
        before = set(sys.modules)
        sys.path.insert(0, str(repo))
        os.chdir(repo)
        try:
            yield
        finally:
            os.chdir(previous)
            with contextlib.suppress(ValueError):
                sys.path.remove(str(repo))
            for name in set(sys.modules) - before:
                module = sys.modules.get(name)
                origin = getattr(module, "__file__", None) or ""
                if origin.startswith(str(repo)):
                    del sys.modules[name]


def _without_meta(value: Any) -> Any:
    if (
        hasattr(value, "CopyFrom")
        and hasattr(value, "DESCRIPTOR")
        and "meta" in value.DESCRIPTOR.fields_by_name
    ):
        copy = type(value)()
        copy.CopyFrom(value)
        copy.ClearField("meta")
        return copy
    return value


def _is_material(object_diff: Any) -> bool:
    """Whether a registry diff changes a definition. Feast's plan reports every feature view with a batch
    source as updated because the source's ``meta`` (created / updated timestamps) differs between the
    registry and the freshly parsed definition; those differences alone are not changes."""
    if object_diff.transition_type.name != "UPDATE":
        return True
    return any(
        _without_meta(p.val_existing) != _without_meta(p.val_declared)
        for p in object_diff.feast_object_property_diffs
    )


def _lost_table_creation_race(err: BaseException) -> bool:
    """Whether ``err`` is PostgreSQL refusing a ``CREATE TABLE`` another process just ran (Feast's SQL
    registry creating its tables at first use)."""
    text = f"{type(err).__name__} {type(getattr(err, 'orig', None)).__name__} {err}"
    return ("UniqueViolation" in text and "pg_type" in text) or "DuplicateTable" in text


class FeastHook(BaseHook):
    """Interact with a Feast feature store defined by a repository on the worker.

    The repository path is taken from ``repo_path`` or else from the connection's extra ``repo_path``.
    The connection (optional: without it the repository's own configuration is used) may override the
    online store: extra ``{"online_store": {"type": "redis"}}`` with host, port, schema (Redis db
    number) and password fields builds the Redis connection string; any other keys in
    ``online_store`` are passed to Feast as they are.

    The connection may also override the registry, which by default is a file in the worker's
    ``state_dir`` (one registry per worker): extra ``{"registry_conn_id": "feast_registry"}`` names an
    Airflow ``postgres`` connection whose database holds Feast's SQL registry (its password stays in that
    connection, and out of logs and errors); extra ``{"registry": {...}}`` is merged over the
    repository's ``registry`` section (e.g. ``{"cache_ttl_seconds": 5}``; a different ``registry_type``
    replaces the section).

    Materialization runs on a Ray cluster with extra ``{"ray_conn_id": "ray_cluster"}`` (the project's
    ``ray`` connection: its extra ``cluster_address``, else Ray Client on its host, ``ray://<host>:10001``;
    a connection without host starts Ray in the task) or ``{"batch_engine": "ray"}``; extra
    ``batch_engine`` may also be a dict of Feast's Ray engine settings (``{"type": "ray",
    "write_concurrency": 4}``) and ``ray_address`` gives the address directly. The engine is
    :mod:`airflow_mlops.hooks.feast_ray` (Feast's Ray engine with the local engine's semantics). The
    repository's ``duckdb`` offline store runs as :mod:`airflow_mlops.hooks.feast_offline`, which reads
    ``s3://`` / ``gs://`` sources without DuckDB's downloaded httpfs extension.

    :param feast_conn_id: Airflow connection of type ``feast``; when it is the default id and does not
        exist, the repository's own configuration is used.
    :param repo_path: folder holding ``feature_store.yaml`` and the definitions.
    :param online_store: online-store settings merged over the repository's and the connection's
        (e.g. ``{"type": "redis", "connection_string": "localhost:6379"}``).
    """

    conn_name_attr = "feast_conn_id"
    default_conn_name = "feast_default"
    conn_type = "feast"
    hook_name = "Feast"

    def __init__(
        self,
        feast_conn_id: str | None = default_conn_name,
        repo_path: str | os.PathLike[str] | None = None,
        online_store: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.feast_conn_id = feast_conn_id
        self.repo_path_arg = repo_path
        self.online_store_arg = online_store

    # -- configuration ------------------------------------------------------------------------------

    @cached_property
    def connection(self) -> Any | None:
        if not self.feast_conn_id:
            return None
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return self.get_connection(self.feast_conn_id)
        except AirflowNotFoundException:
            if self.feast_conn_id == self.default_conn_name:
                self.log.info(
                    "No connection %r: using the repository's own configuration", self.feast_conn_id
                )
                return None
            raise FeatureRepoError(
                f"Feast connection {self.feast_conn_id!r} does not exist.",
                fix="create it (type 'feast') with `airflow connections add` or in the UI, "
                "or pass feast_conn_id=None to use the repository's own feature_store.yaml.",
            ) from None

    @cached_property
    def _extra(self) -> dict[str, Any]:
        conn = self.connection
        extra = dict(conn.extra_dejson) if conn is not None else {}
        prefix = f"extra__{self.conn_type}__"
        # Form fields may be stored with the legacy prefix; both spellings are accepted.
        return {k.removeprefix(prefix): v for k, v in extra.items() if v not in (None, "")}

    @cached_property
    def settings(self) -> MLOpsSettings:
        from airflow_mlops.config import load_settings

        return load_settings()

    @cached_property
    def repo_path(self) -> Path:
        raw = self.repo_path_arg or self._extra.get("repo_path")
        if not raw:
            raise FeatureRepoError(
                "no Feast repository given: neither repo_path nor the connection's extra 'repo_path' is set.",
                fix="pass repo_path= to the operator or set extra {'repo_path': '/path/to/feature_repo'} "
                f"on connection {self.feast_conn_id!r}.",
            )
        path = Path(os.fspath(raw)).expanduser()
        if not path.is_absolute():
            raise FeatureRepoError(
                f"Feast repository path {str(raw)!r} is relative; it would depend on the worker's working "
                "directory.",
                fix="give the absolute path of the folder holding feature_store.yaml.",
            )
        if not (path / FEATURE_STORE_YAML).is_file():
            raise FeatureRepoError(
                f"Feast repository {str(path)!r} has no {FEATURE_STORE_YAML}.",
                fix="point repo_path at the folder holding feature_store.yaml (the project's feature_repo/).",
            )
        return path

    def _variables(self) -> dict[str, str]:
        settings = self.settings
        defaults = {
            "MLOPS_STATE_DIR": str(settings.state_dir),
            "MLOPS_FEAST_DIR": str(settings.state_dir / "feast"),
            "MLOPS_OFFLINE_ROOT": settings.offline_root,
        }
        return {**defaults, **{k: v for k, v in os.environ.items() if k in defaults}}

    @cached_property
    def registry_connection(self) -> Any | None:
        """The Airflow connection named by the extra ``registry_conn_id``, if any."""
        conn_id = self._extra.get("registry_conn_id")
        if not conn_id:
            return None
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return self.get_connection(conn_id)
        except AirflowNotFoundException:
            raise FeatureRepoError(
                f"Feast registry connection {conn_id!r} (extra 'registry_conn_id' of connection "
                f"{self.feast_conn_id!r}) does not exist.",
                fix="create it (type 'postgres': host, port, schema = database, login, password) or remove "
                "'registry_conn_id' to use the repository's own registry.",
            ) from None

    def _secrets(self) -> list[str]:
        conns = [self.connection, self.registry_connection if self._extra.get("registry_conn_id") else None]
        found = [c.password for c in conns if c is not None and c.password]
        path = (self._extra.get("registry") or {}).get("path")
        if path and "://" in str(path):
            from sqlalchemy.engine import make_url

            with contextlib.suppress(Exception):
                password = make_url(str(path)).password
                if password:
                    found.append(str(password))
        return found

    def _registry_override(self) -> dict[str, Any]:
        override: dict[str, Any] = dict(self._extra.get("registry") or {})
        conn = self.registry_connection
        if conn is not None:
            if conn.conn_type not in ("postgres", "postgresql"):
                raise FeatureRepoError(
                    f"Feast registry connection {conn.conn_id!r} has type {conn.conn_type!r}; the SQL "
                    "registry is supported on PostgreSQL.",
                    fix="give the registry a connection of type 'postgres'.",
                )
            from sqlalchemy.engine import URL

            url = URL.create(
                "postgresql+psycopg",
                username=conn.login or None,
                password=conn.password or None,
                host=conn.host or None,
                port=conn.port or None,
                database=conn.schema or None,
            )
            override.setdefault("registry_type", "sql")
            override["path"] = url.render_as_string(hide_password=False)
            from airflow.sdk.log import mask_secret

            mask_secret(override["path"])
        return override

    def _online_override(self) -> dict[str, Any]:
        override: dict[str, Any] = dict(self._extra.get("online_store") or {})
        if self._extra.get("online_store_type"):
            override.setdefault("type", self._extra["online_store_type"])
        override.update(self.online_store_arg or {})
        conn = self.connection
        if override.get("type") == "redis" and conn is not None:
            if "connection_string" not in override and conn.host:
                override["connection_string"] = f"{conn.host}:{conn.port or 6379}"
            if "connection_string" in override:
                parts = [override["connection_string"]]
                if conn.schema and "db=" not in parts[0]:
                    parts.append(f"db={conn.schema}")
                if conn.password and "password=" not in parts[0]:
                    parts.append(f"password={conn.password}")
                override["connection_string"] = ",".join(parts)
        return override

    def _ray_address(self) -> str | None:
        """The Ray cluster address for Feast's Ray engine: the extra ``ray_address``, or from the Ray
        connection named by ``ray_conn_id`` (its extra ``cluster_address``, else Ray Client on its host,
        ``ray://<host>:<extra client_port, 10001>``); None for local Ray in the task."""
        if self._extra.get("ray_address"):
            return str(self._extra["ray_address"])
        conn_id = self._extra.get("ray_conn_id")
        if not conn_id:
            return None
        from airflow_mlops.hooks.ray import RayHook

        ray = RayHook(ray_conn_id=conn_id)
        if ray.is_local:
            return None
        if ray.extra.get("cluster_address"):
            return str(ray.extra["cluster_address"])
        host = ray.connection.host.strip().rstrip("/")
        host = host.partition("://")[2] or host
        return f"ray://{host.split(':')[0]}:{ray.extra.get('client_port', RAY_CLIENT_PORT)}"

    def _batch_engine_override(self) -> dict[str, Any]:
        """The ``batch_engine`` section from the extras ``batch_engine`` (a type, e.g. ``"ray"``, or a
        dict of the engine's settings) and ``ray_conn_id`` (which alone selects the Ray engine)."""
        value = self._extra.get("batch_engine")
        if value is None and self._extra.get("ray_conn_id"):
            value = "ray"
        if not value:
            return {}
        override: dict[str, Any] = {"type": value} if isinstance(value, str) else dict(value)
        if override.get("type") in ("ray", "ray.engine"):
            # Feast's ray.engine drops the rows older than now - ttl when it materializes (a backfill writes
            # nothing): the same engine, materializing like the local engine (hooks/feast_ray.py)
            override["type"] = RAY_ENGINE
        if override.get("type") == RAY_ENGINE and "ray_address" not in override:
            address = self._ray_address()
            if address:
                override["ray_address"] = address
        return override

    @cached_property
    def repo_config(self) -> RepoConfig:
        """The repository's configuration with variables filled in and the overrides applied.

        :raises FeatureRepoError: the YAML is malformed, uses an unknown variable or fails Feast's checks.
        """
        import yaml
        from feast.repo_config import RepoConfig
        from pydantic import ValidationError

        yaml_path = self.repo_path / FEATURE_STORE_YAML
        text = yaml_path.read_text()
        variables = self._variables()
        unknown = sorted({m for m in _VAR.findall(text) if m not in variables and m not in os.environ})
        if unknown:
            raise FeatureRepoError(
                f"{yaml_path} uses undefined variable(s) {', '.join(unknown)}.",
                fix="export them in the worker's environment, or use only MLOPS_STATE_DIR, MLOPS_FEAST_DIR "
                "and MLOPS_OFFLINE_ROOT, which the hook fills from [mlops].",
            )
        text = string.Template(text).safe_substitute({**os.environ, **variables})
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise FeatureRepoError(
                f"{yaml_path} is not valid YAML ({err}).", fix="fix the YAML syntax of the file."
            ) from err
        if not isinstance(raw, dict) or "project" not in raw:
            raise FeatureRepoError(
                f"{yaml_path} is not a Feast configuration (no 'project' key).",
                fix="start from the project's feature_repo/feature_store.yaml.",
            )
        override = self._online_override()
        if override:
            base = raw.get("online_store") or {}
            if isinstance(base, str):
                base = {"type": base}
            same_type = override.get("type", base.get("type")) == base.get("type")
            raw["online_store"] = {**base, **override} if same_type else override
        offline = raw.get("offline_store")
        if offline == "duckdb" or (isinstance(offline, dict) and offline.get("type") == "duckdb"):
            # DuckDB would download its httpfs extension to read s3:// (no internet on a worker): the same
            # store, with object-store sources read through the project's fsspec filesystems
            raw["offline_store"] = {
                **(offline if isinstance(offline, dict) else {}),
                "type": FSSPEC_DUCKDB_OFFLINE_STORE,
            }
        engine = self._batch_engine_override()
        if engine:
            base = raw.get("batch_engine") or {}
            if isinstance(base, str):
                base = {"type": base}
            raw["batch_engine"] = {**base, **engine} if engine.get("type") == base.get("type") else engine
        registry = self._registry_override()
        if registry:
            base = raw.get("registry") or {}
            if isinstance(base, str):
                base = {"path": base}
            same_type = registry.get("registry_type", "file") == base.get("registry_type", "file")
            raw["registry"] = {**base, **registry} if same_type else registry
        secret = self._secrets()
        try:
            config = RepoConfig(repo_path=self.repo_path, **raw)
            config.online_store  # noqa: B018 - validates the online-store section now, not at first use
        except (ValidationError, ValueError, TypeError) as err:
            raise FeatureRepoError(
                f"Feast configuration {yaml_path} (with the connection's overrides) is invalid: "
                f"{_redact(str(err), secret)}",
                fix="correct feature_store.yaml or the online_store / registry / batch_engine extras of connection "
                f"{self.feast_conn_id!r}.",
            ) from None
        self._prepare_local_paths(config)
        return config

    @staticmethod
    def _prepare_local_paths(config: RepoConfig) -> None:
        registry = config.registry
        path = getattr(registry, "path", None) or (registry if isinstance(registry, str) else None)
        candidates = [path, getattr(config.online_store, "path", None)]
        for candidate in candidates:
            if candidate and "://" not in str(candidate):
                Path(candidate).parent.mkdir(parents=True, exist_ok=True)

    @property
    def online_store_type(self) -> str:
        return str(self.repo_config.online_store.type)

    def online_store_unreachable(self, err: BaseException, doing: str = "") -> FeatureStoreError | None:
        """The error a task shows when ``err`` says the Redis online store cannot be reached (or refused
        the password): what the task was doing (``doing``, e.g. the feature view it materialized), the
        store's address, the connection that configures it and what to check; ``None`` for any other
        error. The password is never shown (it stays in the connection)."""
        exceptions = sys.modules.get("redis.exceptions")
        if exceptions is None or not isinstance(err, exceptions.ConnectionError | exceptions.TimeoutError):
            return None
        online = self.repo_config.online_store
        address = (
            str(getattr(online, "connection_string", "") or "").split(",")[0] or "its configured address"
        )
        if self.connection is not None:
            via, check = (
                f"connection {self.feast_conn_id!r}",
                f"connection {self.feast_conn_id!r} (host, port, schema = Redis db, password)",
            )
        else:
            yaml_path = self.repo_path / FEATURE_STORE_YAML
            via, check = f"online_store of {yaml_path}", f"the online_store section of {yaml_path}"
        refused = isinstance(err, exceptions.AuthenticationError | exceptions.AuthorizationError)
        what = "refused the credentials of" if refused else "cannot be reached from"
        return FeatureStoreError(
            f"{doing}{': ' if doing else ''}the {online.type} online store at {address} ({via}) {what} this worker: "
            f"{_redact(f'{type(err).__name__}: {err}', self._secrets())}",
            fix=f"check that Redis runs at {address} and that this worker reaches it, and {check}; then "
            "retry the task (materializing again writes the same rows, never duplicates).",
        )

    @cached_property
    def store(self) -> FeatureStore:
        """The ``FeatureStore``, built once per hook."""
        from feast import FeatureStore

        config = self.repo_config

        def open_store() -> FeatureStore:
            store = FeatureStore(repo_path=str(self.repo_path), config=config)
            if getattr(config.registry, "registry_type", "file") == "sql":
                store.registry  # noqa: B018 - opens the database now, so an unreachable one is named here
            return store

        try:
            # Feast's SQL registry creates its tables at first use (SQLAlchemy's create_all: check, then
            # CREATE TABLE); workers opening a new registry at once race on it, and PostgreSQL refuses the
            # losers' CREATE TABLE. Opening again finds the tables the winner made.
            from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

            for attempt in Retrying(
                retry=retry_if_exception(_lost_table_creation_race),
                stop=stop_after_attempt(4),
                wait=wait_random(0.2, 1.0),
                reraise=True,
            ):
                with attempt:
                    return open_store()
            raise AssertionError("unreachable")  # pragma: no cover - Retrying returns or raises
        except Exception as err:
            registry = self._extra.get("registry_conn_id")
            where = f"the SQL registry of connection {registry!r}" if registry else "its registry"
            raise FeatureStoreError(
                f"Feast repository {str(self.repo_path)!r} cannot open {where}: "
                f"{_redact(f'{type(err).__name__}: {err}', self._secrets())}",
                fix="check that the registry database is running and reachable from this worker, and the "
                "connection's host, port, database, login and password.",
            ) from None

    # -- operations ---------------------------------------------------------------------------------

    def parse_repo(self) -> Any:
        """The definitions of the repository (Feast ``RepoContents``).

        :raises FeatureRepoError: a definitions file does not import, naming it.
        """
        from feast.repo_operations import parse_repo

        with _repo_on_path(self.repo_path, self._variables()):
            try:
                repo = parse_repo(self.repo_path)
            except Exception as err:
                raise FeatureRepoError(
                    f"the definitions of Feast repository {str(self.repo_path)!r} do not load: "
                    f"{type(err).__name__}: {err}",
                    fix="run `feast plan` in the repository to see the failing definition and correct it.",
                ) from err
        project = self.repo_config.project
        names = [p.name for p in repo.projects]
        if not names:
            from feast import Project

            repo.projects.append(
                Project(name=project, description=self.repo_config.project_description or "")
            )
        elif names != [project]:
            raise FeatureRepoError(
                f"Feast repository {str(self.repo_path)!r} defines project(s) {names} but its "
                f"{FEATURE_STORE_YAML} names project {project!r}.",
                fix="define at most one Project, with the name given in feature_store.yaml.",
            )
        return repo

    def apply(self) -> dict[str, Any]:
        """Register the repository's definitions; objects no longer defined are removed. Idempotent: when
        the registry already matches, nothing is written.

        :return: ``{"changes": n, "changed": [...], "feature_views": [...], "feature_services": [...]}``.
        """
        from feast.diff.property_diff import TransitionType
        from feast.repo_operations import extract_objects_for_apply_delete

        store = self.store
        repo = self.parse_repo()
        try:
            provider = store._get_provider()
            for view in repo.feature_views:
                if view.batch_source is not None:
                    provider.validate_data_source(store.config, view.batch_source)
            registry_diff, _, _ = store.plan(repo)
            changed = [
                f"{d.feast_object_type.name.lower()}:{d.name}:{d.transition_type.name.lower()}"
                for d in registry_diff.feast_object_diffs
                if d.transition_type != TransitionType.UNCHANGED and _is_material(d)
            ]
            if changed:
                to_apply, to_delete, _, _ = extract_objects_for_apply_delete(
                    store.project, store.registry, repo
                )
                store.apply(to_apply, objects_to_delete=to_delete, partial=False)
        except (FeatureStoreError, ArtifactStoreError):
            raise
        except Exception as err:
            if unreachable := self.online_store_unreachable(err):  # apply updates the online store's tables
                raise unreachable from err
            raise FeatureStoreError(
                f"feast apply of repository {str(self.repo_path)!r} failed: "
                f"{_redact(f'{type(err).__name__}: {err}', self._secrets())}",
                fix="check that every source path exists in the offline store and the registry is writable.",
            ) from err
        return {
            "project": store.project,
            "changes": len(changed),
            "changed": changed,
            "feature_views": sorted(fv.name for fv in repo.feature_views),
            "feature_services": sorted(fs.name for fs in repo.feature_services),
        }

    def feature_views(self, names: Sequence[str] | None = None) -> list[Any]:
        """Registered feature views, all or the ``names`` given.

        :raises FeatureRepoError: a name is not registered, naming it and the registered ones.
        """
        registered = {fv.name: fv for fv in self.store.list_feature_views()}
        if names is None:
            return [registered[n] for n in sorted(registered)]
        unknown = [n for n in names if n not in registered]
        if unknown:
            raise FeatureRepoError(
                f"unknown feature view(s) {', '.join(repr(n) for n in unknown)} in Feast repository "
                f"{str(self.repo_path)!r} (project {self.store.project!r}); registered: "
                f"{', '.join(sorted(registered)) or 'none'}.",
                fix="correct the feature view name, or run FeastApplyOperator first if it was just added.",
            )
        return [registered[n] for n in names]

    def feature_service(self, name: str) -> Any:
        """The registered feature service ``name``.

        :raises FeatureRepoError: it is not registered.
        """
        from feast.errors import FeatureServiceNotFoundException

        try:
            return self.store.get_feature_service(name)
        except FeatureServiceNotFoundException:
            known = sorted(s.name for s in self.store.list_feature_services())
            raise FeatureRepoError(
                f"unknown feature service {name!r} in Feast repository {str(self.repo_path)!r}; registered: "
                f"{', '.join(known) or 'none'}.",
                fix="correct the name, or run FeastApplyOperator first if it was just added.",
            ) from None

    def service_columns(self, service: Any) -> tuple[list[str], dict[str, str]]:
        """The entity join keys of a feature service and the columns it provides.

        :param service: the feature service, or its name.
        :return: ``(join keys, columns)``: ``columns`` maps each ``<view>__<feature>`` name, and the bare
            ``<feature>`` name where only one view has it, to the ``<view>__<feature>`` column Feast
            answers with. The registry records the keys in a model's signature; the model server reads
            the columns by them.
        """
        if isinstance(service, str):
            service = self.feature_service(service)
        keys: list[str] = []
        full: list[str] = []
        for projection in service.feature_view_projections:
            view = self.feature_views([projection.name])[0]
            for key in (c.name for c in view.entity_columns):
                if key not in keys:
                    keys.append(key)
            full += [f"{projection.name_to_use()}__{f.name}" for f in projection.features]
        bare: dict[str, list[str]] = {}
        for column in full:
            bare.setdefault(column.split("__", 1)[1], []).append(column)
        columns = {column: column for column in full}
        columns.update({short: names[0] for short, names in bare.items() if len(names) == 1})
        return keys, columns

    def count_rows_to_write(self, feature_view: Any, start: datetime, end: datetime) -> int:
        """How many online rows materializing ``feature_view`` over [start, end] writes: one per entity
        key that has a row in the interval (the latest one)."""
        from feast.infra.offline_stores.offline_utils import get_offline_store_from_config

        store = self.store
        offline = get_offline_store_from_config(store.config.offline_store)
        job = offline.pull_latest_from_table_or_query(
            config=store.config,
            data_source=feature_view.batch_source,
            join_key_columns=[e.name for e in feature_view.entity_columns],
            feature_name_columns=[f.name for f in feature_view.features],
            timestamp_field=feature_view.batch_source.timestamp_field,
            created_timestamp_column=feature_view.batch_source.created_timestamp_column or None,
            start_date=start,
            end_date=end,
        )
        return int(job.to_arrow().num_rows)

    def materialize(
        self, start: datetime, end: datetime, feature_views: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Materialize [start, end] of each feature view into the online store.

        :return: rows written per feature view.
        :raises FeatureRepoError: an unknown feature view.
        :raises FeatureStoreError: Feast failed, naming the feature view.
        """
        views = self.feature_views(feature_views)
        written: dict[str, int] = {}
        for view in views:
            try:
                rows = self.count_rows_to_write(view, start, end)
                if rows:
                    self.store.materialize(start_date=start, end_date=end, feature_views=[view.name])
            except (FeatureStoreError, ArtifactStoreError):  # the latter: its offline store on S3 not reached
                raise
            except Exception as err:
                doing = (
                    f"materializing feature view {view.name!r} for {start.isoformat()} .. {end.isoformat()}"
                )
                if unreachable := self.online_store_unreachable(err, doing):
                    raise unreachable from err
                raise FeatureStoreError(
                    f"materializing feature view {view.name!r} of Feast repository {str(self.repo_path)!r} "
                    f"for {start.isoformat()} .. {end.isoformat()} failed: "
                    f"{_redact(f'{type(err).__name__}: {err}', self._secrets())}",
                    fix="check the view's source table in the offline store and that the "
                    f"{self.online_store_type} online store is reachable.",
                ) from err
            written[view.name] = rows
            self.log.info(
                "Materialized %d rows of %s for %s .. %s into the %s online store",
                rows,
                view.name,
                start.isoformat(),
                end.isoformat(),
                self.online_store_type,
            )
        return written

    def historical_features(
        self, entity_df: pd.DataFrame, feature_service: str, *, full_feature_names: bool = True
    ) -> pd.DataFrame:
        """Point-in-time-correct features for ``entity_df`` (its ``event_timestamp`` column, tz-aware)."""
        service = self.feature_service(feature_service)
        try:
            job = self.store.get_historical_features(
                entity_df=entity_df, features=service, full_feature_names=full_feature_names
            )
            return job.to_df()
        except ArtifactStoreError:  # the offline store on an object store that cannot be reached
            raise
        except Exception as err:
            raise FeatureStoreError(
                f"building historical features of service {feature_service!r} from Feast repository "
                f"{str(self.repo_path)!r} failed: {type(err).__name__}: {err}",
                fix="check that the entity dataframe has the join keys and a tz-aware event_timestamp.",
            ) from err

    def online_features(
        self, features: Sequence[str] | str | FeatureService, entity_rows: list[dict[str, Any]]
    ) -> dict:
        """Online feature values for ``entity_rows``; ``features`` is a list of refs, a service name, or a
        ``FeatureService`` (a name is looked up in the registry on every call: a server keeps the object).

        :raises FeatureStoreError: the online store cannot be reached (see :meth:`online_store_unreachable`).
        """
        from feast import FeatureService

        refs: Any = features
        if isinstance(features, str):
            refs = self.feature_service(features)
        elif not isinstance(features, FeatureService):
            refs = list(features)
        try:
            response = self.store.get_online_features(
                features=refs, entity_rows=entity_rows, full_feature_names=True
            )
        except Exception as err:
            if unreachable := self.online_store_unreachable(err):
                raise unreachable from err
            raise
        return response.to_dict()

    def test_connection(self) -> tuple[bool, str]:
        """Load the configuration, read the registry and reach the online store."""
        try:
            config = self.repo_config
            views = [fv.name for fv in self.store.list_feature_views()]
            online = config.online_store
            if online.type == "redis":
                from feast.infra.online_stores.redis import RedisOnlineStore

                RedisOnlineStore()._get_client(online).ping()
            elif online.type == "sqlite":
                import sqlite3

                sqlite3.connect(online.path).execute("select 1").fetchall()
        except Exception as err:  # report every failure in the UI rather than raising
            try:
                secrets = self._secrets()
            except Exception:  # the registry connection itself is missing
                secrets = [self.connection.password] if self.connection is not None else []
            return False, _redact(f"{type(err).__name__}: {err}", secrets)
        return True, (
            f"Feast repository {self.repo_path} (project {config.project}): {len(views)} feature views "
            f"registered, {online.type} online store reachable."
        )
