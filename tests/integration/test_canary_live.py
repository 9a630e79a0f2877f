"""Canary deploys with real ``bentoml serve`` backends behind the real router, under client load.

A module deployment serves version ``a`` (a real model trained on the 2013 flights). Clients send a steady
stream of single-row requests through the stable address while a canary runs; they must see no failed
request, whatever the canary does:

* a candidate that fails most requests (its encoder refuses carriers it never saw: a 500 from its server) is
  rolled back in its first step, on its error rate;
* a candidate whose predictions are shifted (trained on another definition of "late", so its probabilities
  are higher) is rolled back on the KS test of its predictions against the live version's;
* a good candidate (the same training on another sample) passes every step and takes all traffic; it goes
  through the real deferral path: the operator raises ``TaskDeferred``, the trigger's ``run()`` runs in an
  event loop, the method it names resumes the task.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from airflow.sdk.exceptions import TaskDeferred
from serving.load import Load
from serving.models import register, training_frame, write_erroring_model, write_model

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.net import free_port
from airflow_mlops.operators.serving import (
    BentoDeployOperator,
    CanaryRollbackError,
    LocalDeploymentTarget,
    process_alive,
)

pytestmark = pytest.mark.integration

MODEL = "canary_it"
CARRIERS = ["UA", "B6", "EV", "DL", "AA", "MQ", "US"]


def _context(run_id: str = "manual__1") -> dict:
    return {"run_id": run_id, "ti": SimpleNamespace(dag_id="canary_it", run_id=run_id, task_id="deploy")}


def _flights(n: int, seed: int = 0) -> list[dict]:
    from airflow_mlops.demo.data import read_table

    frame = read_table("flights")
    frame = frame[(frame["month"] == 5) & frame["carrier"].isin(CARRIERS)].sample(n, random_state=seed)
    return [
        {
            "carrier": r.carrier,
            "origin": r.origin,
            "hour": int(r.hour),
            "distance": float(r.distance),
            "month": 5,
        }
        for r in frame.itertuples()
    ]


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path_factory.mktemp("canary-state")))
        yield from _canary(tmp_path_factory.mktemp("canary-models"))


def _canary(tmp: Path):
    frame = training_frame()
    frame["late_any"] = (frame["arr_delay"] > 0).astype(int)
    # the good candidate: a retraining on 90 % of the same rows (close to, not the same as, version a)
    train = frame.sample(4000, random_state=1)
    other = train.sample(frac=0.9, random_state=2)
    keys = {"entity_keys": ["origin"]}
    versions = {
        "a": register(MODEL, write_model(tmp / "a", train, max_iter=30), train, **keys),
        "good": register(MODEL, write_model(tmp / "good", other, max_iter=30), other, **keys),
        "erroring": register(MODEL, write_erroring_model(tmp / "erroring", train, CARRIERS), train, **keys),
        "shifted": register(
            MODEL, write_model(tmp / "shifted", train, max_iter=30, label="late_any"), train, **keys
        ),
    }
    port = free_port()

    def operator(version: str, **kwargs) -> BentoDeployOperator:
        return BentoDeployOperator(
            task_id="deploy",
            model_name=MODEL,
            version=version,
            port=port,
            serve_env={"MLOPS_SERVE_LOG_FLUSH_SECONDS": "0.5"},
            ready_timeout=120,
            drain_timeout=10,
            **{"deferrable": False, **kwargs},
        )

    target = LocalDeploymentTarget(BentoMLHook())
    try:
        first = operator(versions["a"]).execute(_context())
        yield SimpleNamespace(url=first["url"], versions=versions, operator=operator, target=target)
    finally:
        target.teardown(MODEL)


def _rolled_back(canary, version: str, failure: str) -> None:
    state = canary.target.read_state(MODEL)
    assert state["active"]["version"] == canary.versions["a"] and state.get("canary") is None
    routes = json.loads(canary.target.routes_path(MODEL).read_text())
    assert "canary" not in routes and routes["active"] == state["active"]["url"]
    last = state["history"][-1]
    assert (last["action"], last["version"]) == ("canary-rolled-back", version)
    step = next(h for h in reversed(state["history"]) if h["action"] == "canary-step")
    assert not step["figures"]["passed"] and any(failure in b for b in step["figures"]["breaches"])


def test_a_canary_that_fails_its_requests_is_rolled_back_and_no_client_request_fails(canary):
    bad = canary.versions["erroring"]
    op = canary.operator(bad, strategy="canary", canary_steps=[20, 50, 100], step_minutes=0.5)
    started = time.monotonic()
    with Load(canary.url, _flights(60, seed=1)) as load, pytest.raises(CanaryRollbackError) as failed:
        op.execute(_context("bad_errors"))
    took = time.monotonic() - started
    assert load.failures == [], load.failures[:5]
    assert "error rate" in str(failed.value) and f"canary version {bad}" in str(failed.value)
    assert sum(load.versions.values()) > 100 and set(load.versions) <= {canary.versions["a"], bad}
    canary_process = next(
        h for h in reversed(canary.target.read_state(MODEL)["history"]) if h["action"] == "canary-rolled-back"
    )
    assert canary_process["weight"] == 20
    _rolled_back(canary, bad, "error rate")
    assert took < 90, f"the error-rate breach ends the step early ({took:.0f} s)"


def test_a_canary_with_shifted_predictions_is_rolled_back_and_no_client_request_fails(canary):
    shifted = canary.versions["shifted"]
    op = canary.operator(shifted, strategy="canary", canary_steps=[30, 100], step_minutes=0.15)
    with Load(canary.url, _flights(200, seed=2)) as load, pytest.raises(CanaryRollbackError) as failed:
        op.execute(_context("bad_shift"))
    assert load.failures == [], load.failures[:5]
    assert "predictions shifted: KS statistic" in str(failed.value)
    assert load.versions[shifted] > 20, "the canary answered its share until it was rolled back"
    _rolled_back(canary, shifted, "predictions shifted")
    stopped = canary.target.read_state(MODEL)["history"][-1]["backend"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(stopped + "/readyz", timeout=5)  # the canary's server was stopped


async def _first_event(trigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_a_good_canary_passes_every_step_deferred_and_takes_all_traffic(canary):
    good, a = canary.versions["good"], canary.versions["a"]
    op = canary.operator(
        good,
        strategy="canary",
        canary_steps=[10, 50, 100],
        step_minutes=0.25,  # long enough for 10 % of the load to give the KS test its 20 predictions on a loaded machine
        deferrable=True,
        guardrails={"max_p99_ratio": 10.0},  # a cold server on a shared 2-core machine: latency is noisy here
    )
    old = canary.target.read_state(MODEL)["active"]
    methods = []
    with Load(canary.url, _flights(200, seed=3)) as load:
        try:
            result = op.execute(_context("good"))
        except TaskDeferred as deferred:
            while True:
                methods.append(deferred.method_name)
                event = asyncio.run(_first_event(deferred.trigger))
                try:
                    result = getattr(op, deferred.method_name)(
                        _context("good"), event=event, **deferred.kwargs
                    )
                    break
                except TaskDeferred as again:
                    deferred = again
    assert load.failures == [], load.failures[:5]
    assert methods == ["execute_complete", "canary_step_complete", "canary_step_complete"]
    assert (result["version"], result["previous_version"], result["switched"]) == (good, a, True)
    steps = result["canary_steps"]
    assert [s["weight"] for s in steps] == [10, 50] and all(s["passed"] for s in steps)
    assert all(s["new"]["requests"] > 0 and s["prediction_shift"]["judged"] for s in steps)
    # the share of the traffic the canary got follows its weight (binomial noise on a few hundred requests)
    shares = [s["new"]["requests"] / (s["new"]["requests"] + s["old"]["requests"]) for s in steps]
    assert 0.03 < shares[0] < 0.2 and 0.35 < shares[1] < 0.65, shares
    assert load.versions[good] > 0 and load.versions[a] > 0
    routes = json.loads(canary.target.routes_path(MODEL).read_text())
    assert "canary" not in routes and routes["version"] == good
    assert not process_alive(old), "the old version was drained and stopped"
    answer = httpx.post(canary.url + "/predict", json={"row": _flights(1, seed=9)[0]}, timeout=10)
    assert answer.json()["model_version"] == good
    history = canary.target.read_state(MODEL)["history"][-1]
    assert (
        history["action"] == "canary"
        and history["strategy"] == "canary"
        and len(history["canary_steps"]) == 2
    )
    # rerunning the finished task does nothing (no second deploy of the same version)
    again = canary.operator(good, strategy="canary", step_minutes=0.2).execute(_context("good"))
    assert again["switched"] is False and again["version"] == good
