"""Three real registered models served from one real ``bentoml serve`` endpoint (issue 17, item 3).

A binary delay classifier and an arrival-delay regressor (scikit-learn, skops) and a departure-airport
classifier (LightGBM multiclass) are registered through the registry and deployed onto the endpoint
``shared`` with :class:`MultiModelDeployOperator` (the first deploy starts the server). The tests compare
each model's answers with the single-model service's and the registered model's, then shrink the memory
budget so that loading the third model unloads the least recently used one, which loads again on its next
request; a model whose registry record was edited is refused and never loaded.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pytest
from serving.models import (
    FEATURES,
    MULTICLASS_FEATURES,
    register,
    training_frame,
    weather_training_frame,
    write_model,
    write_multiclass_model,
)
from serving.servers import start_backends, stop_backends

from airflow_mlops.exceptions import ServingError
from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.ml.multi_model import locked_deployments, register_deployment
from airflow_mlops.ml.prediction_log import read_records
from airflow_mlops.operators.multi_model import MultiModelDeployOperator, MultiModelEndpoint

pytestmark = pytest.mark.integration

ENDPOINT = "shared"
API_KEY = "multi-api-key-42"
CONN = "bentoml_multi_it"
HEADERS = {"X-API-Key": API_KEY}
MODELS = {"delays": FEATURES, "arrival": FEATURES, "airport": MULTICLASS_FEATURES}


def _context(task_id: str) -> dict:
    return {
        "run_id": "manual__1",
        "ti": SimpleNamespace(dag_id="multi_it", run_id="manual__1", task_id=task_id),
    }


def _rows(model: str, n: int, seed: int = 0) -> list[dict]:
    """Real May 2013 flights as request rows of ``model``'s signature."""
    from airflow_mlops.demo.data import read_table

    frame = read_table("flights")
    frame = frame[(frame["month"] == 5) & frame["carrier"].isin(["UA", "B6", "EV", "DL", "AA", "MQ", "US"])]
    frame = frame.sample(n, random_state=seed)
    casts = {"hour": int, "month": int, "distance": float}
    return [{f: casts.get(f, str)(getattr(r, f)) for f in MODELS[model]} for r in frame.itertuples()]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path_factory.mktemp("multi-state")))
        env.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps({"conn_type": "bentoml", "password": API_KEY}))
        yield from _multi(tmp_path_factory.mktemp("multi-models"))


def _deploy(model: str, version: str, **kwargs) -> dict:
    return MultiModelDeployOperator(
        task_id=f"deploy_{model}",
        model_name=model,
        endpoint=ENDPOINT,
        version=version,
        bentoml_conn_id=CONN,
        serve_env={"MLOPS_SERVE_LOG_FLUSH_SECONDS": "0.5"},
        ready_timeout=180,
        **kwargs,
    ).execute(_context(f"deploy_{model}"))


def _multi(tmp: Path):
    train = training_frame().sample(4000, random_state=1)
    versions = {
        "delays": register("delays", write_model(tmp / "d", train, max_iter=20), train),
        "arrival": register("arrival", write_model(tmp / "a", train, max_iter=20, task="regression"), train),
        "airport": register("airport", write_multiclass_model(tmp / "o", train, rounds=200), train),
    }
    endpoint = MultiModelEndpoint(BentoMLHook(), ENDPOINT)
    try:
        results = {m: _deploy(m, v, memory_budget_mb=1024) for m, v in versions.items()}
        server_url = results["delays"]["server_url"]
        yield SimpleNamespace(
            versions=versions,
            results=results,
            endpoint=endpoint,
            url=server_url,
            client=httpx.Client(base_url=server_url, headers=HEADERS, timeout=60),
        )
    finally:
        pid = (endpoint.read_state().get("server") or {}).get("pid")
        endpoint.stop()
        assert not (pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie")


def _expected(model: str, version: str, rows: list[dict]) -> np.ndarray:
    return BentoMLHook().load(model, version).predict(rows)


def _status(multi) -> dict:
    return multi.client.get("/models").json()


def test_each_deploy_answers_on_the_one_shared_server(multi):
    assert {r["server_pid"] for r in multi.results.values()} == {multi.results["delays"]["server_pid"]}
    for model, result in multi.results.items():
        assert result["url"] == f"{multi.url}/models/{model}" and result["version"] == multi.versions[model]
    status = _status(multi)
    assert set(status["models"]) == set(MODELS)
    assert all(m["loaded"] and m["memory_mb"] > 0 for m in status["models"].values())


def test_answers_are_each_models_own_and_equal_the_single_model_service(multi):
    rows = {m: _rows(m, 25, seed=3) for m in MODELS}
    got = {m: multi.client.post(f"/models/{m}/predict_batch", json={"rows": rows[m]}).json() for m in MODELS}
    delays = _expected("delays", multi.versions["delays"], rows["delays"])
    assert np.allclose([a["probability"] for a in got["delays"]], delays)
    assert all(
        a["model"] == "delays" and a["model_version"] == multi.versions["delays"] for a in got["delays"]
    )
    arrival = _expected("arrival", multi.versions["arrival"], rows["arrival"])
    assert np.allclose([a["value"] for a in got["arrival"]], arrival)
    airport = _expected("airport", multi.versions["airport"], rows["airport"])
    assert [a["label"] for a in got["airport"]] == [["EWR", "JFK", "LGA"][i] for i in airport.argmax(axis=1)]
    single = multi.client.post("/models/delays/predict", json={"row": rows["delays"][0]}).json()
    assert single == got["delays"][0]

    # the single-model service of the same version answers exactly the same
    (backend,) = start_backends([{"model": "delays", "version": multi.versions["delays"]}])
    try:
        alone = httpx.post(
            f"{backend['url']}/predict_batch", json={"rows": rows["delays"]}, timeout=60
        ).json()
    finally:
        stop_backends([backend])
    assert alone == got["delays"]


def test_bad_requests_get_clear_answers(multi):
    unknown = multi.client.post("/models/nobody/predict", json={"row": {}})
    assert unknown.status_code == 404
    assert (
        unknown.json()["models"] == sorted(MODELS) and "'nobody' is not deployed" in unknown.json()["error"]
    )
    bad = multi.client.post("/models/delays/predict", json={"row": {**_rows("delays", 1)[0], "hour": "noon"}})
    assert bad.status_code == 400 and "hour" in bad.text
    assert httpx.post(f"{multi.url}/models/delays/predict", json={"row": {}}).status_code == 401
    too_many = multi.client.post("/models/delays/predict_batch", json={"rows": _rows("delays", 1) * 6000})
    assert too_many.status_code == 413 and "serving_max_rows" in too_many.text


def test_every_models_predictions_go_to_its_own_prediction_log(multi):
    rows = _rows("arrival", 4, seed=11)
    answers = multi.client.post("/models/arrival/predict_batch", json={"rows": rows}).json()
    root = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "artifacts" / "predictions" / "arrival"
    deadline, found = time.monotonic() + 15, []
    while time.monotonic() < deadline and len(found) < len(rows):
        days = sorted(p.name.removeprefix("date=") for p in root.glob("date=*"))
        found = [r for r in read_records(str(root), days) if r["request"] in rows]
        time.sleep(0.3)
    assert len(found) == len(rows)
    record = next(r for r in found if r["request"] == rows[0])
    assert record["model"] == "arrival" and record["task"] == "regression"
    assert record["prediction"] == answers[0]["value"]


def test_past_the_budget_the_least_recently_used_model_is_unloaded_and_reloads_on_its_next_request(multi):
    client = multi.client
    rows = {m: _rows(m, 10, seed=5) for m in MODELS}
    for model in ("arrival", "delays", "airport"):  # arrival is now the least recently used
        assert client.post(f"/models/{model}/predict", json={"row": rows[model][0]}).status_code == 200
    status = _status(multi)["models"]
    mb = {m: status[m]["memory_mb"] for m in MODELS}
    assert all(s["loaded"] for s in status.values()) and mb["airport"] > mb["arrival"], mb
    # room for delays and airport, not for arrival besides them
    budget = mb["delays"] + mb["airport"] + min(mb["arrival"], mb["airport"] - mb["arrival"]) / 2
    with locked_deployments(multi.endpoint.deployments) as data:
        data["memory_budget_mb"] = budget
    time.sleep(0.5)
    assert client.post("/models/delays/predict", json={"row": rows["delays"][0]}).status_code == 200
    status = _status(multi)
    assert {m for m, s in status["models"].items() if s["loaded"]} == {"delays", "airport"}
    assert status["memory_budget_mb"] == pytest.approx(budget, abs=0.001)
    evictions = status["evictions"]

    # arrival's next requests (8 at once) load it again, once; loading it unloads airport, now the least
    # recently used (delays was used after it)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda row: client.post("/models/arrival/predict", json={"row": row}), rows["arrival"][:8]
            )
        )
    assert all(a.status_code == 200 for a in answers)
    expected = _expected("arrival", multi.versions["arrival"], rows["arrival"][:8])
    assert np.allclose([a.json()["value"] for a in answers], expected)
    status = _status(multi)
    assert {m for m, s in status["models"].items() if s["loaded"]} == {"delays", "arrival"}
    assert status["evictions"] == evictions + 1
    arrival = status["models"]["arrival"]
    assert arrival["loads"] == 2 and arrival["hits"] == 8, "8 requests at once: one reload"

    # and airport comes back on its next request, answering as before
    again = client.post("/models/airport/predict_batch", json={"rows": rows["airport"]}).json()
    expected = _expected("airport", multi.versions["airport"], rows["airport"])
    assert [a["label"] for a in again] == [["EWR", "JFK", "LGA"][i] for i in expected.argmax(axis=1)]
    assert _status(multi)["models"]["airport"]["loads"] == 2


def test_a_model_whose_record_was_edited_is_refused_and_never_loaded(multi, tmp_path):
    train = training_frame().sample(2000, random_state=2)
    version = register("edited", write_model(tmp_path / "e", train, max_iter=5), train)
    hook = BentoMLHook()
    with hook.locked("edited") as index:  # the record no longer matches its signature
        index["versions"][version]["trusted_types"] = ["builtins.eval"]
    register_deployment(multi.endpoint.deployments, ENDPOINT, "edited", version)
    time.sleep(0.5)
    refused = multi.client.post("/models/edited/predict", json={"row": _rows("delays", 1)[0]})
    assert refused.status_code == 503
    assert "'edited' is not served" in refused.json()["error"] and "refusing" in refused.json()["error"]
    status = _status(multi)["models"]["edited"]
    assert not status["loaded"] and "refusing" in status["failed"]
    assert psutil.Process(multi.endpoint.read_state()["server"]["pid"]).is_running()
    with pytest.raises(Exception, match="refusing"):
        _deploy("edited", version)


def test_a_deploy_the_endpoint_cannot_serve_is_undone_and_fails_with_the_reason(multi, tmp_path):
    train = weather_training_frame().sample(2000, random_state=3).dropna(subset=["temp"])
    folder = write_model(tmp_path / "w", train, max_iter=5, features=[*FEATURES, "temp"])
    version = register("needs_store", folder, train, entity_keys=["origin"], store_features=["temp"])
    before = json.loads(multi.endpoint.deployments.read_text())["models"]
    with pytest.raises(ServingError, match="needs features") as err:
        _deploy("needs_store", version)  # no feature service is known for it: the endpoint refuses it
    assert "the endpoint serves what it served before" in str(err.value)
    assert json.loads(multi.endpoint.deployments.read_text())["models"] == before
    assert multi.client.post("/models/delays/predict", json={"row": _rows("delays", 1)[0]}).status_code == 200
