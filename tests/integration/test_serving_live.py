"""A real ``bentoml serve`` of real registered models, behind the deployment's stable address.

One deployment is shared by the whole module (the server starts take most of the time): version A is
built into a Bento and deployed; the tests talk HTTP to it, fuzz it, switch to version B under a steady
stream of requests, roll back, and try to serve a tampered model. The models only use features a
request carries (carrier, origin, hour, distance, month), so no feature store is contacted by them; each is
registered with the signature inferred from its training frame (``origin`` as its entity key), so requests
are ``{"row": {...}}`` with those fields.
The last test serves a model that also needs the weather at the departure airport, which the service reads
from Feast's online store (the real feature repository, materialized from the real 2013 weather).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from serving.models import FEATURES, WEATHER, register, training_frame, weather_training_frame, write_model

from airflow_mlops.hooks.bentoml import BentoMLHook, ModelIntegrityError
from airflow_mlops.ml.prediction_log import read_records
from airflow_mlops.net import free_port
from airflow_mlops.operators.serving import (
    BentoBuildOperator,
    BentoDeployOperator,
    BentoRollbackOperator,
    LocalDeploymentTarget,
    process_alive,
)
from airflow_mlops.sensors.serving import probe

pytestmark = pytest.mark.integration

MODEL = "serving_it"
API_KEY = "it-api-key-123"
CONN = "bentoml_serving_it"
HEADERS = {"X-API-Key": API_KEY}
WORKER_SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "it-jwt-secret-4b1d",
    "AIRFLOW__CORE__FERNET_KEY": "it-fernet-key-9c2e",
    "AWS_SECRET_ACCESS_KEY": "it-aws-secret-7f3a",
    "AIRFLOW_CONN_WAREHOUSE": "postgresql://etl:it-warehouse-password-1e8@db/warehouse",
}
MAX_ROWS = 100
MAX_BODY = 64 * 1024


def _context(task_id: str = "deploy", run_id: str = "manual__1") -> dict:
    return {"run_id": run_id, "ti": SimpleNamespace(dag_id="serving_it", run_id=run_id, task_id=task_id)}


def _flights(n: int, seed: int = 0) -> list[dict]:
    """Real 2013 flights (May) as request rows of the models' signature (the carriers seen in training)."""
    from airflow_mlops.demo.data import read_table

    frame = read_table("flights")
    frame = frame[(frame["month"] == 5) & frame["carrier"].isin(["UA", "B6", "EV", "DL", "AA", "MQ", "US"])]
    frame = frame.sample(n, random_state=seed)
    return [
        {
            "carrier": r.carrier,
            "origin": r.origin,
            "hour": int(r.hour),
            "distance": float(r.distance),
            "month": int(r.month),
        }
        for r in frame.itertuples()
    ]


def _expected(version: str, flights: list[dict]) -> np.ndarray:
    """What the registered model answers when called in this process (same registry, same features)."""
    predictor = BentoMLHook().load(MODEL, version)
    return predictor.predict([{k: row[k] for k in FEATURES} for row in flights])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # a state folder of the module's own: registry, BentoML home, deployments, prediction log
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path_factory.mktemp("serving-state")))
        env.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps({"conn_type": "bentoml", "password": API_KEY}))
        for name, value in WORKER_SECRETS.items():  # what an Airflow worker has in its environment
            env.setenv(name, value)
        env.setenv("AIRFLOW__MLOPS__SERVING_MAX_ROWS", str(MAX_ROWS))
        env.setenv("AIRFLOW__MLOPS__SERVING_MAX_BODY_BYTES", str(MAX_BODY))
        yield from _live(tmp_path_factory.mktemp("serving-models"))


def _live(tmp: Path):
    train = training_frame().sample(4000, random_state=1)
    versions = {
        "a": register(MODEL, write_model(tmp / "a", train, max_iter=8), train, entity_keys=["origin"]),
        "b": register(MODEL, write_model(tmp / "b", train, max_iter=40), train, entity_keys=["origin"]),
    }
    built = BentoBuildOperator(task_id="build", model_name=MODEL, version=versions["a"]).execute(
        _context("build")
    )
    port = free_port()

    def deploy(version: str, bento: str | None = None, **kwargs) -> dict:
        return BentoDeployOperator(
            task_id="deploy",
            model_name=MODEL,
            version=version,
            bento_tag=bento,
            port=port,
            bentoml_conn_id=CONN,
            serve_env={"MLOPS_SERVE_LOG_FLUSH_SECONDS": "0.5"},
            deferrable=False,
            ready_timeout=120,
            **kwargs,
        ).execute(_context())

    target = LocalDeploymentTarget(BentoMLHook())
    try:
        first = deploy(versions["a"], built["tag"])
        yield SimpleNamespace(
            url=first["url"],
            versions=versions,
            built=built,
            first=first,
            deploy=deploy,
            target=target,
            client=httpx.Client(base_url=first["url"], headers=HEADERS, timeout=30),
        )
    finally:
        state = target.read_state(MODEL)
        pids = [(state.get(k) or {}).get("pid") for k in ("router", "active", "pending")]
        target.teardown(MODEL)
        leftovers = [p for p in pids if p and psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not leftovers, f"processes left running: {leftovers}"


def test_the_bento_has_a_dockerfile_in_its_build_context_and_no_image_without_docker(live):
    assert live.built["tag"] == f"{MODEL}-service:{live.versions['a']}"
    dockerfile = Path(live.built["dockerfile"])
    assert dockerfile.parent == Path(live.built["build_context"]) and "FROM" in dockerfile.read_text()
    assert live.built["image"] is None
    assert live.first["bento"] == live.built["tag"] and live.first["switched"]


def test_single_and_batch_predictions_are_the_registered_models_answers(live):
    flights = _flights(40)
    expected = _expected(live.versions["a"], flights)
    batch = live.client.post("/predict_batch", json={"rows": flights})
    assert batch.status_code == 200, batch.text
    answers = batch.json()
    assert {a["model_version"] for a in answers} == {live.versions["a"]}
    np.testing.assert_allclose([a["probability"] for a in answers], expected, rtol=1e-9)
    single = live.client.post("/predict", json={"row": flights[3]})
    assert single.status_code == 200, single.text
    assert single.json()["model_version"] == live.versions["a"]
    assert single.json()["probability"] == pytest.approx(expected[3], rel=1e-9)


def test_readiness_names_the_model_version(live):
    ready = httpx.get(live.url + "/ready", timeout=10).json()
    assert ready == {
        "ready": True,
        "model": MODEL,
        "version": live.versions["a"],
        "feature_lookup": "request features only",
        "error": None,
    }
    assert probe(live.url, "/readyz")[0] and probe(live.url, "/livez")[0]


def test_the_api_key_is_required(live):
    body = {"row": _flights(1)[0]}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        answer = httpx.post(live.url + "/predict", json=body, headers=headers, timeout=10)
        assert answer.status_code == 401 and "API key" in answer.json()["error"]
    assert (
        httpx.post(
            live.url + "/predict", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        ).status_code
        == 200
    )


ROW = {"carrier": "UA", "origin": "EWR", "hour": 8, "distance": 1400.0, "month": 5}


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({k: v for k, v in ROW.items() if k != "origin"}, "origin", "Field required"),  # the entity key
        ({**ROW, "distance": "far"}, "distance", "valid integer"),
        ({**ROW, "hour": 8.5}, "hour", "valid integer"),
        ({**ROW, "carrier": "ZZ"}, "carrier", "'UA'"),  # a category unseen in training: says the allowed
        ({**ROW, "distance": 1e9}, "distance", "less than or equal"),
        ({**ROW, "tailnum": "N14228"}, "tailnum", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_gets_a_400_that_names_the_field(live, row, field, problem):
    for path, body in (("/predict", {"row": row}), ("/predict_batch", {"rows": [ROW, row]})):
        answer = live.client.post(path, json=body)
        assert answer.status_code == 400, (path, answer.text)
        assert field in answer.text and problem in answer.text, answer.text


def test_every_prediction_is_logged_to_the_artifact_store(live):
    flights = _flights(5, seed=9)
    answers = live.client.post("/predict_batch", json={"rows": flights}).json()
    root = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "artifacts" / "predictions" / MODEL
    days = sorted(p.name.removeprefix("date=") for p in root.glob("date=*"))
    deadline = time.monotonic() + 15
    found: list[dict] = []
    while time.monotonic() < deadline:
        days = sorted(p.name.removeprefix("date=") for p in root.glob("date=*"))
        found = [r for r in read_records(str(root), days) if r["request"] in flights]
        if len(found) >= len(flights):
            break
        time.sleep(0.3)
    assert len(found) == len(flights)
    record = next(r for r in found if r["request"] == flights[0])
    assert record["version"] == live.versions["a"] and record["task"] == "binary"
    assert record["prediction"] == answers[0]["probability"] == record["answer"]["probability"]
    assert set(record["features"]) == set(FEATURES)
    assert record["time"][:10] in days
    assert not list(root.glob("date=*/.*tmp*")), "no half-written part files are left"


def test_a_shadow_answers_copies_that_are_logged_paired_and_never_returned(live):
    """The other version deployed with ``strategy="shadow"`` gets a copy of every request to the stable
    address: every client still gets production's answer, the shadow's answers (its own model's) are in
    the prediction log with the same request ids, the monitor's reader leaves them out, and the report
    pairs them. Redeploying production blue/green ends the shadow."""
    from airflow_mlops.ml.prediction_log import read_prediction_log
    from airflow_mlops.ml.shadow import pair_records
    from airflow_mlops.operators.shadow import ShadowReportOperator

    production = live.target.read_state(MODEL)["active"]["version"]
    candidate = next(v for v in live.versions.values() if v != production)
    shadowed = live.deploy(candidate, strategy="shadow")
    assert (shadowed["version"], shadowed["shadow_version"], shadowed["switched"]) == (
        production,
        candidate,
        False,
    )
    shadow_process = live.target.read_state(MODEL)["shadow"]
    try:
        flights = _flights(40, seed=21)
        ids = []
        for row in flights:
            response = live.client.post("/predict", json={"row": row})
            assert response.status_code == 200 and response.json()["model_version"] == production
            ids.append(response.headers["x-mlops-request-id"])
        root = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "artifacts" / "predictions" / MODEL
        deadline = time.monotonic() + 30
        while True:
            days = sorted(p.name.removeprefix("date=") for p in root.glob("date=*"))
            records = read_records(str(root), days)
            pairs, counts = pair_records(records, production_version=production, shadow_version=candidate)
            paired = {p["request_id"]: (p, s) for p, s in pairs if p["request_id"] in set(ids)}
            if len(paired) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(paired) == len(ids), f"{len(paired)} of {len(ids)} requests paired ({counts})"
        # each side answered with its own model: the shadow's answers are the candidate's, never returned
        expected = _expected(candidate, flights)
        shadow_answers = [paired[rid][1]["answer"]["probability"] for rid in ids]  # ids[i]: flights[i]
        np.testing.assert_allclose(shadow_answers, expected, rtol=1e-6)
        assert all(s.get("shadow") is True and p.get("shadow") is None for p, s in paired.values())
        served = read_prediction_log(str(root), days)
        assert candidate not in set(served["version"].astype(str)), "the monitor counted shadow answers"
        status = httpx.get(live.url + "/__router__", timeout=5).json()["shadow"]
        assert status["sent"] >= len(ids) and status["failed"] == 0 and status["skipped"] == 0
        # the shadow's work runs only on CPU production leaves idle: every thread of the shadow's workers
        # (once loaded) and of the router's process sending the copies is SCHED_IDLE; bentoml serve's
        # supervisor, which serves nothing, runs at nice 19
        assert status["sender"]["mode"] == "process"
        workers = [p.pid for p in psutil.Process(shadow_process["pid"]).children(recursive=True)]
        for pid in [*workers, status["sender"]["pid"]]:
            policies = Counter(os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))
            assert set(policies) == {os.SCHED_IDLE}, (pid, policies)
        assert workers and psutil.Process(shadow_process["pid"]).nice() == 19
        report = ShadowReportOperator(task_id="report", model_name=MODEL, window_hours=1).execute(
            _context("report")
        )
        assert report["paired"] >= len(ids) and report["shadow_version"] == candidate
        assert 0.0 <= report["agreement"]["label_agreement"] <= 1.0
        assert report["latency_ms"]["shadow"]["n"] >= len(ids)
    finally:
        ended = live.deploy(production)  # blue/green redeploy of the live version: the shadow stops
    assert (ended["shadow_version"], ended["switched"]) == (None, False)
    assert not process_alive(shadow_process), "the shadow server was stopped"
    assert "shadow" not in json.loads(live.target.routes_path(MODEL).read_text())


def test_fuzzing_the_openapi_finds_no_server_error(live):
    schema = schemathesis.openapi.from_url(live.url + "/docs.json", headers=HEADERS)
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.path.startswith("/predict")]
    assert sorted(op.path for op in operations) == ["/predict", "/predict_batch"]
    statuses: Counter[int] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=live.url, headers=HEADERS)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error])

        check()
    assert statuses and all(code < 500 for code in statuses), statuses
    assert statuses[400] > 0 and statuses[200] > 0, f"the fuzzer sent valid and invalid rows: {statuses}"


def test_the_server_still_answers_after_fuzzing(live):
    answer = live.client.post("/predict", json={"row": _flights(1)[0]})
    assert answer.status_code == 200 and answer.json()["model_version"] == live.versions["a"]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_the_workers_secrets_are_not_in_the_server_or_router_environment(live):
    state = live.target.read_state(MODEL)
    server = psutil.Process(state["active"]["pid"])
    processes = [server, *server.children(recursive=True), psutil.Process(state["router"]["pid"])]
    assert len(processes) >= 3, "the server, its worker(s) and the router"
    for process in processes:
        environ = _environ(process.pid)
        leaked = {k for k, v in environ.items() if any(s in v for s in WORKER_SECRETS.values())}
        assert not leaked, f"{' '.join(process.cmdline())[:120]} has {sorted(leaked)}"
        assert not set(WORKER_SECRETS) & set(environ)
    server_env = _environ(server.pid)
    assert server_env["MLOPS_SERVE_MODEL"] == MODEL and server_env["BENTOML_DO_NOT_TRACK"] == "True"
    # the one secret it needs, the API key, comes in its own connection
    assert API_KEY in server_env[f"AIRFLOW_CONN_{CONN.upper()}"]


def test_requests_over_the_limits_get_a_413_naming_the_limit_and_its_setting(live):
    rows = (_flights(50, seed=7) * 3)[: MAX_ROWS + 1]
    answer = live.client.post("/predict_batch", json={"rows": rows})
    assert answer.status_code == 413, answer.text
    assert (
        f"limit of {MAX_ROWS} rows" in answer.json()["error"] and "serving_max_rows" in answer.json()["error"]
    )
    assert live.client.post("/predict_batch", json={"rows": rows[:MAX_ROWS]}).status_code == 200
    big = {"rows": rows * 12}  # over the body limit: refused before it is read
    assert len(json.dumps(big)) > MAX_BODY
    for url in (live.url, live.target.read_state(MODEL)["active"]["url"]):  # the stable address, the server
        answer = httpx.post(url + "/predict_batch", json=big, headers=HEADERS, timeout=30)
        assert answer.status_code == 413, answer.text
        assert f"limit of {MAX_BODY} bytes" in answer.json()["error"]
        assert "serving_max_body_bytes" in answer.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        body = json.dumps(big).encode()
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    backend = live.target.read_state(MODEL)["active"]["url"]
    answer = httpx.post(
        backend + "/predict_batch",
        content=chunks(),
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413 and "serving_max_body_bytes" in answer.json()["error"], answer.text
    single = live.client.post("/predict", json={"row": rows[0]})
    assert single.status_code == 200, "the server keeps serving"


def test_deploying_the_live_version_again_does_nothing(live):
    before = live.target.read_state(MODEL)["active"]
    result = live.deploy(live.versions["a"], live.built["tag"])
    assert result["switched"] is False and result["version"] == live.versions["a"]
    assert live.target.read_state(MODEL)["active"]["pid"] == before["pid"]


class _Stream:
    """Clients sending single-row requests through the stable address until stopped."""

    def __init__(self, url: str, flights: list[dict], clients: int = 4) -> None:
        self.url, self.flights = url, flights
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.count = Counter()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=30) as client:
            i = offset
            while not self._stop.is_set():
                try:
                    answer = client.post("/predict", json={"row": self.flights[i % len(self.flights)]})
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    else:
                        self.versions.append(answer.json()["model_version"])
                except httpx.HTTPError as err:
                    self.failures.append(f"{type(err).__name__}: {err}")
                i += 1

    def __enter__(self) -> _Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_a_blue_green_switch_under_load_drops_no_request(live):
    a, b = live.versions["a"], live.versions["b"]
    old_pid = live.target.read_state(MODEL)["active"]["pid"]
    with _Stream(live.url, _flights(50, seed=3)) as stream:
        time.sleep(1.0)
        result = live.deploy(b)
        time.sleep(1.0)
    assert stream.failures == []
    assert result["switched"] and result["version"] == b and result["previous_version"] == a
    seen = stream.versions
    assert len(seen) > 50 and seen[0] == a and seen[-1] == b
    assert seen.index(b) > 0 and a not in seen[seen.index(b) + len(stream.threads) * 2 :], "no flapping back"
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", (
        "old version stopped"
    )
    flights = _flights(20, seed=4)
    answers = live.client.post("/predict_batch", json={"rows": flights}).json()
    np.testing.assert_allclose([x["probability"] for x in answers], _expected(b, flights), rtol=1e-9)


def test_rollback_restores_the_previous_versions_answers(live):
    a = live.versions["a"]
    flights = _flights(30, seed=5)
    result = BentoRollbackOperator(
        task_id="rollback",
        model_name=MODEL,
        port=int(live.url.rsplit(":", 1)[1]),
        bentoml_conn_id=CONN,
        deferrable=False,
        ready_timeout=120,
    ).execute(_context("rollback"))
    assert result["version"] == a and result["previous_version"] == live.versions["b"]
    answers = live.client.post("/predict_batch", json={"rows": flights}).json()
    assert {x["model_version"] for x in answers} == {a}
    np.testing.assert_allclose([x["probability"] for x in answers], _expected(a, flights), rtol=1e-9)
    again = BentoRollbackOperator(
        task_id="rollback",
        model_name=MODEL,
        port=int(live.url.rsplit(":", 1)[1]),
        bentoml_conn_id=CONN,
        deferrable=False,
    ).execute(_context("rollback"))
    assert again["version"] == a and again["switched"] is False, "rerunning the rollback task is a no-op"


def test_a_tampered_model_is_refused_and_the_live_version_keeps_serving(live, tmp_path):
    train = training_frame().sample(3000, random_state=2)
    version = register(MODEL, write_model(tmp_path / "c", train, max_iter=5), train, entity_keys=["origin"])
    model_file = BentoMLHook().model_dir(MODEL, version) / "model.skops"
    model_file.write_bytes(model_file.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ModelIntegrityError, match="modified or corrupted"):
        live.deploy(version)
    # the service itself refuses it too, when started on it directly
    backend = live.target.start({"deployment": MODEL, "model": MODEL, "version": version})
    try:
        deadline = time.monotonic() + 90
        body = {}
        while time.monotonic() < deadline and process_alive(backend["pid"]):
            try:
                body = httpx.get(backend["url"] + "/ready", timeout=5).json()
                if body.get("error"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        server_log = Path(backend["log"]).read_text(errors="replace")[-3000:]
        assert body.get("ready") is False, f"the server never answered /ready; its log:\n{server_log}"
        assert "modified or corrupted" in body["error"]
        refused = httpx.post(backend["url"] + "/predict", json={"row": _flights(1)[0]}, timeout=10)
        assert refused.status_code == 503 and "modified or corrupted" in refused.json()["error"]
    finally:
        from airflow_mlops.operators.serving import stop_tree

        stop_tree(backend["pid"], timeout=15)
    answer = live.client.post("/predict", json={"row": _flights(1)[0]})
    assert answer.status_code == 200 and answer.json()["model_version"] == live.versions["a"]


# ---------------------------------------------------------------------------------------- with Feast
FEAST_MODEL = "serving_feast_it"


def _online_weather(repo: Path, origins: list[str]) -> dict[str, dict[str, float]]:
    """What Feast's online store holds now for each departure airport, read with Feast itself."""
    from feast import FeatureStore

    from airflow_mlops.hooks.feast import FeastHook

    store: FeatureStore = FeastHook(repo_path=str(repo)).store
    answer = store.get_online_features(
        features=[f"weather_hourly:{f}" for f in WEATHER], entity_rows=[{"origin": o} for o in origins]
    ).to_dict()
    return {o: {f: answer[f][i] for f in WEATHER} for i, o in enumerate(answer["origin"])}


def _materialize_weather(repo: Path, start: str, end: str) -> None:
    """Write the real weather of [start, end] into the online store (the latest hour per airport wins)."""
    from airflow_mlops.hooks.feast import FeastHook

    FeastHook(repo_path=str(repo)).materialize(
        datetime.fromisoformat(start), datetime.fromisoformat(end), ["weather_hourly"]
    )


@pytest.fixture(scope="module")
def feast_live(feast_data, tmp_path_factory):
    """A ``bentoml serve`` of a model that needs online weather features from Feast's online store.

    The Feast registry and online store are a copy of the session's (this module rewrites the online
    rows; other modules keep theirs), materialized from the real 2013 weather of 2013-05-01.
    """
    import shutil

    from airflow_mlops.operators.serving import serving_env, start_detached, stop_tree

    state = tmp_path_factory.mktemp("serving-feast-state")
    shutil.copytree(feast_data.settings.state_dir / "feast", state / "feast")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
        env.setenv("MLOPS_FEAST_DIR", str(state / "feast"))
        env.setenv("MLOPS_OFFLINE_ROOT", feast_data.env["MLOPS_OFFLINE_ROOT"])
        _materialize_weather(feast_data.repo, "2013-05-01T00:00:00+00:00", "2013-05-01T12:00:00+00:00")
        train = weather_training_frame().sample(20000, random_state=3)
        version = register(
            FEAST_MODEL,
            write_model(state / "model", train, max_iter=60, features=[*FEATURES, *WEATHER]),
            train,
            feature_service="delay_model",
            entity_keys=["origin"],
            store_features=WEATHER,
        )
        hook = BentoMLHook()
        port = free_port()
        pid = start_detached(
            [
                str(Path(sys.executable).with_name("bentoml")),
                "serve",
                "airflow_mlops.ml.service:ModelService",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            serving_env(
                hook,
                model=FEAST_MODEL,
                version=version,
                feast_repo=str(feast_data.repo),
                log_flush_seconds="0.5",
            ),
            state / "logs" / "serve.log",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while not probe(url, "/readyz")[0]:
                log = (state / "logs" / "serve.log").read_text()
                assert time.monotonic() < deadline and "Not serving model" not in log, log[-3000:]
                time.sleep(1)
            yield SimpleNamespace(
                url=url,
                version=version,
                repo=feast_data.repo,
                state=state,
                predictor=hook.load(FEAST_MODEL, version),
            )
        finally:
            stop_tree(pid, timeout=20)


def _expected_with(predictor, flights: list[dict], online: dict[str, dict[str, float]]) -> np.ndarray:
    """What the registered model answers for ``flights`` given the online weather ``online``."""
    return predictor.predict([{**flight, **online[flight["origin"]]} for flight in flights])


def test_features_come_from_the_feast_online_store_and_follow_it(feast_live):
    ready = httpx.get(feast_live.url + "/ready", timeout=10).json()
    assert ready["ready"] and ready["version"] == feast_live.version
    assert ready["feature_lookup"] == "Feast feature service 'delay_model'"
    flights = [f for f in _flights(60, seed=11) if f["origin"] in ("EWR", "JFK", "LGA")][:30]
    origins = sorted({f["origin"] for f in flights})

    before = _online_weather(feast_live.repo, origins)
    assert all(v is not None for values in before.values() for v in values.values()), before
    with httpx.Client(base_url=feast_live.url, timeout=30) as client:
        batch = client.post("/predict_batch", json={"rows": flights})
        assert batch.status_code == 200, batch.text
        assert {a["model_version"] for a in batch.json()} == {feast_live.version}
        got = [a["probability"] for a in batch.json()]
        np.testing.assert_allclose(got, _expected_with(feast_live.predictor, flights, before), rtol=1e-9)
        single = client.post("/predict", json={"row": flights[0]}).json()
        assert single["model_version"] == feast_live.version
        assert single["probability"] == pytest.approx(got[0], rel=1e-9)

        # new weather reaches the online store (the next materialization): the same flights get the
        # answers of the new features, without a restart
        _materialize_weather(feast_live.repo, "2013-05-01T12:00:00+00:00", "2013-05-02T06:00:00+00:00")
        after = _online_weather(feast_live.repo, origins)
        assert after != before
        again = client.post("/predict_batch", json={"rows": flights}).json()
        now = [a["probability"] for a in again]
        np.testing.assert_allclose(now, _expected_with(feast_live.predictor, flights, after), rtol=1e-9)
        assert now != got, "the answers follow the online features"
        singles = [client.post("/predict", json={"row": f}).json() for f in flights[:5]]
        assert [a["probability"] for a in singles] == pytest.approx(now[:5], rel=1e-9)

    # the prediction log says which online features each answer used
    root = feast_live.state / "artifacts" / "predictions" / FEAST_MODEL
    deadline = time.monotonic() + 15
    logged: list[dict] = []
    while time.monotonic() < deadline and len(logged) < 2 * len(flights):
        logged = [
            json.loads(line)
            for part in sorted(root.glob("date=*/part-*.jsonl"))
            for line in part.read_text().splitlines()
        ]
        time.sleep(0.3)
    first = next(r for r in logged if r["request"] == flights[0])
    assert first["version"] == feast_live.version
    assert {k: first["features"][k] for k in WEATHER} == pytest.approx(before[flights[0]["origin"]])
