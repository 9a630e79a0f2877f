"""Many models behind one endpoint: the deployments file and the least-recently-used model cache.

No BentoML here (the deploy operator writes the deployments file with :func:`register_deployment`; the
service, :mod:`airflow_mlops.ml.multi_service`, reads it with :func:`read_deployments` and keeps its loaded
models in a :class:`ModelCache`).

The deployments file of an endpoint (``<state_dir>/deployments/multi/<endpoint>.models.json``, see
:func:`deployments_path`) says which models the endpoint serves and which version of each::

    {"endpoint": "shared", "generation": 3, "memory_budget_mb": 512,
     "models": {"delays": {"version": "v1f2...", "deployed_at": "...", "by": "dag/run/task"},
                "demand": {"version": null}}}

``version`` null means the registry's ``production`` version at the time the model is loaded. It is
replaced atomically (a rename), under a lock, so the server never reads half a file; the server reads it
again whenever its modification time or size changes. ``memory_budget_mb`` (optional) overrides the
server's ``MLOPS_MULTI_MEMORY_BUDGET_MB``, so a deploy can change the budget of a running endpoint.

Memory: what a model is charged is the growth of the server's resident set size (RSS) while it is loaded
and called once (:func:`rss_bytes` before and after; loads run one at a time), but at least the size of
its model files, and at least what the same version was charged before in this process: memory freed by
an evicted model is often kept by the allocator and reused, so a reload can show little growth although
the model takes as much as before. It is a measurement of this process, not an estimate from the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_mlops.exceptions import MLOpsConfigError, MLOpsError

log = logging.getLogger(__name__)

MB = 1024 * 1024
#: the budget when neither the deployments file nor ``MLOPS_MULTI_MEMORY_BUDGET_MB`` sets one
DEFAULT_MEMORY_BUDGET_MB = 1024.0
#: how long a refused model's error is answered before loading it is tried again
FAILURE_RETRY_SECONDS = 30.0


class UnknownModel(MLOpsError):
    """The model is not deployed on this endpoint (HTTP 404, with the models it serves)."""


# ---------------------------------------------------------------------------------- deployments file
@dataclass(frozen=True)
class ModelDeployment:
    """One model of an endpoint: its pinned version (None: production when loaded)."""

    name: str
    version: str | None = None
    feature_service: str | None = None


@dataclass(frozen=True)
class Deployments:
    """The content of an endpoint's deployments file."""

    endpoint: str
    models: dict[str, ModelDeployment] = field(default_factory=dict)
    memory_budget_mb: float | None = None
    generation: int = 0


def deployments_path(state_dir: Path | str, endpoint: str) -> Path:
    """Where the deployments file of ``endpoint`` lives."""
    from airflow_mlops.hooks.bentoml import check_model_name

    return Path(state_dir) / "deployments" / "multi" / f"{check_model_name(endpoint)}.models.json"


def _bad(path: Path | str, problem: str) -> MLOpsConfigError:
    return MLOpsConfigError(
        f"deployments file {str(path)!r} {problem}.",
        fix="deploy into the endpoint with MultiModelDeployOperator (it writes this file), or fix the file "
        "by hand to the format in docs/serving.md.",
    )


def parse_deployments(data: Any, path: Path | str = "<memory>") -> Deployments:
    """Check and read the content of a deployments file.

    :raises MLOpsConfigError: not an object, a bad model name, a version that is not a string, a budget
        that is not a positive number.
    """
    from airflow_mlops.hooks.bentoml import check_model_name

    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise _bad(path, 'is not a JSON object with a "models" object')
    models: dict[str, ModelDeployment] = {}
    for name, entry in data.get("models", {}).items():
        try:
            check_model_name(name)
        except MLOpsError as err:
            raise _bad(
                path, f"names a model {name!r} that is not a valid model name ({err.problem})"
            ) from None
        entry = entry if entry is not None else {}
        if not isinstance(entry, dict):
            raise _bad(path, f"gives model {name!r} a {type(entry).__name__}, not an object")
        version = entry.get("version")
        service = entry.get("feature_service")
        for key, value in (("version", version), ("feature_service", service)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise _bad(path, f"gives model {name!r} a {key} {value!r} that is not a non-empty string")
        models[name] = ModelDeployment(name=name, version=version, feature_service=service)
    budget = data.get("memory_budget_mb")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
    ):
        raise _bad(path, f"sets memory_budget_mb to {budget!r}, not a positive number")
    generation = data.get("generation") or 0
    return Deployments(
        endpoint=str(data.get("endpoint") or ""),
        models=models,
        memory_budget_mb=float(budget) if budget is not None else None,
        generation=int(generation) if isinstance(generation, int) else 0,
    )


def read_deployments(path: Path | str) -> Deployments:
    """The deployments file at ``path`` (an endpoint without a file serves no model).

    :raises MLOpsConfigError: the file is not JSON or not in the format of :func:`parse_deployments`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Deployments(endpoint="")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise _bad(path, f"is not JSON ({err})") from None
    return parse_deployments(data, path)


@contextlib.contextmanager
def locked_deployments(path: Path | str) -> Iterator[dict[str, Any]]:
    """Read-modify-write of a deployments file under an exclusive lock; written atomically (a rename) when
    the block succeeds, with ``generation`` increased."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("models", {})
        yield data
        parse_deployments(data, path)  # never write a file the server would refuse
        data["generation"] = int(data.get("generation") or 0) + 1
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)


def register_deployment(
    path: Path | str,
    endpoint: str,
    model: str,
    version: str | None,
    *,
    feature_service: str | None = None,
    memory_budget_mb: float | None = None,
    by: str | None = None,
) -> dict[str, Any] | None:
    """Serve ``model`` at ``version`` on the endpoint (replacing the version it served); returns the entry it
    replaced (None when the model was not deployed there), so a failed deploy can put it back with
    :func:`restore_deployment`."""
    with locked_deployments(path) as data:
        data["endpoint"] = endpoint
        previous = data["models"].get(model)
        data["models"][model] = {
            "version": version,
            "feature_service": feature_service,
            "deployed_at": datetime.now(UTC).isoformat(),
            "by": by,
        }
        if memory_budget_mb is not None:
            data["memory_budget_mb"] = memory_budget_mb
    return previous


def restore_deployment(path: Path | str, model: str, previous: dict[str, Any] | None) -> None:
    """Put back the entry :func:`register_deployment` replaced (remove the model when there was none)."""
    with locked_deployments(path) as data:
        if previous is None:
            data["models"].pop(model, None)
        else:
            data["models"][model] = previous


class DeploymentsWatcher:
    """The endpoint's deployments, read again when the file changes (checked at most every ``every`` s).
    A file that became unreadable keeps the last good deployments and sets :attr:`error`."""

    def __init__(self, path: Path | str, every: float = 0.2) -> None:
        self.path = Path(path)
        self.every = every
        self.current = Deployments(endpoint="")
        self.error: str | None = None
        self._seen: tuple[int, int] | None = None
        self._checked = 0.0

    def get(self) -> Deployments:
        now = time.monotonic()
        if now - self._checked < self.every:
            return self.current
        self._checked = now
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = (0, 0)
        if seen != self._seen:
            try:
                self.current = read_deployments(self.path)
                self.error = None
            except MLOpsError as err:
                self.error = str(err)
                log.error("Keeping the previous deployments: %s", err)
            self._seen = seen
        return self.current


# ---------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``), so the RSS growth of the next load
    is measured from a settled heap. No full garbage collection: an unloaded model is freed by reference
    counting once its last request is answered, and a collection of the whole server's heap cost more than
    the load itself (a reload measured 1.3 s with it, against a 0.4 s first load)."""
    with contextlib.suppress(Exception):  # not glibc: nothing to trim
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------- the cache
@dataclass
class CachedModel:
    """A loaded model in the cache, with what it costs and how it is used."""

    name: str
    version: str
    model: Any
    memory_bytes: int
    rss_delta_bytes: int
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    #: requests answered by this load
    hits: int = 0
    #: loads of this model since the server started, this one included
    loads: int = 1

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "memory_mb": round(self.memory_bytes / MB, 3),
            "rss_delta_mb": round(self.rss_delta_bytes / MB, 3),
            "load_seconds": round(self.load_seconds, 4),
            "hits": self.hits,
            "loads": self.loads,
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            "last_used": datetime.fromtimestamp(self.last_used, UTC).isoformat(),
        }


@dataclass
class Loaded:
    """What a loader returns: the model object, its version, and the size of its files (bytes)."""

    model: Any
    version: str
    file_bytes: int = 0


class ModelCache:
    """Loaded models of an endpoint, least recently used first out once their memory passes the budget.

    :param loader: ``loader(deployment) -> Loaded``; runs in ``load_executor`` (one load at a time, so the
        RSS growth it causes is its own); raises :class:`~airflow_mlops.exceptions.MLOpsError` for a model
        that must not be served (a failed verification, a missing signature).
    :param budget_bytes: a callable giving the budget now (the deployments file can change it).
    :param load_executor: where loads run (a single-thread executor).
    :param memory: the process' memory now (default :func:`rss_bytes`).
    :param on_evict: called with each evicted :class:`CachedModel` (e.g. to log it).

    Concurrent first requests for the same model share one load (:meth:`get` awaits the load under way).
    The model just loaded is never evicted by its own load, even alone over the budget (it is then the only
    one loaded, and a warning says so).
    """

    def __init__(
        self,
        loader: Callable[[ModelDeployment], Loaded],
        budget_bytes: Callable[[], int],
        load_executor: Any,
        *,
        memory: Callable[[], int] = rss_bytes,
        on_evict: Callable[[CachedModel], None] | None = None,
        release: Callable[[], None] = release_freed_memory,
    ) -> None:
        self.loader = loader
        self.budget_bytes = budget_bytes
        self.load_executor = load_executor
        self.memory = memory
        self.on_evict = on_evict
        self.release = release
        self.models: OrderedDict[str, CachedModel] = OrderedDict()
        self.loading: dict[str, asyncio.Future[CachedModel]] = {}
        self.failures: dict[tuple[str, str | None], tuple[MLOpsError, float]] = {}
        self.evictions = 0
        self.charged: dict[tuple[str, str], int] = {}
        #: loads of each model since the server started (a reload after an eviction counts)
        self.load_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def used_bytes(self) -> int:
        return sum(m.memory_bytes for m in self.models.values())

    def _current(self, deployment: ModelDeployment) -> CachedModel | None:
        cached = self.models.get(deployment.name)
        if cached is not None and deployment.version not in (None, cached.version):
            return None  # a deploy pinned another version: load it
        return cached

    async def get(self, deployment: ModelDeployment) -> CachedModel:
        """The loaded model for ``deployment``, loading it first when needed (and evicting past the budget).

        :raises MLOpsError: the model cannot be served (answered for ``FAILURE_RETRY_SECONDS``, then retried).
        """
        cached = self._current(deployment)
        if cached is None:
            cached = await self._load(deployment)
        else:
            self.models.move_to_end(deployment.name)
        cached.hits += 1
        cached.last_used = time.time()
        return cached

    async def _load(self, deployment: ModelDeployment) -> CachedModel:
        key = (deployment.name, deployment.version)
        failed = self.failures.get(key)
        if failed and time.monotonic() - failed[1] < FAILURE_RETRY_SECONDS:
            raise failed[0]
        pending = self.loading.get(deployment.name)
        if pending is None or pending.done():
            replaced = self.models.get(deployment.name)
            if replaced is not None and deployment.version not in (None, replaced.version):
                self.models.pop(deployment.name)  # the old version goes first; requests holding it finish
                log.info(
                    "Unloading %s:%s: version %s is deployed now",
                    replaced.name,
                    replaced.version,
                    deployment.version,
                )
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self.load_executor, self._load_now, deployment)
            self.loading[deployment.name] = pending
        try:
            cached = await asyncio.shield(pending)
        except MLOpsError as err:
            self.failures[key] = (err, time.monotonic())
            raise
        finally:
            if self.loading.get(deployment.name) is pending and pending.done():
                del self.loading[deployment.name]
        if self.models.get(deployment.name) is not cached:  # first of the waiters: put it in
            self.models[deployment.name] = cached
            self.models.move_to_end(deployment.name)
            self.failures.pop(key, None)
            self._evict(keep=deployment.name)
        cached = self.models.get(deployment.name, cached)
        if deployment.version not in (None, cached.version):  # a newer deploy came in meanwhile
            return await self._load(deployment)
        return cached

    def _load_now(self, deployment: ModelDeployment) -> CachedModel:
        """Load in the load thread, measuring the RSS growth (one load at a time)."""
        with self._lock:
            before = self.memory()
            started = time.monotonic()
            loaded = self.loader(deployment)
            seconds = time.monotonic() - started
            delta = max(0, self.memory() - before)
            key = (deployment.name, loaded.version)
            charged = max(delta, loaded.file_bytes, self.charged.get(key, 0))
            self.charged[key] = charged
            cached = CachedModel(
                name=deployment.name,
                version=loaded.version,
                model=loaded.model,
                memory_bytes=charged,
                rss_delta_bytes=delta,
                load_seconds=seconds,
                loads=self.load_counts.get(deployment.name, 0) + 1,
            )
            self.load_counts[deployment.name] = cached.loads
            log.info(
                "Loaded %s:%s in %.2fs, %.1f MB (RSS grew %.1f MB)",
                cached.name,
                cached.version,
                seconds,
                charged / MB,
                delta / MB,
            )
            return cached

    def _evict(self, keep: str) -> list[CachedModel]:
        """Unload least recently used models (never ``keep``) until the memory used fits the budget."""
        budget = self.budget_bytes()
        evicted = []
        while self.used_bytes() > budget:
            victim = next((name for name in self.models if name != keep), None)
            if victim is None:
                log.warning(
                    "Model %s alone takes %.1f MB, over the endpoint's budget of %.1f MB; it stays loaded "
                    "(raise the budget, or serve it on an endpoint of its own)",
                    keep,
                    self.used_bytes() / MB,
                    budget / MB,
                )
                break
            gone = self.models.pop(victim)
            evicted.append(gone)
            self.evictions += 1
            log.info(
                "Unloaded %s:%s (least recently used; %.1f MB)",
                gone.name,
                gone.version,
                gone.memory_bytes / MB,
            )
            if self.on_evict is not None:
                self.on_evict(gone)
        if evicted:
            self.load_executor.submit(self.release)
        return evicted

    def trim(self) -> list[CachedModel]:
        """Unload least recently used models until the budget is met (after the budget was lowered); the
        most recently used stays."""
        if not self.models:
            return []
        return self._evict(keep=next(reversed(self.models)))

    def forget(self, names: set[str]) -> None:
        """Unload the models no longer deployed (they are not among ``names``)."""
        for name in [n for n in self.models if n not in names]:
            self.models.pop(name)
            log.info("Unloaded %s: it is no longer deployed on this endpoint", name)
