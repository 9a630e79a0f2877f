"""The Bento service that serves any registered tabular model over HTTP (BentoML 1.4 ``@bentoml.service``).

It is loaded by ``bentoml serve`` (never by DAG parsing), so it imports BentoML, pydantic and the model
libraries at module level. What it serves comes from the environment, which
:class:`~airflow_mlops.operators.serving.BentoDeployOperator` sets:

``MLOPS_SERVE_MODEL``
    registry name of the model (required).
``MLOPS_SERVE_VERSION``
    registered version; empty means the registry's ``production`` version when the server starts.
``MLOPS_SERVE_FEATURE_SERVICE``
    Feast feature service; empty means the one recorded with the model version at registration.
``MLOPS_SERVE_FEAST_REPO`` / ``MLOPS_SERVE_FEAST_CONN_ID``
    Feast repository folder and (optional) ``feast`` connection of the online store.
``MLOPS_SERVE_BENTOML_CONN_ID``
    optional ``bentoml`` connection; its password is the API key clients must send
    (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``).
``MLOPS_SERVE_LOG_FLUSH_ROWS`` / ``MLOPS_SERVE_LOG_FLUSH_SECONDS``
    when the prediction log is flushed to the artifact store (default 2000 rows or 5 seconds).
``MLOPS_SERVE_MODEL_THREADS``
    threads one model call may use (default 1; see :func:`limit_model_threads`).
``MLOPS_SERVE_ACCESS_LOG``
    ``true`` turns on BentoML's access log (one log line per request). Off by default: the prediction log
    already records every answered request, and writing a line per request took a fifth of the event
    loop's time at 700 requests/s (measured with py-spy on ``benchmarks/bench_serving.py``), which showed
    in the p99 latency.
``MLOPS_SERVE_MAX_ROWS`` / ``MLOPS_SERVE_MAX_BODY_BYTES``
    most rows of one ``/predict_batch`` request and largest request body (defaults 5000 rows, 8 MiB; the
    deployer sets them from ``[mlops] serving_max_rows`` / ``serving_max_body_bytes``); beyond: HTTP 413.
``MLOPS_SERVE_SHADOW``
    ``true`` for a server deployed with ``strategy="shadow"``: it answers copies of live requests the
    router sends it, and its prediction-log records say ``"shadow": true`` (the drift monitor leaves them
    out). Each ``/predict`` record carries the request's ``X-MLOps-Request-Id`` as ``request_id``. Its
    processes take the lowest CPU priority (:func:`yield_cpu_to_production`), so a shadow on production's
    host uses only the CPU production leaves idle.

The request and answer schemas are the model's own: when the module is imported it reads the served
version's registry record and its :class:`~airflow_mlops.ml.signature.ModelSignature`, and builds ``Row``
(the entity keys and request features, typed and bounded) and ``Answer`` (by task: ``probability`` and
``label``; ``label`` and ``probabilities``; ``value``; always ``model`` and ``model_version``) with
:func:`~airflow_mlops.ml.signature.request_model` / :func:`~airflow_mlops.ml.signature.response_model`.
``/docs.json`` therefore shows the model's fields. When the signature cannot be read (no such model, no
production version, a version registered without a signature) the service still starts, with a generic
schema, and stays not ready: ``/ready`` answers 503 saying why.

Endpoints: ``POST /predict`` (``{"row": {...}}``), ``POST /predict_batch`` (``{"rows": [...]}``, BentoML's
adaptive batching), ``GET /ready`` (model loaded? which version? why not?), and BentoML's ``/livez``,
``/readyz`` (false until the model is loaded), ``/metrics`` and ``/docs.json``. Concurrent single-row
requests are merged by a :class:`MicroBatcher`: they share one feature lookup (one Feast online read, keyed
by the signature's entity keys) and one model call. Requests time out after 30 s (504) through
:class:`RequestTimeoutMiddleware`, which lets go of a request once it is answered. Every prediction is
written to the prediction log (:mod:`airflow_mlops.ml.prediction_log`).

The model is loaded in the background after start with :meth:`BentoMLHook.load`, so its recorded sha256
is checked; a tampered model is never served (the service stays not ready and ``/ready`` says why).
Bad input gets a 400 naming the field (a missing entity key, a wrong type, an unknown category, a value
far outside the training range); an unreachable feature store a 503 naming it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any, Generic, Protocol, TypeVar

import bentoml
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from pydantic import BaseModel, BeforeValidator, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from airflow_mlops.config import DEFAULT_SERVING_MAX_BODY_BYTES, DEFAULT_SERVING_MAX_ROWS
from airflow_mlops.exceptions import FeatureStoreError, MLOpsError
from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record
from airflow_mlops.ml.signature import (
    ModelSignature,
    answers,
    logged_value,
    request_model,
    response_model,
    signature_of,
)

log = logging.getLogger(__name__)

#: paths answered without an API key (probes, metrics, the API description)
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/ready", "/metrics", "/docs.json", "/schema.json"})
#: the request's ``X-MLOps-Request-Id`` (set by :class:`GuardMiddleware`, read by ``predict``)
REQUEST_ID: ContextVar[str | None] = ContextVar("mlops_request_id", default=None)


# ---------------------------------------------------------------------------------------- feature lookups
class FeatureStoreUnavailable(FeatureStoreError):
    """The online feature store did not answer; requests get a 503 naming it."""


class FeatureLookup(Protocol):
    """Where the features a request does not carry come from."""

    description: str

    def provides(self) -> set[str]:
        """Column names this lookup can fill."""

    def fetch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Feature values for each request row (same order)."""


class RequestOnlyLookup:
    """For models that need nothing beyond the request: no store is contacted."""

    description = "request features only"

    def provides(self) -> set[str]:
        return set()

    def fetch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{} for _ in rows]


class FeastLookup:
    """Online features of a Feast feature service, keyed by the entities found in the request.

    :param feature_service: the feature service the model was trained with.
    :param wanted: model feature columns to fill (the signature's ``store_features``); Feast's
        ``<view>__<feature>`` names and the bare ``<feature>`` names (when unambiguous) are both accepted.
    :param entity_keys: the request fields that are entity keys (the signature's ``entity_keys``); a join
        key of the feature service that a request does not carry is sent empty (its features come back
        missing, as for an unknown entity).
    :param repo_path: Feast repository folder.
    :param feast_conn_id: optional ``feast`` connection (e.g. a Redis online store).
    """

    def __init__(
        self,
        feature_service: str,
        wanted: list[str],
        repo_path: str | None,
        feast_conn_id: str | None,
        entity_keys: list[str] | None = None,
    ) -> None:
        from airflow_mlops.hooks.feast import FeastHook

        self.feature_service = feature_service
        self.wanted = list(wanted)
        self.entity_keys = list(entity_keys or [])
        self.hook = FeastHook(feast_conn_id=feast_conn_id, repo_path=repo_path)
        self.description = f"Feast feature service {feature_service!r}"
        self._columns: dict[str, str] = {}
        self._join_keys: list[str] = []
        self._service: Any = None

    def prepare(self) -> list[str]:
        """Resolve the feature service's columns and join keys (reads the Feast registry); returns the join
        keys that are not entity keys of the signature. The feature service is kept: looking it up by name
        on every read makes Feast read its registry again (measured: 9.5 ms against 1.3 ms
        per 16-row read)."""
        service = self._service = self.hook.feature_service(self.feature_service)
        keys, columns = self.hook.service_columns(service)
        self._columns = {w: columns[w] for w in self.wanted if w in columns}
        self._join_keys = keys
        return [k for k in keys if k not in self.entity_keys]

    def provides(self) -> set[str]:
        return set(self._columns)

    def fetch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self._columns:
            return [{} for _ in rows]
        entity_rows = [{k: "" if row.get(k) is None else row[k] for k in self._join_keys} for row in rows]
        try:
            answer = self.hook.online_features(self._service, entity_rows)
        except Exception as err:
            raise FeatureStoreUnavailable(
                f"the online store of {self.description} did not answer ({type(err).__name__}: {err}).",
                fix="check that the online store is running and reachable from the serving host.",
            ) from err
        return [
            {column: answer[source][i] for column, source in self._columns.items()} for i in range(len(rows))
        ]


# ---------------------------------------------------------------------------------------- serving state
# ---------------------------------------------------------------------------------------- serving state
@dataclass
class ServeSettings:
    """What to serve, read from ``MLOPS_SERVE_*`` environment variables."""

    model: str
    version: str | None
    feature_service: str | None
    feast_repo: str | None
    feast_conn_id: str | None
    bentoml_conn_id: str | None
    flush_rows: int = 2000
    flush_seconds: float = 5.0
    model_threads: int = 1
    access_log: bool = False
    max_rows: int = DEFAULT_SERVING_MAX_ROWS
    max_body_bytes: int = DEFAULT_SERVING_MAX_BODY_BYTES
    shadow: bool = False

    @classmethod
    def from_env(cls) -> ServeSettings:
        env = os.environ
        return cls(
            model=env.get("MLOPS_SERVE_MODEL", ""),
            version=env.get("MLOPS_SERVE_VERSION") or None,
            feature_service=env.get("MLOPS_SERVE_FEATURE_SERVICE") or None,
            feast_repo=env.get("MLOPS_SERVE_FEAST_REPO") or None,
            feast_conn_id=env.get("MLOPS_SERVE_FEAST_CONN_ID") or None,
            bentoml_conn_id=env.get("MLOPS_SERVE_BENTOML_CONN_ID") or None,
            flush_rows=int(env.get("MLOPS_SERVE_LOG_FLUSH_ROWS") or 2000),
            flush_seconds=float(env.get("MLOPS_SERVE_LOG_FLUSH_SECONDS") or 5.0),
            model_threads=max(1, int(env.get("MLOPS_SERVE_MODEL_THREADS") or 1)),
            access_log=(env.get("MLOPS_SERVE_ACCESS_LOG") or "").strip().lower()
            in ("1", "true", "yes", "on"),
            max_rows=max(1, int(env.get("MLOPS_SERVE_MAX_ROWS") or DEFAULT_SERVING_MAX_ROWS)),
            max_body_bytes=max(
                1, int(env.get("MLOPS_SERVE_MAX_BODY_BYTES") or DEFAULT_SERVING_MAX_BODY_BYTES)
            ),
            shadow=(env.get("MLOPS_SERVE_SHADOW") or "").strip().lower() in ("1", "true", "yes", "on"),
        )


@dataclass
class LoadedModel:
    name: str
    version: str
    signature: ModelSignature
    predictor: Any
    lookup: Any


@dataclass
class ServingState:
    """Shared by the service instance and the ASGI pieces of one worker process."""

    model: str = ""
    loaded: LoadedModel | None = None
    error: str | None = None
    api_key: str | None = None
    #: an API key was configured (a ``bentoml`` connection): requests need it even when it came back empty
    auth_required: bool = False
    unavailable: str | None = None
    unavailable_at: float = 0.0

    def reason(self) -> str:
        """Why the service cannot answer right now (used as the body of every 503)."""
        if self.error:
            return f"model {self.model!r} is not served: {self.error}"
        if self.loaded is None:
            return f"model {self.model!r} is still loading; retry shortly (GET /ready says when)."
        if self.unavailable and time.monotonic() - self.unavailable_at < 30:
            return self.unavailable
        return "the service is overloaded; retry shortly."


STATE = ServingState()


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class ServedSchema:
    """The served version and its request/answer schemas, read from the registry at import."""

    version: str | None
    record: dict[str, Any] | None
    signature: ModelSignature | None
    request: Any
    response: Any
    error: str | None = None


def served_schema(settings: ServeSettings) -> ServedSchema:
    """The signature of the version to serve and the pydantic models built from it. When it cannot be
    read, a generic schema (any JSON object) with ``error`` saying why: the service still starts and
    ``/ready`` gives the reason."""
    from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError

    generic = dict[str, Any]
    try:
        if not settings.model:
            raise ModelRegistryError(
                "MLOPS_SERVE_MODEL is not set.", fix="deploy with BentoDeployOperator, which sets it."
            )
        hook = BentoMLHook(bentoml_conn_id=settings.bentoml_conn_id)
        version, record = hook.served_record(settings.model, settings.version)
        signature = signature_of(record, tag=record.get("tag"))
        return ServedSchema(
            version=version,
            record=record,
            signature=signature,
            request=request_model(signature, settings.model),
            response=response_model(signature, settings.model),
        )
    except MLOpsError as err:
        error = str(err)
    except Exception as err:  # the service must start and say why on /ready
        log.exception("Reading the signature of model %s failed", settings.model)
        error = f"{type(err).__name__}: {err}"
    if settings.model:
        log.error("Not serving model %s: %s", settings.model, error)
    return ServedSchema(
        version=None, record=None, signature=None, request=generic, response=generic, error=error
    )


def yield_cpu_to_production(sched_idle: bool = False) -> None:
    """Give this process the lowest CPU priority there is, for a shadow that shares its host with production.

    Called twice in a shadow server. At import (in ``bentoml serve``'s supervisor and in each worker): nice
    19 for every thread and for the process's session (with the kernel's autogroup scheduling, on by default,
    CPU is shared between sessions first, and ``bentoml serve`` runs each worker in a session of its own, so a
    priority within the session alone would not rank the shadow below production). Then, in each worker once
    its model is loaded and warmed up (``sched_idle=True``): every thread in the ``SCHED_IDLE`` scheduling
    class (Linux), inherited by the threads and processes started afterwards: it runs only on CPU time no
    normal task wants, and a normal task that wakes up preempts it at once, where a nice 19 thread could
    still hold a core for its time slice while production waits. The load itself runs at nice 19 only, so
    that a shadow deployed on a busy host still becomes ready (at ``SCHED_IDLE`` it got no CPU to load for
    minutes). A shadow therefore serves on the CPU production leaves idle and cannot slow production's
    answers by competing for cores; when there is none to spare, its copies queue and the router drops the
    ones beyond its bounds (counted as skipped). Failures (e.g. no ``/proc``, not Linux) are logged and
    ignored: the shadow still serves. ``[mlops] shadow_cpu = shared`` (``MLOPS_SHADOW_CPU`` from the deploy) keeps a normal priority instead
    (:func:`~airflow_mlops.ml.router.shadow_cpu`).
    """
    from airflow_mlops.ml.router import run_on_idle_cpu, shadow_cpu

    if shadow_cpu() == "shared":
        log.info("Shadow server: [mlops] shadow_cpu = shared, it keeps a normal CPU priority")
        return
    refused = run_on_idle_cpu(sched_idle=sched_idle)
    if refused:
        log.info("Shadow server: not all of its CPU priority could be lowered: %s", refused)


SETTINGS = ServeSettings.from_env()
if SETTINGS.shadow:
    yield_cpu_to_production()
SCHEMA = served_schema(SETTINGS)
#: one request row of the served model (its entity keys and request features)
Row = SCHEMA.request
#: the served model's answer for one row
Answer = SCHEMA.response


class RequestTooLarge(BentoMLException):
    """A request over one of the service's limits; :class:`GuardMiddleware` answers it with a 413 naming it."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _count_rows(rows: Any) -> Any:
    """Refuse a ``/predict_batch`` request of more than ``max_rows`` rows before any row is validated."""
    if isinstance(rows, list) and len(rows) > SETTINGS.max_rows:
        raise RequestTooLarge(f"{len(rows)} rows")
    return rows


#: the rows of one /predict_batch request, at most ``max_rows`` (counted before they are validated)
BatchRows = Annotated[list[Row], BeforeValidator(_count_rows), Field(max_length=SETTINGS.max_rows)]


def load_model(settings: ServeSettings, schema: ServedSchema) -> LoadedModel:
    """Load the version whose schema is served through the registry (sha256 checked) and prepare its
    feature lookup.

    :raises MLOpsError: no signature, a tampered file, features nobody can provide.
    """
    from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError

    if schema.error or schema.signature is None or schema.record is None or schema.version is None:
        raise ModelRegistryError(schema.error or f"no signature was read for {settings.model!r}.")
    signature, record, version = schema.signature, schema.record, schema.version
    predictor = BentoMLHook(bentoml_conn_id=settings.bentoml_conn_id).load(settings.model, version)
    carried = {f.name for f in signature.request_fields}
    missing = [f for f in predictor.features if f not in carried]
    feature_service = settings.feature_service or signature.feature_service or record.get("feature_service")
    lookup: Any = RequestOnlyLookup()
    if missing:
        if not feature_service:
            raise ModelRegistryError(
                f"{record['tag']} needs features {missing} that a request does not carry, and no feature "
                "service is known for it.",
                fix="register the model with feature_service=, or set MLOPS_SERVE_FEATURE_SERVICE.",
            )
        lookup = FeastLookup(
            feature_service,
            missing,
            settings.feast_repo,
            settings.feast_conn_id,
            entity_keys=[k.name for k in signature.entity_keys],
        )
        absent_keys = lookup.prepare()
        if absent_keys:
            log.warning(
                "Feature service %r is keyed by %s, which requests to %s do not carry; those features "
                "come back missing",
                feature_service,
                absent_keys,
                record["tag"],
            )
        unknown = [f for f in missing if f not in lookup.provides()]
        if unknown:
            raise ModelRegistryError(
                f"{record['tag']} needs features {unknown}, which feature service {feature_service!r} "
                "does not provide.",
                fix="serve the model with the feature service it was trained with.",
            )
    return LoadedModel(
        name=settings.model, version=version, signature=signature, predictor=predictor, lookup=lookup
    )


def warm_up_row(signature: ModelSignature) -> dict[str, Any]:
    """A plausible request row made from the signature (the first allowed value, the middle of the training
    range), for the model call made once before the service says it is ready."""
    row: dict[str, Any] = {}
    for spec in signature.request_fields:
        if spec.allowed:
            row[spec.name] = spec.allowed[0]
        elif spec.minimum is not None and spec.maximum is not None:
            middle = (spec.minimum + spec.maximum) / 2
            row[spec.name] = round(middle) if spec.type == "integer" else middle
        else:
            row[spec.name] = {"string": "x", "boolean": False}.get(spec.type, 0)
    return row


def load_and_warm_up(settings: ServeSettings, schema: ServedSchema) -> LoadedModel:
    """:func:`load_model`, then one model call on :func:`warm_up_row` (from the calling thread, with its
    thread limit set), so the first request does not pay for the model's lazy set-up. Used by the
    single-model service and by :mod:`airflow_mlops.ml.multi_service`.

    :raises MLOpsError: as :func:`load_model`.
    """
    loaded = load_model(settings, schema)
    limit_model_threads(settings.model_threads)
    row = warm_up_row(loaded.signature)
    loaded.predictor.predict([{f: row.get(f) for f in loaded.predictor.features}])
    return loaded


def predict_rows(
    loaded: LoadedModel,
    rows: Sequence[Any],
    request_ids: Sequence[str | None] | None = None,
    *,
    prediction_log: PredictionLogWriter,
    model_threads: int = 1,
    shadow: bool = False,
) -> list[dict[str, Any]]:
    """The task answers of ``loaded`` for ``rows`` (pydantic rows or dicts): one feature lookup and one
    model call for all of them; one record per row goes to ``prediction_log`` (with its request id when
    given). Shared by the single-model and the multi-model services.

    :raises FeatureStoreUnavailable: the online store did not answer.
    """
    if not rows:
        return []
    limit_model_threads(model_threads)
    sent = [r.model_dump(mode="json") if isinstance(r, BaseModel) else dict(r) for r in rows]
    looked_up = loaded.lookup.fetch(sent)
    wanted = loaded.predictor.features
    features = []
    for row, extra in zip(sent, looked_up, strict=True):
        merged = {**row, **extra}  # once per row, not once per feature
        features.append({f: merged.get(f) for f in wanted})
    signature = loaded.signature
    task_answers = answers(signature, loaded.predictor.predict(features))
    at = datetime.now(UTC).isoformat()
    prediction_log.append(
        [
            make_record(
                model=loaded.name,
                version=loaded.version,
                task=signature.task,
                request=row,
                features=feature_row,
                prediction=logged_value(signature, answer),
                answer=answer,
                time=at,
                request_id=request_id,
                shadow=shadow,
            )
            for row, feature_row, answer, request_id in zip(
                sent, features, task_answers, request_ids or [None] * len(sent), strict=True
            )
        ]
    )
    return task_answers


# ---------------------------------------------------------------------------------------- ASGI pieces
def too_large(limit: str, settings: ServeSettings) -> str:
    """The body of a 413: which limit, its value, and the setting that sets it."""
    if limit == "body":
        return (
            f"the request body is larger than the service's limit of {settings.max_body_bytes} bytes "
            "([mlops] serving_max_body_bytes, MLOPS_SERVE_MAX_BODY_BYTES on the server); send fewer rows per request."
        )
    return (
        f"the request carries more than the service's limit of {settings.max_rows} rows per /predict_batch "
        "request ([mlops] serving_max_rows, MLOPS_SERVE_MAX_ROWS on the server); split it into smaller requests."
    )


class GuardMiddleware:
    """Checks the API key (when one is configured) and the request body's size (``Content-Length`` before
    anything is read; a body without it is counted as it arrives), answers a request over a limit with a 413
    naming the limit and its setting, and gives every 503 a body that says why.

    The state and settings it reads are class attributes, so :mod:`airflow_mlops.ml.multi_service` uses
    it with its own (and with ``explain_503 = False``: its routes write their own 503 bodies, per model).
    """

    #: the :class:`ServingState` read (None: this module's ``STATE``)
    serving_state: Any = None
    #: the :class:`ServeSettings` read (None: this module's ``SETTINGS``)
    serve_settings: Any = None
    #: replace the body of every 503 with ``state.reason()``
    explain_503 = True

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def state(self) -> Any:
        return STATE if self.serving_state is None else self.serving_state

    @property
    def settings(self) -> Any:
        return SETTINGS if self.serve_settings is None else self.serve_settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if (self.state.api_key or self.state.auth_required) and not self._authorized(scope):
            response = JSONResponse(
                {"error": "missing or wrong API key; send 'Authorization: Bearer <key>' or 'X-API-Key'."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        length = request_id = None
        for key, value in scope["headers"]:  # one pass: the body's length and the request id
            if key == b"content-length":
                length = value
            elif key == b"x-mlops-request-id":
                request_id = value.decode("latin-1")
        REQUEST_ID.set(request_id)
        over = ""
        if length is not None and length.isdigit() and int(length) > limit:
            await JSONResponse({"error": too_large("body", self.settings)}, status_code=413)(
                scope, receive, send
            )
            return
        if length is None:  # e.g. chunked: count the body as it arrives
            inner, seen = receive, 0

            async def receive() -> dict:
                nonlocal seen, over
                message = await inner()
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = "body"
                    raise RequestTooLarge("body")
                return message

        replaced = False

        async def send_with_reason(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and (
                message["status"] == 413 or (message["status"] == 503 and self.explain_503)
            ):
                replaced = True
                if message["status"] == 413:
                    response = JSONResponse(
                        {"error": too_large(over or "rows", self.settings)}, status_code=413
                    )
                else:
                    response = JSONResponse(
                        {"error": self.state.reason()}, status_code=503, headers={"Retry-After": "1"}
                    )
                await response(scope, receive, send)
                return
            if replaced:
                return
            await send(message)

        await self.app(scope, receive, send_with_reason)

    def _authorized(self, scope: dict) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        key = self.state.api_key
        return bool(key) and hmac.compare_digest(given.encode(), (key or "").encode())


async def _ready(_: Request) -> JSONResponse:
    loaded = STATE.loaded
    body = {
        "ready": loaded is not None and STATE.error is None,
        "model": STATE.model,
        "version": loaded.version if loaded else None,
        "feature_lookup": loaded.lookup.description if loaded else None,
        "error": STATE.error,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


status_app = Starlette(routes=[Route("/ready", _ready, methods=["GET"])])


class RequestTimeoutMiddleware:
    """The service's request timeout (``traffic={"timeout": ...}``): a request not answered in time gets a 504.

    It takes the place of BentoML's own timeout middleware (see :func:`use_request_timeout_that_lets_go`),
    which does the same but leaves each request's timer scheduled for the whole timeout after the answer has
    gone. Every answered request then stays in memory for ``timeout`` seconds with what its timer holds
    (a future and the request's context, tracing span included): at 800 requests/s and a 30 s timeout that is
    about 24,000 requests, some 400,000 objects that every full garbage collection walks. Measured on the
    benchmark service: a 100-180 ms collection about once a second, which set the p99 latency (190 ms, against
    55 ms once the timer is cancelled with the answer).

    Here the timer is cancelled as soon as the response starts (or the request ends), and on expiry the
    request's own task is cancelled rather than a second task being started for every request.
    """

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        answered = expired = False

        def expire() -> None:
            nonlocal expired
            if not answered and task is not None:
                expired = True
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, expire)

        async def send_answer(message: dict) -> None:
            nonlocal answered
            if not answered:
                answered = True
                timer.cancel()
            await send(message)

        try:
            await self.app(scope, receive, send_answer)
        except asyncio.CancelledError:
            if not expired or task is None:
                raise
            task.uncancel()
            response = JSONResponse(
                {"error": f"the request was not answered within the service's {self.timeout:g} s timeout."},
                status_code=504,
            )
            await response(scope, receive, send)
        finally:
            timer.cancel()


def use_request_timeout_that_lets_go() -> bool:
    """Have the BentoML server of this process time requests out with :class:`RequestTimeoutMiddleware`.

    BentoML adds its timeout middleware from ``bentoml._internal.server.http.traffic`` when it builds the
    ASGI app, after importing the service module; this puts ours in its place there. Returns False (and the
    server keeps BentoML's own, which works, only with the latency cost above) when that module no longer
    has it, e.g. after a BentoML upgrade that moved it.
    """
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        log.warning("BentoML's timeout middleware was not found; keeping it as it is")
        return False
    if not isinstance(getattr(traffic, "TimeoutMiddleware", None), type):
        log.warning("BentoML's timeout middleware was not found; keeping it as it is")
        return False
    traffic.TimeoutMiddleware = RequestTimeoutMiddleware
    return True


use_request_timeout_that_lets_go()


def _tracing_exported() -> bool:
    """Whether BentoML's configuration sends traces anywhere (an exporter and a sample rate above zero)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        exporter = BentoMLContainer.tracing.exporter_type.get()
        rate = BentoMLContainer.tracing.sample_rate.get()
    except Exception:  # an unreadable configuration: keep tracing as BentoML set it up
        return True
    return bool(exporter) and bool(rate)


class TraceOnlyWhenExported:
    """Takes the place of OpenTelemetry's ASGI middleware in the service's app; traces only when BentoML's
    configuration exports traces (``tracing.exporter_type`` and a ``sample_rate`` above zero).

    BentoML wraps every request in OpenTelemetry's ASGI middleware, tracing or not. With no exporter (the
    default) its spans go nowhere, yet starting them and wrapping every ``send`` cost about a third of the
    event loop's time per request (py-spy on ``benchmarks/bench_serving.py``: ~540 of ~1,700 samples), and the
    model thread waits for that event loop. Without an exporter this middleware only gives each request the
    id BentoML returns in ``X-BentoML-Request-ID``; with one, it is OpenTelemetry's middleware unchanged.
    """

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.traced = _tracing_exported()
        self.inner = _OPENTELEMETRY_MIDDLEWARE(app, **options) if self.traced else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.inner is not None:
            await self.inner(scope, receive, send)
            return
        if scope["type"] == "http":
            from bentoml._internal.context import trace_context

            trace_context.request_id = random.getrandbits(63) or 1
        await self.app(scope, receive, send)


def trace_only_when_exported() -> bool:
    """Have the BentoML server of this process build its app with :class:`TraceOnlyWhenExported` (BentoML
    imports OpenTelemetry's middleware from its module when it builds the app, after importing the service
    module). Returns False, and the app keeps OpenTelemetry's middleware, when that module moved."""
    global _OPENTELEMETRY_MIDDLEWARE
    try:
        from opentelemetry.instrumentation import asgi
    except ImportError:
        return False
    middleware = getattr(asgi, "OpenTelemetryMiddleware", None)
    if not isinstance(middleware, type):
        log.warning("OpenTelemetry's ASGI middleware was not found; keeping it as it is")
        return False
    if middleware is not TraceOnlyWhenExported:
        _OPENTELEMETRY_MIDDLEWARE = middleware
        asgi.OpenTelemetryMiddleware = TraceOnlyWhenExported
    return True


_OPENTELEMETRY_MIDDLEWARE: Any = None
trace_only_when_exported()


# ---------------------------------------------------------------------------------------- batching
_THREAD_LIMIT = threading.local()


def limit_model_threads(threads: int) -> None:
    """Cap the OpenMP threads of the model calls made from the calling thread (set once per thread).

    scikit-learn's HistGradientBoosting and LightGBM start a team of OpenMP threads, one per core, for every
    call. For the small batches of online serving on a host shared with other processes, waking that team
    costs far more than it saves (measured on a busy 2-core machine: a one-row call 7 ms with one thread,
    160-260 ms with two). OpenMP's limit belongs to the thread that sets it, hence once per calling thread.
    """
    if getattr(_THREAD_LIMIT, "threads", None) == threads:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="openmp")
    _THREAD_LIMIT.threads = threads


Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Adaptive batching of a single-row endpoint: concurrent :meth:`submit` calls share one ``handler`` call.

    The first request after an idle spell is handled at once (no batching window, so nothing is added to
    the latency at low load); requests that arrive while a batch is being handled wait for the next call,
    which takes all of them (up to ``max_batch_size``). So the batch size follows the load by itself: under
    32 concurrent clients one feature lookup and one model call answer most of them together. ``handler``
    runs in ``executor``; the event loop keeps reading requests meanwhile.

    :param handler: handles a list of items (in ``executor``) and returns one result per item, in order;
        when it raises, every request of that batch gets the error.
    :param executor: where ``handler`` runs.
    :param max_batch_size: most items per ``handler`` call.
    :param max_waiting: most requests waiting; beyond it :meth:`submit` raises ``overloaded()`` at once.
    :param overloaded: builds the error for a request refused because too many are waiting.
    :param observe: called with the size of each batch handled (e.g. a Prometheus histogram's ``observe``).
    """

    def __init__(
        self,
        handler: Callable[[list[Item]], Sequence[Result]],
        executor: ThreadPoolExecutor,
        *,
        max_batch_size: int = 256,
        max_waiting: int = 4096,
        overloaded: Callable[[], Exception] = lambda: ServiceUnavailable("the service is overloaded."),
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self.handler = handler
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.overloaded = overloaded
        self.observe = observe
        self.batches = 0
        self.items = 0
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """Answer for ``item``, computed in a batch with the items of the other requests waiting now."""
        if len(self._waiting) >= self.max_waiting:
            raise self.overloaded()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        wakeup = self._wakeup
        if (
            wakeup is None
            or self._worker is None
            or self._worker.done()
            or self._worker.get_loop() is not loop
        ):
            self._wakeup = wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(wakeup), name="micro-batcher")
        wakeup.set()
        return await future

    async def _run(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._waiting:
                batch = [(i, f) for i, f in self._waiting[: self.max_batch_size] if not f.done()]
                del self._waiting[: self.max_batch_size]
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self.executor, self.handler, [i for i, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} answers for {len(batch)} requests")
                except Exception as err:  # every request of the batch gets it; the batcher keeps running
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                self.batches += 1
                self.items += len(batch)
                if self.observe is not None:
                    self.observe(len(batch))
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)


@functools.cache
def _batch_size_metric() -> Any:
    """``mlops_single_row_batch_size`` on ``/metrics`` (created in the worker, after BentoML has set up
    Prometheus' multiprocess mode)."""
    from prometheus_client import Histogram

    return Histogram(
        "mlops_single_row_batch_size",
        "single-row /predict requests answered by one feature lookup and one model call",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    )


# ---------------------------------------------------------------------------------------- the service
@bentoml.service(
    name="mlops_model",
    workers=1,
    traffic={"timeout": 30},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(status_app, path="/")
class ModelService:
    """Serves one registered model version; see the module docstring for its configuration."""

    def __init__(self) -> None:
        from airflow_mlops.hooks.bentoml import BentoMLHook

        self.settings = SETTINGS
        STATE.model = self.settings.model
        STATE.api_key = BentoMLHook(bentoml_conn_id=self.settings.bentoml_conn_id).api_key
        if self.settings.bentoml_conn_id and not STATE.api_key:  # never "no key" means "no auth"
            STATE.auth_required = True
            STATE.error = (
                f"connection {self.settings.bentoml_conn_id!r} sets the API key, but its password is empty; "
                "set it (the deploy task refuses this too)."
            )
        self.prediction_log = PredictionLogWriter(
            self.settings.model or "unknown", self.settings.flush_rows, self.settings.flush_seconds
        )
        # every feature lookup and model call runs in this one thread, batched
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.single_rows: MicroBatcher[Any, Any] = MicroBatcher(
            self._predict_requests,
            self.model_thread,
            max_batch_size=256,
            overloaded=lambda: ServiceUnavailable("the service is overloaded; retry shortly."),
            observe=_batch_size_metric().observe,
        )
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            loaded = load_and_warm_up(self.settings, SCHEMA)
        except MLOpsError as err:
            STATE.error = str(err)
            log.error("Not serving model %s: %s", self.settings.model, err)
            return
        except Exception as err:  # any other failure: say so on /ready instead of dying silently
            STATE.error = f"{type(err).__name__}: {err}"
            log.exception("Loading model %s failed", self.settings.model)
            return
        if self.settings.shadow:  # ready: from now on only CPU production leaves idle
            yield_cpu_to_production(sched_idle=True)
        STATE.loaded = loaded
        gc.freeze()  # the model and libraries are long-lived: keep them out of every later collection
        log.info(
            "Serving %s:%s (%s, %s) after %.1fs",
            loaded.name,
            loaded.version,
            loaded.signature.task,
            loaded.lookup.description,
            time.monotonic() - started,
        )

    def __is_ready__(self) -> bool:
        return STATE.loaded is not None and STATE.error is None

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.prediction_log.close()

    def _require_model(self) -> LoadedModel:
        loaded = STATE.loaded
        if loaded is None:
            raise ServiceUnavailable(STATE.reason())
        return loaded

    def _predict_requests(self, items: list[tuple[Any, str | None]]) -> list[Any]:
        """:meth:`_predict_rows` for single-row requests given as ``(row, request id)``."""
        return self._predict_rows([row for row, _ in items], [request_id for _, request_id in items])

    def _predict_rows(self, rows: list[Any], request_ids: Sequence[str | None] | None = None) -> list[Any]:
        """One feature lookup and one model call for all ``rows``; the records go to the prediction log
        (with each row's request id when given)."""
        loaded = self._require_model()
        try:
            task_answers = predict_rows(
                loaded,
                rows,
                request_ids,
                prediction_log=self.prediction_log,
                model_threads=self.settings.model_threads,
                shadow=self.settings.shadow,
            )
        except FeatureStoreUnavailable as err:
            STATE.unavailable, STATE.unavailable_at = str(err), time.monotonic()
            raise ServiceUnavailable(str(err)) from err
        return [Answer(**answer, model=loaded.name, model_version=loaded.version) for answer in task_answers]

    @bentoml.api(batchable=True, max_batch_size=1024, max_latency_ms=10000)
    async def predict_batch(self, rows: BatchRows) -> list[Answer]:
        """The model's answers for a list of rows (adaptive batching merges concurrent requests)."""
        self._require_model()
        return await asyncio.get_running_loop().run_in_executor(
            self.model_thread, self._predict_rows, list(rows)
        )

    @bentoml.api
    async def predict(self, row: Row) -> Answer:
        """The model's answer for one row. Concurrent single-row requests are batched on the server: they
        share one feature lookup and one model call."""
        self._require_model()
        return await self.single_rows.submit((row, REQUEST_ID.get()))


ModelService.add_asgi_middleware(GuardMiddleware)
