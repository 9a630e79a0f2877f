"""Canary deploys without servers: the arguments refused, the step trigger (serialization, early verdict),
and the deploy's steps through its deferral methods (a retry resumes the step, passing steps raise the weight
then switch, a breach routes back and fails with the figures)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.operators import serving
from airflow_mlops.operators.serving import BentoDeployOperator, CanaryRollbackError, LocalDeploymentTarget
from airflow_mlops.triggers.serving import CanaryStepTrigger


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canary_steps": [50, 10]}, "are not increasing percentages"),
        ({"canary_steps": [0, 50]}, "are not increasing percentages"),
        ({"canary_steps": [100]}, "starting below 100"),
        ({"canary_steps": [10, 150]}, "are not increasing percentages"),
        ({"step_minutes": 0}, "step_minutes=0 is not a positive number"),
        ({"guardrails": {"p99": 2}}, "unknown canary guardrail"),
    ],
)
def test_canary_settings_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(MLOpsArgumentError, match=message):
        BentoDeployOperator(task_id="t", model_name="m", strategy="canary", **kwargs)


def test_the_step_trigger_serializes_its_arguments():
    trigger = CanaryStepTrigger(
        router_url="http://r",
        active_url="http://a",
        canary_url="http://c",
        generation=4,
        until=12.5,
        guardrails={"max_p99_ratio": 3.0},
        poll_interval=0.5,
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_mlops.triggers.serving.CanaryStepTrigger"
    assert CanaryStepTrigger(**kwargs).serialize() == (path, kwargs)


def _router(status: dict) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(status).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def _first(trigger: CanaryStepTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("no event")


def test_the_step_ends_early_when_the_canary_fails_its_requests_and_on_time_otherwise():
    import time

    def backends(errors: int) -> dict:
        return {
            "http://a": {"requests": 100, "errors_5xx": 0, "errors_connection": 0},
            "http://c": {"requests": 20, "errors_5xx": errors, "errors_connection": 0},
        }

    for errors, wanted in ((12, "breach"), (0, "step_done")):
        server = _router({"split": {"generation": 4, "backends": backends(errors)}})
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            started = time.monotonic()
            event = asyncio.run(
                _first(
                    CanaryStepTrigger(url, "http://a", "http://c", 4, time.time() + 1.5, poll_interval=0.1)
                )
            )
            took = time.monotonic() - started
        finally:
            server.shutdown()
        assert event["status"] == wanted
        if wanted == "breach":
            assert took < 1.0 and "error rate 60.00% (12 of 20 requests)" in event["message"]
        else:
            assert took >= 1.4


# ------------------------------------------------------------------------------ the deploy's state machine


def _context(run_id: str = "r1"):
    return {"run_id": run_id, "ti": SimpleNamespace(dag_id="d", run_id=run_id, task_id="t")}


@pytest.fixture
def local(tmp_path, monkeypatch):
    """The local target with processes replaced: ``start`` hands out backend URLs, the router's status is
    the routes file the deployer really writes plus the split figures the test sets."""
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    started: list[dict] = []
    stopped: list[str] = []
    split: dict = {"backends": {}}
    router = {"url": "http://127.0.0.1:3000", "pid": None, "port": 3000}

    def start(self, spec):
        started.append(spec)
        url = f"http://127.0.0.1:{4000 + len(started)}"
        return {**spec, "url": url, "pid": None, "port": 0, "log": None, "started_at": "now"}

    def router_status(self, _router):
        path = self.routes_path("m")
        routes = json.loads(path.read_text()) if path.exists() else {"generation": 0}
        canary = {"backend": routes["canary"]} if routes.get("canary") else None
        return {**routes, "canary": canary, "split": {**split, "generation": routes.get("generation")}}

    monkeypatch.setattr(serving, "check_signature", lambda record, version: None)
    monkeypatch.setattr(serving.BentoMLHook, "read_index", lambda self, name: {"model": name, "versions": {}})
    monkeypatch.setattr(serving.BentoMLHook, "version_record", lambda self, index, version: {})
    monkeypatch.setattr(serving.BentoMLHook, "model_dir", lambda self, name, version, record=None: tmp_path)
    monkeypatch.setattr(LocalDeploymentTarget, "ensure_router", lambda self, state, port: router)
    monkeypatch.setattr(LocalDeploymentTarget, "start", start)
    monkeypatch.setattr(LocalDeploymentTarget, "router_status", router_status)
    monkeypatch.setattr(
        LocalDeploymentTarget, "drain_and_stop", lambda self, backend, router: stopped.append(backend["url"])
    )
    monkeypatch.setattr(LocalDeploymentTarget, "backend_ready", lambda self, backend: True)
    monkeypatch.setattr(LocalDeploymentTarget, "still_serving", lambda self, backend: True)
    monkeypatch.setattr(serving, "process_alive", lambda ref: True)
    monkeypatch.setattr("airflow_mlops.sensors.serving.probe", lambda url: (True, "ready"))
    target = LocalDeploymentTarget(serving.BentoMLHook())
    with target.locked("m") as state:
        state["router"] = router
    return SimpleNamespace(target=target, started=started, stopped=stopped, split=split)


def _canary_op(version: str = "v2") -> BentoDeployOperator:
    return BentoDeployOperator(
        task_id="t",
        model_name="m",
        version=version,
        strategy="canary",
        canary_steps=[10, 50, 100],
        step_minutes=5,
        deferrable=True,
    )


def _figures(local, old: str, new: str, new_errors: int = 0) -> None:
    local.split["backends"] = {
        old: {"requests": 900, "errors_5xx": 0, "errors_connection": 0, "latency_ms": {"n": 900, "p99": 10}},
        new: {
            "requests": 100,
            "errors_5xx": new_errors,
            "errors_connection": 0,
            "latency_ms": {"n": 100, "p99": 11},
        },
    }


def _start_canary(local) -> TaskDeferred:
    BentoDeployOperator(task_id="t", model_name="m", version="v1", deferrable=False).execute(_context())
    with pytest.raises(TaskDeferred) as ready:
        _canary_op().execute(_context())
    pending = local.target.read_state("m")["pending"]["url"]
    with pytest.raises(TaskDeferred) as step:
        _canary_op().execute_complete(_context(), {"status": "ready", "url": pending}, **ready.value.kwargs)
    return step.value


def test_a_retry_during_a_canary_resumes_its_step_without_starting_the_version_again(local):
    step = _start_canary(local)
    assert isinstance(step.trigger, CanaryStepTrigger) and step.method_name == "canary_step_complete"
    routes = json.loads(local.target.routes_path("m").read_text())
    assert routes["canary_weight"] == 10 and routes["canary"] == step.trigger.canary_url
    assert len(local.started) == 2
    with pytest.raises(TaskDeferred) as retried:
        _canary_op().execute(_context())
    assert len(local.started) == 2, "the retry did not start the version again"
    assert retried.value.trigger.serialize() == step.trigger.serialize(), "same step, same end"


def test_passing_steps_raise_the_weight_then_the_switch_completes(local):
    step = _start_canary(local)
    old, new = step.trigger.active_url, step.trigger.canary_url
    _figures(local, old, new)
    with pytest.raises(TaskDeferred) as second:
        _canary_op().canary_step_complete(
            _context(), {"status": "step_done", "canary_url": new}, **step.kwargs
        )
    assert json.loads(local.target.routes_path("m").read_text())["canary_weight"] == 50
    _figures(local, old, new)
    result = _canary_op().canary_step_complete(
        _context(), {"status": "step_done", "canary_url": new}, **second.value.kwargs
    )
    assert (result["version"], result["switched"], result["previous_version"]) == ("v2", True, "v1")
    assert [s["weight"] for s in result["canary_steps"]] == [10, 50] and all(
        s["passed"] for s in result["canary_steps"]
    )
    routes = json.loads(local.target.routes_path("m").read_text())
    assert routes["active"] == new and "canary" not in routes and local.stopped == [old]


def test_a_breach_routes_back_to_the_old_version_and_fails_with_the_figures(local):
    step = _start_canary(local)
    old, new = step.trigger.active_url, step.trigger.canary_url
    _figures(local, old, new, new_errors=40)
    with pytest.raises(
        CanaryRollbackError, match=r"rolled back at step 1 \(10% of the traffic\): error rate 40\.00%"
    ):
        _canary_op().canary_step_complete(_context(), {"status": "breach", "canary_url": new}, **step.kwargs)
    routes = json.loads(local.target.routes_path("m").read_text())
    assert routes["active"] == old and "canary" not in routes and local.stopped == [new]
    state = local.target.read_state("m")
    assert state["active"]["version"] == "v1" and state["canary"] is None
    assert [h["action"] for h in state["history"]][-2:] == ["canary-step", "canary-rolled-back"]
