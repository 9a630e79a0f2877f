"""A Bento service that serves many registered models from one process (``bentoml serve
airflow_mlops.ml.multi_service:MultiModelService``): SageMaker's multi-model endpoints, on BentoML 1.4.

Each model deployed on the endpoint answers under its own path, with its own request and answer schemas
(its registered signature, as the single-model service :mod:`airflow_mlops.ml.service`):

``POST /models/<name>/predict`` (``{"row": {...}}``) and ``POST /models/<name>/predict_batch``
(``{"rows": [...]}``)
    the model's answers, as the single-model service gives them. A model is loaded on its first request
    (concurrent first requests share one load) and stays loaded until the models loaded after it pass the
    memory budget: then the least recently used are unloaded, to be loaded again on their next request.
``GET /models``
    the models deployed, which are loaded, the memory each is charged, its load time and hits, the budget.
``GET /models/<name>``
    that model's status; loads it when it is not loaded (the deploy operator waits on this).
``GET /ready``, BentoML's ``/livez``, ``/readyz``, ``/metrics``
    readiness (the deployments file is readable and, when one is configured, the API key is set).

An unknown model gets a 404 listing the models the endpoint serves. A model that fails verification when
loaded (its signed registry record, its files' sha256, the skops allow-list: the same
:meth:`~airflow_mlops.hooks.bentoml.BentoMLHook.load` as the single-model service) or cannot be served (no
signature, features nobody provides) is never loaded: its requests get a 503 saying why, and loading it is
tried again after 30 s or when it is deployed again.

Configuration, from the environment (:class:`~airflow_mlops.operators.multi_model.MultiModelDeployOperator`
sets it):

``MLOPS_MULTI_ENDPOINT``
    the endpoint's name.
``MLOPS_MULTI_DEPLOYMENTS``
    its deployments file (:mod:`airflow_mlops.ml.multi_model`): which models, which version of each.
``MLOPS_MULTI_MEMORY_BUDGET_MB``
    the memory budget of the loaded models (default 1024; ``[mlops] multi_model_memory_budget_mb`` when
    deployed by the operator; the deployments file's ``memory_budget_mb`` overrides it). What a model is
    charged is measured: see :mod:`airflow_mlops.ml.multi_model`.
``MLOPS_SERVE_*``
    as for the single-model service (API key connection, Feast repository and connection, prediction-log
    flushing, model threads, request limits), except ``MLOPS_SERVE_MODEL`` / ``MLOPS_SERVE_VERSION``.

Every prediction is written to the prediction log of its own model (same records as the single-model
service, so the drift monitor reads them unchanged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import lightgbm  # noqa: F401  (the model libraries are imported at start, not charged to the first model)
import pandas  # noqa: F401
import sklearn.ensemble  # noqa: F401
import skops.io  # noqa: F401
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from airflow_mlops.exceptions import MLOpsError, MLOpsInputError
from airflow_mlops.ml.multi_model import (
    DEFAULT_MEMORY_BUDGET_MB,
    MB,
    DeploymentsWatcher,
    Loaded,
    ModelCache,
    ModelDeployment,
    deployments_path,
)
from airflow_mlops.ml.prediction_log import PredictionLogWriter
from airflow_mlops.ml.service import (
    REQUEST_ID,
    FeatureStoreUnavailable,
    GuardMiddleware,
    LoadedModel,
    MicroBatcher,
    RequestTooLarge,
    ServeSettings,
    ServingState,
    load_and_warm_up,
    predict_rows,
    served_schema,
    too_large,
)

log = logging.getLogger(__name__)


@dataclass
class MultiSettings:
    """The endpoint's own settings (the per-model ones are in the deployments file)."""

    endpoint: str
    deployments: Path
    memory_budget_mb: float
    serve: ServeSettings

    @classmethod
    def from_env(cls) -> MultiSettings:
        from airflow_mlops.config import load_settings

        env = os.environ
        endpoint = env.get("MLOPS_MULTI_ENDPOINT") or "models"
        path = env.get("MLOPS_MULTI_DEPLOYMENTS") or str(
            deployments_path(load_settings().state_dir, endpoint)
        )
        return cls(
            endpoint=endpoint,
            deployments=Path(path),
            memory_budget_mb=float(env.get("MLOPS_MULTI_MEMORY_BUDGET_MB") or DEFAULT_MEMORY_BUDGET_MB),
            serve=ServeSettings.from_env(),
        )


@dataclass
class ServedModel:
    """A loaded model with its schemas and its batcher of single-row requests."""

    loaded: LoadedModel
    row: Any
    answer: Any
    batcher: MicroBatcher[Any, Any]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class MultiModelServer:
    """The endpoint's state: its deployments, its model cache, one prediction log per model."""

    def __init__(self, settings: MultiSettings, state: ServingState) -> None:
        self.settings = settings
        self.state = state
        self.watcher = DeploymentsWatcher(settings.deployments)
        # predictions of every model run in this one thread, batched per model; loads in another
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.load_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.cache = ModelCache(self._load, self._budget_bytes, self.load_thread)
        self.logs: dict[str, PredictionLogWriter] = {}
        self._generation = -1

    # -- configuration -----------------------------------------------------------------------------
    def _budget_bytes(self) -> int:
        budget = self.watcher.current.memory_budget_mb or self.settings.memory_budget_mb
        return int(budget * MB)

    def deployed(self) -> dict[str, ModelDeployment]:
        deployments = self.watcher.get()
        if deployments.generation != self._generation:  # a deploy: refused models are tried again
            self._generation = deployments.generation
            self.cache.failures.clear()
            self.cache.trim()  # the budget may have been lowered
        models = deployments.models
        if set(self.cache.models) - set(models):
            self.cache.forget(set(models))
        return models

    def prediction_log(self, name: str) -> PredictionLogWriter:
        writer = self.logs.get(name)
        if writer is None:  # kept after the model is unloaded: its buffered records are not lost
            serve = self.settings.serve
            writer = self.logs[name] = PredictionLogWriter(name, serve.flush_rows, serve.flush_seconds)
        return writer

    # -- loading -----------------------------------------------------------------------------------
    def _load(self, deployment: ModelDeployment) -> Loaded:
        """Load and verify one model (in the load thread): the single-model service's loading."""
        serve = self.settings.serve
        settings = dataclasses.replace(
            serve,
            model=deployment.name,
            version=deployment.version,
            feature_service=deployment.feature_service or serve.feature_service,
        )
        try:
            schema = served_schema(settings)  # reads and verifies the signed registry record
            loaded = load_and_warm_up(settings, schema)  # sha256 of the files, skops allow-list
        except MLOpsError:
            raise
        except Exception as err:  # anything else is a model that cannot be served either; say why
            log.exception("Loading model %s failed", deployment.name)
            raise MLOpsError(f"{type(err).__name__}: {err}") from err
        writer = self.prediction_log(deployment.name)
        threads = serve.model_threads

        def handle(items: list[tuple[Any, str | None]]) -> list[dict[str, Any]]:
            answers = predict_rows(
                loaded,
                [row for row, _ in items],
                [request_id for _, request_id in items],
                prediction_log=writer,
                model_threads=threads,
            )
            return [_answer(served, a) for a in answers]

        served = ServedModel(
            loaded=loaded,
            row=schema.request,
            answer=schema.response,
            batcher=MicroBatcher(handle, self.model_thread, max_batch_size=256),
        )
        return Loaded(model=served, version=loaded.version, file_bytes=_file_bytes(schema.record))

    async def model(self, name: str) -> ServedModel | JSONResponse:
        """The served model ``name`` (loaded if needed), or the error response to send."""
        deployed = self.deployed()
        deployment = deployed.get(name)
        if deployment is None:
            return _error(
                404,
                f"model {name!r} is not deployed on endpoint {self.settings.endpoint!r}.",
                models=sorted(deployed),
            )
        try:
            cached = await self.cache.get(deployment)
        except MLOpsError as err:
            return _error(503, f"model {name!r} is not served: {err}")
        return cached.model

    def status(self) -> dict[str, Any]:
        deployed = self.deployed()
        loaded = {name: cached.describe() for name, cached in self.cache.models.items()}
        return {
            "endpoint": self.settings.endpoint,
            "memory_budget_mb": round(self._budget_bytes() / MB, 3),
            "memory_used_mb": round(self.cache.used_bytes() / MB, 3),
            "memory_measure": "rss_delta",
            "evictions": self.cache.evictions,
            "models": {
                name: {
                    "deployed_version": d.version,
                    "loaded": name in loaded,
                    **({"failed": str(self._failure(d))} if self._failure(d) else {}),
                    **loaded.get(name, {}),
                }
                for name, d in sorted(deployed.items())
            },
            "deployments_error": self.watcher.error,
        }

    def _failure(self, deployment: ModelDeployment) -> MLOpsError | None:
        failed = self.cache.failures.get((deployment.name, deployment.version))
        return failed[0] if failed else None

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.load_thread.shutdown(wait=False, cancel_futures=True)
        for writer in self.logs.values():
            writer.close()


def _answer(served: ServedModel, answer: dict[str, Any]) -> dict[str, Any]:
    loaded = served.loaded
    return served.answer(**answer, model=loaded.name, model_version=loaded.version).model_dump(mode="json")


def _file_bytes(record: dict[str, Any] | None) -> int:
    """Size of the model's files in the local model store (0 when unknown)."""
    if not record:
        return 0
    try:
        from airflow_mlops.hooks.bentoml import BentoMLHook

        folder = Path(BentoMLHook().model_store.get(record["tag"]).path)
        return sum(folder.joinpath(name).stat().st_size for name in record.get("files_sha256", {}))
    except Exception:  # an estimate only; the RSS growth is measured anyway
        return 0


# ---------------------------------------------------------------------------------------- HTTP
SETTINGS = MultiSettings.from_env()
STATE = ServingState(model=f"endpoint {SETTINGS.endpoint}")
SERVER: MultiModelServer | None = None


def _server() -> MultiModelServer:
    if SERVER is None:
        raise RuntimeError("the multi-model service has not started")
    return SERVER


async def _body(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        data = json.loads(await request.body())
    except RequestTooLarge:
        return _error(413, too_large("body", SETTINGS.serve))
    except ValueError as err:
        return _error(400, f"the request body is not JSON ({err}).")
    if not isinstance(data, dict):
        return _error(400, "the request body must be a JSON object.")
    return data


def _invalid(name: str, err: ValidationError) -> JSONResponse:
    return _error(400, f"invalid input for model {name!r}.", detail=json.loads(err.json(include_url=False)))


async def _run(coro: Any, name: str) -> Any:
    try:
        return await coro
    except MLOpsInputError as err:
        return _error(400, str(err))
    except FeatureStoreUnavailable as err:
        return _error(503, str(err))
    except MLOpsError as err:
        return _error(503, f"model {name!r} is not served: {err}")


async def _served_request(request: Request) -> tuple[str, Any, dict[str, Any]] | JSONResponse:
    """The model a ``/models/<name>/...`` request names (loaded on first use) and its JSON body, or the
    error answer when either cannot be had."""
    name = request.path_params["name"]
    served = await _server().model(name)
    if isinstance(served, JSONResponse):
        return served
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    return name, served, body


async def predict(request: Request) -> JSONResponse:
    got = await _served_request(request)
    if isinstance(got, JSONResponse):
        return got
    name, served, body = got
    try:
        row = served.row.model_validate(body.get("row"))
    except ValidationError as err:
        return _invalid(name, err)
    answer = await _run(served.batcher.submit((row, REQUEST_ID.get())), name)
    return answer if isinstance(answer, JSONResponse) else JSONResponse(answer)


async def predict_batch(request: Request) -> JSONResponse:
    got = await _served_request(request)
    if isinstance(got, JSONResponse):
        return got
    name, served, body = got
    rows = body.get("rows")
    if not isinstance(rows, list):
        return _error(400, 'the request body must be {"rows": [...]}.')
    if len(rows) > SETTINGS.serve.max_rows:
        return _error(413, too_large("rows", SETTINGS.serve))
    try:
        parsed: list[BaseModel] = [served.row.model_validate(row) for row in rows]
    except ValidationError as err:
        return _invalid(name, err)
    server = _server()
    loaded = served.loaded

    def handle() -> list[dict[str, Any]]:
        answers = predict_rows(
            loaded,
            parsed,
            prediction_log=server.prediction_log(name),
            model_threads=SETTINGS.serve.model_threads,
        )
        return [_answer(served, a) for a in answers]

    answers = await _run(asyncio.get_running_loop().run_in_executor(server.model_thread, handle), name)
    return answers if isinstance(answers, JSONResponse) else JSONResponse(answers)


async def model_status(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    served = await _server().model(name)
    if isinstance(served, JSONResponse):
        return served
    return JSONResponse(_server().status()["models"][name])


async def models(_: Request) -> JSONResponse:
    return JSONResponse(_server().status())


async def ready(_: Request) -> JSONResponse:
    server = SERVER
    error = STATE.error or (server.watcher.error if server else "the service is starting")
    body = {
        "ready": error is None,
        "endpoint": SETTINGS.endpoint,
        "models": sorted(server.deployed()) if server else [],
        "loaded": list(server.cache.models) if server else [],
        "error": error,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


app = Starlette(
    routes=[
        Route("/ready", ready, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/models/{name}", model_status, methods=["GET"]),
        Route("/models/{name}/predict", predict, methods=["POST"]),
        Route("/models/{name}/predict_batch", predict_batch, methods=["POST"]),
    ]
)


class MultiGuard(GuardMiddleware):
    """API key and body-size checks of the single-model service, with this endpoint's state; the routes
    write their own 503 bodies (which model, why)."""

    serving_state = STATE
    serve_settings = SETTINGS.serve
    explain_503 = False


@bentoml.service(
    name="mlops_multi_model",
    workers=1,
    traffic={"timeout": 60},
    logging={"access": {"enabled": SETTINGS.serve.access_log}},
)
@bentoml.asgi_app(app, path="/")
class MultiModelService:
    """Serves the models deployed on one endpoint; see the module docstring."""

    def __init__(self) -> None:
        global SERVER
        from airflow_mlops.hooks.bentoml import BentoMLHook

        conn_id = SETTINGS.serve.bentoml_conn_id
        STATE.api_key = BentoMLHook(bentoml_conn_id=conn_id).api_key
        if conn_id and not STATE.api_key:  # never "no key" means "no auth"
            STATE.auth_required = True
            STATE.error = f"connection {conn_id!r} sets the API key, but its password is empty; set it."
        SERVER = MultiModelServer(SETTINGS, STATE)
        SERVER.watcher.get()
        log.info(
            "Endpoint %s serves %s (budget %.0f MB)",
            SETTINGS.endpoint,
            sorted(SERVER.deployed()) or "no model yet",
            SERVER._budget_bytes() / MB,
        )
        self.started = time.monotonic()

    def __is_ready__(self) -> bool:
        return SERVER is not None and STATE.error is None and SERVER.watcher.error is None

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if SERVER is not None:
            SERVER.close()

    @bentoml.api
    def endpoint(self) -> dict[str, Any]:
        """The endpoint's models, as ``GET /models`` gives them."""
        return _server().status()


MultiModelService.add_asgi_middleware(MultiGuard)
