"""Typed settings of airflow-mlops, read from the ``[mlops]`` section of Airflow's configuration.

Every option can be given in ``airflow.cfg`` or as an environment variable
``AIRFLOW__MLOPS__<OPTION>`` (e.g. ``AIRFLOW__MLOPS__ARTIFACT_ROOT=s3://bucket/mlops``).
Reading the settings does no I/O; :func:`check_settings` verifies that they are usable and is
called by the artifact store before the first write of a task.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from airflow_mlops.exceptions import MLOpsConfigError

SECTION = "mlops"

#: Schemes the artifact store accepts, with the Airflow connection type each one needs.
REMOTE_SCHEMES: dict[str, str] = {"s3": "aws", "gs": "google_cloud_platform", "gcs": "google_cloud_platform"}
SUPPORTED_SCHEMES = ("file", *REMOTE_SCHEMES)


@dataclass(frozen=True)
class MLOpsSettings:
    """Resolved ``[mlops]`` settings.

    :param state_dir: local folder for state that is not an artifact (demo landing zone, offline
        store, Feast registry, Ray temp files).
    :param artifact_root: URI under which every run writes its artifacts (``file://``, ``s3://``, ``gs://``).
    :param artifact_conn_id: Airflow connection used for a remote ``artifact_root``.
    :param state_conn_id: Airflow connection of the SQL database holding the shared state (registry
        metadata, deployments, retraining gate; see :mod:`airflow_mlops.hooks.state`); when it does not
        exist, the SQLite file ``<state_dir>/mlops-state.db``.
    :param offline_root: URI of the offline store (validated data, one folder per table).
    :param landing_root: URI where raw batches land before validation.
    :param ray_num_cpus: CPUs the local Ray started inside a task may use (None: all of the machine's).
    :param prediction_log_max_rows: most prediction-log rows the model server keeps in memory while the
        store cannot be written; past it the oldest are dropped and counted (see docs/monitoring.md).
    :param prediction_log_retention_days: prediction-log day partitions older than this many days are
        removed by the model server (0: keep every day).
    :param quarantine_root: URI under which failed batches are kept (a relative ``quarantine_uri`` of
        :class:`~airflow_mlops.operators.validation.GXValidateOperator` is taken under it); None: the
        folder ``quarantine`` beside ``landing_root`` (see :attr:`quarantine`), so batches landed on an
        object store are quarantined on that store, never on a worker's disk.
    """

    state_dir: Path
    artifact_root: str
    artifact_conn_id: str | None
    offline_root: str
    landing_root: str
    ray_num_cpus: int | None = None
    prediction_log_max_rows: int = 200_000
    prediction_log_retention_days: int = 0
    quarantine_root: str | None = None
    state_conn_id: str = "mlops_state"

    @property
    def artifact_scheme(self) -> str:
        return urlsplit(self.artifact_root).scheme or "file"

    @property
    def quarantine(self) -> str:
        """Where failed batches are kept: ``quarantine_root``, else ``quarantine`` beside ``landing_root``
        (``s3://bucket/landing`` -> ``s3://bucket/quarantine``; the embedded default
        ``<state_dir>/landing`` -> ``<state_dir>/quarantine``)."""
        if self.quarantine_root:
            return self.quarantine_root
        parts = urlsplit(self.landing_root)
        path = parts.path.rstrip("/")
        parent = path[: path.rfind("/")] if "/" in path else ""
        return parts._replace(path=f"{parent}/quarantine").geturl()


def _option(key: str) -> str:
    from airflow.sdk.configuration import conf

    value = conf.get(SECTION, key, fallback="")
    return (value or "").strip()


def default_state_dir() -> Path:
    """``$AIRFLOW_HOME/mlops``: the state folder when ``[mlops] state_dir`` is not set."""
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "mlops"


def _file_uri(path: Path) -> str:
    return "file://" + str(path)


def load_settings() -> MLOpsSettings:
    """Read the ``[mlops]`` section and check its syntax (no I/O).

    :raises MLOpsConfigError: an option has a form that can never work (e.g. an unknown URI scheme).
    """
    state_raw = _option("state_dir")
    state_dir = Path(state_raw).expanduser() if state_raw else default_state_dir()
    if not state_dir.is_absolute():
        raise MLOpsConfigError(
            f"[mlops] state_dir must be an absolute path, got {state_raw!r}.",
            fix="set AIRFLOW__MLOPS__STATE_DIR (or state_dir in airflow.cfg) to an absolute folder.",
        )
    artifact_root = (_option("artifact_root") or _file_uri(state_dir / "artifacts")).rstrip("/")
    scheme = urlsplit(artifact_root).scheme
    if scheme not in SUPPORTED_SCHEMES:
        raise MLOpsConfigError(
            f"[mlops] artifact_root {artifact_root!r} has scheme {scheme or '(none)'!r}, which the artifact "
            f"store does not support.",
            fix="use file:///absolute/path, s3://bucket/prefix or gs://bucket/prefix "
            "(AIRFLOW__MLOPS__ARTIFACT_ROOT).",
        )
    return MLOpsSettings(
        state_dir=state_dir,
        artifact_root=artifact_root,
        artifact_conn_id=_option("artifact_conn_id") or None,
        offline_root=(_option("offline_root") or _file_uri(state_dir / "offline")).rstrip("/"),
        landing_root=(_option("landing_root") or _file_uri(state_dir / "landing")).rstrip("/"),
        ray_num_cpus=_ray_num_cpus(),
        prediction_log_max_rows=_whole_number("prediction_log_max_rows", 200_000, minimum=1),
        prediction_log_retention_days=_whole_number("prediction_log_retention_days", 0, minimum=0),
        quarantine_root=_option("quarantine_root").rstrip("/") or None,
        state_conn_id=_option("state_conn_id") or "mlops_state",
    )


def _whole_number(key: str, default: int, *, minimum: int) -> int:
    raw = _option(key)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise MLOpsConfigError(
            f"[mlops] {key} must be a whole number >= {minimum}, got {raw!r}.",
            fix=f"set AIRFLOW__MLOPS__{key.upper()} to e.g. {default or 30}, or leave it empty for {default}.",
        )
    return int(raw)


def _ray_num_cpus() -> int | None:
    raw = _option("ray_num_cpus")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise MLOpsConfigError(
            f"[mlops] ray_num_cpus must be a whole number of CPUs (at least 1), got {raw!r}.",
            fix="set AIRFLOW__MLOPS__RAY_NUM_CPUS to e.g. 2, or leave it empty to use every CPU.",
        )
    return int(raw)


#: defaults of the model server's request limits (``[mlops] serving_max_rows`` / ``serving_max_body_bytes``)
DEFAULT_SERVING_MAX_ROWS = 5000
DEFAULT_SERVING_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServingSettings:
    """``[mlops]`` settings of the model server a deploy starts.

    :param max_rows: most rows one ``/predict_batch`` request may carry (more: HTTP 413).
    :param max_body_bytes: largest request body the server reads (more: HTTP 413).
    :param env_allow: further environment variables (names, or prefixes ending in ``*``) the server and the
        router inherit from the worker, beyond the built-in allow-list (``docs/security.md``).
    :param multi_model_memory_budget_mb: memory budget of the models loaded on a multi-model endpoint
        (``[mlops] multi_model_memory_budget_mb``, default 1024); past it the least recently used unload.
    :param shadow_cpu: ``[mlops] shadow_cpu``: ``idle`` (default) runs a shadow version and the router's
        sender of its copies only on CPU production leaves idle (copies it cannot keep up with are dropped
        and counted), ``shared`` at normal priority (every copy answered, competing with production).
    """

    max_rows: int = DEFAULT_SERVING_MAX_ROWS
    max_body_bytes: int = DEFAULT_SERVING_MAX_BODY_BYTES
    env_allow: tuple[str, ...] = ()
    multi_model_memory_budget_mb: float = 1024.0
    shadow_cpu: str = "idle"


def load_serving_settings() -> ServingSettings:
    """Read ``[mlops] serving_max_rows``, ``serving_max_body_bytes`` and ``serving_env_allow`` (no I/O).

    :raises MLOpsConfigError: a limit that is not a positive whole number.
    """
    limits = {}
    for key, default in (
        ("serving_max_rows", DEFAULT_SERVING_MAX_ROWS),
        ("serving_max_body_bytes", DEFAULT_SERVING_MAX_BODY_BYTES),
    ):
        raw = _option(key)
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise MLOpsConfigError(
                f"[mlops] {key} must be a whole number of at least 1, got {raw!r}.",
                fix=f"set AIRFLOW__MLOPS__{key.upper()} to e.g. {default}, or leave it empty for that default.",
            )
        limits[key] = int(raw) if raw else default
    allow = tuple(v.strip() for v in _option("serving_env_allow").replace("\n", ",").split(",") if v.strip())
    raw_budget = _option("multi_model_memory_budget_mb")
    try:
        budget = float(raw_budget) if raw_budget else 1024.0
    except ValueError:
        budget = -1.0
    if not budget > 0:
        raise MLOpsConfigError(
            f"[mlops] multi_model_memory_budget_mb must be a positive number of MB, got {raw_budget!r}.",
            fix="set AIRFLOW__MLOPS__MULTI_MODEL_MEMORY_BUDGET_MB to e.g. 1024, or leave it empty for that default.",
        )
    shadow_cpu = (_option("shadow_cpu") or "idle").lower()
    if shadow_cpu not in ("idle", "shared"):
        raise MLOpsConfigError(
            f"[mlops] shadow_cpu must be 'idle' or 'shared', got {shadow_cpu!r}.",
            fix="set AIRFLOW__MLOPS__SHADOW_CPU to idle (production first; the shadow may see only a sample of "
            "the copies) or shared (the shadow answers every copy, competing with production for the CPU).",
        )
    return ServingSettings(
        max_rows=limits["serving_max_rows"],
        max_body_bytes=limits["serving_max_body_bytes"],
        env_allow=allow,
        multi_model_memory_budget_mb=budget,
        shadow_cpu=shadow_cpu,
    )


def check_settings(settings: MLOpsSettings) -> None:
    """Verify that the settings can be used on this worker: folders writable, connections present.

    :raises MLOpsConfigError: naming the setting at fault and the fix.
    """
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.state_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise MLOpsConfigError(
            f"[mlops] state_dir {str(settings.state_dir)!r} is not writable by this worker ({err.strerror}).",
            fix="point AIRFLOW__MLOPS__STATE_DIR at a folder the Airflow worker user can write, "
            "or fix that folder's permissions.",
        ) from err

    scheme = settings.artifact_scheme
    if scheme not in REMOTE_SCHEMES:
        return
    conn_type = REMOTE_SCHEMES[scheme]
    if not settings.artifact_conn_id:
        raise MLOpsConfigError(
            f"[mlops] artifact_root {settings.artifact_root!r} is remote but [mlops] artifact_conn_id is not set.",
            fix=f"create an Airflow connection of type {conn_type!r} and set AIRFLOW__MLOPS__ARTIFACT_CONN_ID "
            "to its id.",
        )
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(settings.artifact_conn_id)
    except AirflowNotFoundException as err:
        raise MLOpsConfigError(
            f"[mlops] artifact_conn_id {settings.artifact_conn_id!r} names no Airflow connection "
            f"(needed for artifact_root {settings.artifact_root!r}).",
            fix=f"create the connection (type {conn_type!r}) with `airflow connections add` or in the UI, "
            "or correct AIRFLOW__MLOPS__ARTIFACT_CONN_ID.",
        ) from err


@contextlib.contextmanager
def environ_set(values: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """``values`` set in this process's environment (and ``unset`` removed) for the block; what was
    there before is put back when the block ends, also on errors."""
    unset = list(unset)
    saved = {key: os.environ.get(key) for key in [*values, *unset]}
    for key in unset:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
