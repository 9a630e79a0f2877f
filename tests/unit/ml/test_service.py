"""The Bento service without a server: the single-row batcher, the model thread cap, the schemas it builds
from the registered signature."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from bentoml.exceptions import ServiceUnavailable

from airflow_mlops.ml.service import MicroBatcher, limit_model_threads


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_concurrent_requests_share_one_call_and_each_gets_its_own_answer(executor):
    calls: list[list[int]] = []

    def handler(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.05)  # a model call: the requests arriving meanwhile wait for the next one
        return [i * 10 for i in items]

    batcher = MicroBatcher(handler, executor, max_batch_size=64)

    async def main() -> list[int]:
        return await asyncio.gather(*(batcher.submit(i) for i in range(40)))

    assert asyncio.run(main()) == [i * 10 for i in range(40)]
    assert sorted(i for call in calls for i in call) == list(range(40))
    assert len(calls) <= 2, f"40 concurrent requests took {len(calls)} calls"
    assert batcher.batches == len(calls) and batcher.items == 40


def test_a_lone_request_is_answered_without_waiting_for_company(executor):
    batcher = MicroBatcher(lambda items: [x + 1 for x in items], executor)

    async def main() -> tuple[int, float]:
        started = time.perf_counter()
        answer = await batcher.submit(1)
        return answer, time.perf_counter() - started

    answer, took = asyncio.run(main())
    assert answer == 2 and took < 0.5


def test_batches_never_exceed_the_maximum_size(executor):
    sizes: list[int] = []

    def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        time.sleep(0.01)
        return items

    batcher = MicroBatcher(handler, executor, max_batch_size=8, observe=lambda n: None)

    async def main() -> list[int]:
        return await asyncio.gather(*(batcher.submit(i) for i in range(50)))

    assert asyncio.run(main()) == list(range(50))
    assert max(sizes) <= 8 and sum(sizes) == 50


def test_a_failing_call_fails_its_requests_and_the_batcher_keeps_serving(executor):
    def handler(items: list[int]) -> list[int]:
        if 13 in items:
            raise ServiceUnavailable("feature store down")
        return items

    observed: list[int] = []
    batcher = MicroBatcher(handler, executor, observe=observed.append)

    async def main() -> int:
        with pytest.raises(ServiceUnavailable, match="feature store down"):
            await batcher.submit(13)
        return await batcher.submit(7)

    assert asyncio.run(main()) == 7
    assert observed == [1], "only the successful batch is counted"


def test_a_handler_answering_the_wrong_number_of_rows_is_an_error_not_a_hang(executor):
    batcher = MicroBatcher(lambda items: [], executor)

    async def main() -> None:
        await asyncio.wait_for(batcher.submit(1), timeout=5)

    with pytest.raises(RuntimeError, match="0 answers for 1 requests"):
        asyncio.run(main())


def test_too_many_waiting_requests_are_refused_at_once(executor):
    release = threading.Event()

    def handler(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher = MicroBatcher(
        handler, executor, max_waiting=2, overloaded=lambda: ServiceUnavailable("overloaded; retry")
    )

    async def main() -> list[object]:
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first call is running; the next two wait
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(ServiceUnavailable, match="overloaded"):
            await batcher.submit(3)
        release.set()
        return await asyncio.gather(first, *waiting)

    assert asyncio.run(main()) == [0, 1, 2]


def test_model_calls_are_capped_to_the_configured_threads_in_the_calling_thread(executor):
    import sklearn.ensemble  # noqa: F401  loads the OpenMP runtime
    from threadpoolctl import threadpool_info

    def openmp_threads() -> set[int]:
        limit_model_threads(1)
        limit_model_threads(1)  # set once per thread; calling again changes nothing
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"}

    assert executor.submit(openmp_threads).result() == {1}


# ------------------------------------------------------------------------------------------ request timeout
def _asgi_call(app, path: str = "/predict") -> tuple[int, bytes]:
    """One HTTP request through an ASGI app, in the running loop; returns status and body."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> tuple[int, bytes]:
        scope = {"type": "http", "path": path, "method": "POST", "headers": []}
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    return call()


def _answering(delay: float = 0.0):
    from starlette.responses import JSONResponse

    async def app(scope, receive, send):
        await asyncio.sleep(delay)
        await JSONResponse({"ok": True})(scope, receive, send)

    return app


def _live_timers() -> int:
    """Scheduled (not cancelled, not fired) timer callbacks left in this process."""
    import gc

    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, asyncio.TimerHandle) and not o.cancelled() and o._callback
    )


def test_the_service_times_requests_out_with_a_timer_that_lets_go_of_answered_requests():
    from bentoml._internal.server.http import traffic

    from airflow_mlops.ml.service import RequestTimeoutMiddleware

    assert traffic.TimeoutMiddleware is RequestTimeoutMiddleware  # what `bentoml serve` builds the app with

    async def many() -> list[int]:
        app = RequestTimeoutMiddleware(_answering(), timeout=30)
        answers = [await _asgi_call(app) for _ in range(200)]
        pending = _live_timers()
        return [status for status, _ in answers], pending

    statuses, pending = asyncio.run(many())
    assert statuses == [200] * 200
    assert pending == 0, f"{pending} answered requests still hold a timer (and what it references) for 30 s"


def test_a_request_not_answered_in_time_gets_a_504_naming_the_timeout_and_later_ones_are_served():
    from airflow_mlops.ml.service import RequestTimeoutMiddleware

    async def both():
        slow = await _asgi_call(RequestTimeoutMiddleware(_answering(delay=5), timeout=0.2))
        fast = await _asgi_call(RequestTimeoutMiddleware(_answering(delay=0.3), timeout=2))
        return slow, fast

    started = time.monotonic()
    (slow_status, slow_body), (fast_status, _) = asyncio.run(both())
    assert slow_status == 504
    assert b"0.2 s timeout" in slow_body
    assert fast_status == 200
    assert time.monotonic() - started < 4  # the slow request was cut at its timeout, not after its 5 s


# ---------------------------------------------------------------------------------------- schemas
def _signature():
    import pandas as pd

    from airflow_mlops.ml.signature import infer_signature

    frame = pd.DataFrame(
        {
            "station": ["a", "b", "c", "a"],
            "kind": ["x", "y", "x", "y"],
            "temp": [1.5, 2.0, 3.0, 4.5],
            "hour": [0, 6, 12, 23],
            "humid": [0.1, 0.2, 0.3, 0.4],
        }
    )
    return infer_signature(
        frame,
        task="multiclass",
        label="weather",
        classes=["rain", "sun", "fog"],
        features=["station", "kind", "temp", "hour", "humid"],
        entity_keys=["station"],
        store_features=["humid"],
        feature_service="weather_svc",
    )


def test_without_a_model_to_serve_the_schema_is_generic_and_says_why(tmp_path, monkeypatch):
    from airflow_mlops.ml.service import ServeSettings, served_schema

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLOPS_SERVE_MODEL", raising=False)
    unset = served_schema(ServeSettings.from_env())
    assert unset.signature is None and "MLOPS_SERVE_MODEL is not set" in unset.error
    monkeypatch.setenv("MLOPS_SERVE_MODEL", "nobody")
    unknown = served_schema(ServeSettings.from_env())
    assert unknown.request == dict[str, Any] and "has no production version" in unknown.error


def test_the_schema_is_the_registered_versions_signature(tmp_path, monkeypatch):
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.service import ServeSettings, served_schema

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    signature = _signature()
    hook = BentoMLHook()
    versions = {  # records signed as registration signs them
        "v1": hook.sign_record(
            "w", {"tag": "w:v1", "version": "v1", "signature": signature.model_dump(mode="json")}
        ),
        "v2": hook.sign_record("w", {"tag": "w:v2", "version": "v2"}),
    }
    hook.write_index("w", {"model": "w", "production": "v1", "versions": versions, "history": []})
    monkeypatch.setenv("MLOPS_SERVE_MODEL", "w")
    served = served_schema(ServeSettings.from_env())
    assert served.error is None and served.version == "v1" and served.signature == signature
    assert list(served.request.model_fields) == ["station", "kind", "temp", "hour"]
    assert set(served.response.model_fields) == {"label", "probabilities", "model", "model_version"}
    monkeypatch.setenv("MLOPS_SERVE_VERSION", "v2")
    unsigned = served_schema(ServeSettings.from_env())
    assert unsigned.signature is None and "w:v2 was registered without a signature" in unsigned.error


def test_the_warm_up_row_is_a_valid_request_of_the_signature():
    from airflow_mlops.ml.service import warm_up_row
    from airflow_mlops.ml.signature import request_model

    signature = _signature()
    row = warm_up_row(signature)
    assert request_model(signature, "w").model_validate(row).model_dump() == row


def test_a_configured_but_empty_api_key_refuses_every_request_instead_of_none(monkeypatch):
    from airflow_mlops.ml import service

    monkeypatch.setattr(service, "STATE", service.ServingState(api_key="", auth_required=True))
    status, body = asyncio.run(_asgi_call(service.GuardMiddleware(_answering())))
    assert status == 401 and b"API key" in body
    monkeypatch.setattr(service, "STATE", service.ServingState(api_key=None))  # no key configured: open
    assert asyncio.run(_asgi_call(service.GuardMiddleware(_answering())))[0] == 200


def test_the_request_id_and_shadow_mode_reach_the_prediction_log(tmp_path, monkeypatch):
    """A ``/predict`` through the service's middleware logs the router's ``X-MLOps-Request-Id`` (so a
    shadow's answer pairs with production's) and, on a server started with ``MLOPS_SERVE_SHADOW=true``,
    marks the record as a shadow's."""
    from starlette.responses import JSONResponse

    from airflow_mlops.ml import service
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, log_root, read_records
    from airflow_mlops.ml.signature import ModelSignature

    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path}")
    monkeypatch.setenv("MLOPS_SERVE_SHADOW", "true")
    settings = service.ServeSettings.from_env()
    assert settings.shadow

    class Predictor:
        features = ["temp"]

        def predict(self, rows: list[dict]) -> list[float]:
            return [0.75 for _ in rows]

    class NoLookup:
        def fetch(self, rows: list[dict]) -> list[dict]:
            return [{} for _ in rows]

    signature = ModelSignature(task="binary", label="delayed", classes=[0, 1], features=["temp"])
    monkeypatch.setattr(
        service,
        "STATE",
        service.ServingState(loaded=service.LoadedModel("w", "v2", signature, Predictor(), NoLookup())),
    )
    instance = object.__new__(service.ModelService.inner)
    instance.settings = settings
    instance.prediction_log = PredictionLogWriter("w", flush_seconds=3600, max_rows=100, retention_days=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        instance.model_thread = pool
        instance.single_rows = MicroBatcher(instance._predict_requests, pool)

        async def predict_app(scope, receive, send):
            answer = await service.ModelService.inner.predict.func(instance, {"temp": 3.0})
            await JSONResponse(dict(answer))(scope, receive, send)

        async def call(request_id: bytes | None) -> int:
            sent: list[dict] = []

            async def receive() -> dict:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict) -> None:
                sent.append(message)

            headers = [(b"content-length", b"0")] + (
                [(b"x-mlops-request-id", request_id)] if request_id else []
            )
            scope = {"type": "http", "path": "/predict", "method": "POST", "headers": headers}
            await service.GuardMiddleware(predict_app)(scope, receive, send)
            return sent[0]["status"]

        async def both() -> list[int]:
            return [await call(b"req-1"), await call(None), await call(b"req-3")]

        assert asyncio.run(both()) == [200, 200, 200]
    instance.prediction_log.close()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    logged = read_records(log_root("w"), [day])
    assert [(r.get("request_id"), r.get("shadow"), r["version"]) for r in logged] == [
        ("req-1", True, "v2"),
        (None, True, "v2"),
        ("req-3", True, "v2"),
    ]


@pytest.mark.parametrize(("shadow", "cpu"), [("true", ""), ("false", ""), ("true", "shared")])
def test_a_shadow_server_takes_the_lowest_cpu_priority_and_a_live_one_keeps_its_own(shadow, cpu, tmp_path):
    # A shadow shares production's host: its threads and its session (autogroup) must yield the CPU, or it
    # competes with production's servers for the cores; a live server must not be slowed down this way.
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, os, threading, airflow_mlops.ml.service as s\n"
        "group = open('/proc/self/autogroup').read() if os.path.exists('/proc/self/autogroup') else ''\n"
        "tids = os.listdir('/proc/self/task')\n"
        "loading = [os.sched_getscheduler(int(t)) for t in tids]\n"
        "if s.SETTINGS.shadow:\n"
        "    s.yield_cpu_to_production(sched_idle=True)  # what each worker does once its model is loaded\n"
        "t = threading.Thread(target=lambda: print(json.dumps({'later': os.sched_getscheduler(0)}))); t.start(); t.join()\n"
        "print(json.dumps({'nice': [os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids], 'group': group,\n"
        "                  'loading': loading, 'policy': [os.sched_getscheduler(int(t)) for t in tids]}))\n"
    )
    env = {
        **os.environ,
        "MLOPS_SERVE_SHADOW": shadow,
        "MLOPS_SHADOW_CPU": cpu,  # "shared": the user asked for a shadow that sees every request
        "MLOPS_SERVE_MODEL": "no_such_model",
        "AIRFLOW__MLOPS__STATE_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    later, seen = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    if shadow == "true" and cpu != "shared":
        # while it loads: nice 19 only (at SCHED_IDLE a shadow on a busy host did not become ready in 2 min);
        # once loaded SCHED_IDLE: production's threads preempt the shadow's at once; later threads inherit it
        assert set(seen["loading"]) == {os.SCHED_OTHER}
        assert set(seen["policy"]) == {os.SCHED_IDLE} and later["later"] == os.SCHED_IDLE
        assert set(seen["nice"]) == {19}
        if seen["group"]:  # a kernel with autogroup scheduling
            assert seen["group"].split()[-1] == "19", seen["group"]
    else:
        assert set(seen["policy"]) == {os.SCHED_OTHER} and later["later"] == os.SCHED_OTHER
        assert set(seen["nice"]) == {os.getpriority(os.PRIO_PROCESS, 0)}
        if seen["group"]:
            assert seen["group"].split()[-1] != "19"
