"""The model-agnostic service for every task, and the prediction-log contract between it and the monitor.

Three real ``bentoml serve`` processes (the deploy operator's local backends), started once for the module:
a binary delay classifier, a multiclass departure-airport classifier and a regression of the arrival delay,
each trained on the real 2013 flights and registered with the signature inferred from its training frame.
The tests check what a client sees (each task's answer, the model's own fields in ``/docs.json``, a 400
naming a bad field) and that every prediction they get is read back from the prediction log, with its value,
version and time, by the log's reader and by the monitor's.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from serving.models import (
    FEATURES,
    MULTICLASS_FEATURES,
    register,
    training_frame,
    write_model,
    write_multiclass_model,
)
from serving.servers import start_backends, stop_backends

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.ml.prediction_log import flatten, log_root, read_prediction_log
from airflow_mlops.ml.signature import answers, logged_value, signature_of

pytestmark = pytest.mark.integration

TASKS = ("binary", "multiclass", "regression")


def _model(task: str) -> str:
    return f"contract_{task}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path_factory.mktemp("contract-state")))
        yield from _served(tmp_path_factory.mktemp("contract-models"))


def _served(tmp):
    train = training_frame().sample(4000, random_state=5)
    folders = {
        "binary": write_model(tmp / "binary", train, max_iter=20),
        "multiclass": write_multiclass_model(tmp / "multiclass", train),
        "regression": write_model(tmp / "regression", train, max_iter=20, task="regression"),
    }
    versions = {
        task: register(_model(task), folder, train, entity_keys=["carrier"])
        for task, folder in folders.items()
    }
    unsigned = register("contract_unsigned", write_model(tmp / "unsigned", train, max_iter=3))
    hook = BentoMLHook()
    backends = start_backends(
        [
            {"model": _model(t), "version": versions[t], "env": {"MLOPS_SERVE_LOG_FLUSH_SECONDS": "0.3"}}
            for t in TASKS
        ]
        + [{"model": "contract_unsigned", "version": unsigned, "refused": True}]
    )
    try:
        models = {}
        for task, backend in zip(TASKS, backends[:3], strict=True):
            index = hook.read_index(_model(task))
            models[task] = SimpleNamespace(
                name=_model(task),
                version=versions[task],
                url=backend["url"],
                signature=signature_of(index["versions"][versions[task]]),
                predictor=hook.load(_model(task), versions[task]),
            )
        yield {**models, "unsigned": SimpleNamespace(version=unsigned, url=backends[3]["url"])}
    finally:
        stop_backends(backends)


_FLIGHTS: list = []


def _rows(served, n: int, seed: int) -> list[dict]:
    """Distinct real May flights, with every field any of the three models asks for, that every model's
    request schema accepts (a destination never seen in training would be refused)."""
    from airflow_mlops.ml.signature import request_model

    models = [served[t] for t in TASKS]
    schemas = [request_model(m.signature, m.name) for m in models]
    rows = []
    for row in _may_flights(n * 5, seed):
        try:
            for schema, model in zip(schemas, models, strict=True):
                schema.model_validate(_request(model, row))
        except ValueError:
            continue
        rows.append(row)
    assert len(rows) >= n
    return rows[:n]


def _may_flights(n: int, seed: int) -> list[dict]:
    from airflow_mlops.demo.data import read_table

    if not _FLIGHTS:
        _FLIGHTS.append(read_table("flights"))
    frame = _FLIGHTS[0]
    frame = frame[(frame["month"] == 5) & frame["carrier"].isin(["UA", "B6", "EV", "DL", "AA", "MQ", "US"])]
    frame = frame.drop_duplicates(subset=sorted({*FEATURES, *MULTICLASS_FEATURES})).sample(
        n, random_state=seed
    )
    return [
        {
            "carrier": r.carrier,
            "origin": r.origin,
            "dest": r.dest,
            "hour": int(r.hour),
            "distance": float(r.distance),
            "month": int(r.month),
        }
        for r in frame.itertuples()
    ]


def _request(model, row: dict) -> dict:
    return {f.name: row[f.name] for f in model.signature.request_fields}


def _expected(model, rows: list[dict]) -> list[dict]:
    """The task's answers of the registered model called in this process."""
    return answers(model.signature, model.predictor.predict([_request(model, r) for r in rows]))


@pytest.mark.parametrize("task", TASKS)
def test_each_task_answers_its_own_shape(served, task):
    model = served[task]
    rows = _rows(served, 12, seed=1)
    with httpx.Client(base_url=model.url, timeout=30) as client:
        batch = client.post("/predict_batch", json={"rows": [_request(model, r) for r in rows]})
        single = client.post("/predict", json={"row": _request(model, rows[0])})
    assert batch.status_code == 200 and single.status_code == 200, (batch.text, single.text)
    got = batch.json()
    assert all(a["model"] == model.name and a["model_version"] == model.version for a in got)
    expected = _expected(model, rows)
    if task == "binary":
        assert all(set(a) == {"probability", "label", "model", "model_version"} for a in got)
        np.testing.assert_allclose([a["probability"] for a in got], [e["probability"] for e in expected])
        assert [a["label"] for a in got] == [e["label"] for e in expected] and {a["label"] for a in got} <= {
            0,
            1,
        }
    elif task == "multiclass":
        assert all(set(a) == {"label", "probabilities", "model", "model_version"} for a in got)
        assert all(set(a["probabilities"]) == {"EWR", "JFK", "LGA"} for a in got)
        assert all(sum(a["probabilities"].values()) == pytest.approx(1) for a in got)
        assert all(a["label"] == max(a["probabilities"], key=a["probabilities"].get) for a in got)
        assert [a["label"] for a in got] == [e["label"] for e in expected]
        assert len({a["label"] for a in got}) > 1, (
            "a model that learned something names more than one airport"
        )
    else:
        assert all(set(a) == {"value", "model", "model_version"} for a in got)
        np.testing.assert_allclose([a["value"] for a in got], [e["value"] for e in expected])
    one = single.json()
    assert set(one) == set(got[0])
    for key, value in got[0].items():
        assert one[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9)), key


@pytest.mark.parametrize("task", TASKS)
def test_the_openapi_document_shows_the_models_own_fields(served, task):
    model = served[task]
    document = httpx.get(model.url + "/docs.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    request = next(
        s for name, s in schemas.items() if name.endswith("Request") and name.startswith("Contract")
    )
    assert list(request["properties"]) == [f.name for f in model.signature.request_fields]
    assert set(request["required"]) == set(request["properties"])
    assert "entity key" in request["properties"]["carrier"]["description"]
    answer = next(
        s for name, s in schemas.items() if name.endswith("Prediction") and name.startswith("Contract")
    )
    wanted = {
        "binary": {"probability", "label"},
        "multiclass": {"label", "probabilities"},
        "regression": {"value"},
    }
    assert set(answer["properties"]) == wanted[task] | {"model", "model_version"}
    body = json.dumps(document["paths"]["/predict"]["post"]["requestBody"])
    assert '"row"' in body and json.dumps(document["paths"]["/predict_batch"]["post"]["requestBody"]).count(
        '"rows"'
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda row: {k: v for k, v in row.items() if k != "carrier"}, "carrier"),  # the entity key
        (lambda row: {**row, "distance": "far"}, "distance"),
        (lambda row: {**row, "hour": "noon"}, "hour"),
    ],
)
def test_a_bad_row_gets_a_400_naming_the_field(served, change, field):
    for task in ("multiclass", "regression"):
        model = served[task]
        row = change(_request(model, _rows(served, 1, seed=2)[0]))
        answer = httpx.post(model.url + "/predict", json={"row": row}, timeout=10)
        assert answer.status_code == 400 and field in answer.text, (task, answer.text)


def _send_and_read(served, seed: int) -> tuple[dict, datetime, datetime]:
    """Send single rows and a batch to each model; returns what each answered, and when."""
    rows = _rows(served, 20, seed=seed)
    sent: dict[str, list[tuple[dict, dict]]] = {}
    started = datetime.now(UTC)
    for task in TASKS:
        model = served[task]
        with httpx.Client(base_url=model.url, timeout=30) as client:
            requests = [_request(model, r) for r in rows]
            pairs = [(r, client.post("/predict", json={"row": r}).json()) for r in requests[:12]]
            batch = client.post("/predict_batch", json={"rows": requests[12:]}).json()
            sent[task] = pairs + list(zip(requests[12:], batch, strict=True))
    return sent, started, datetime.now(UTC)


def _read_back(read, model, pairs, started: datetime, ended: datetime):
    """Read the log with ``read`` until every answer in ``pairs`` is there (the service flushes its log
    every 0.3 s), checked by :func:`_check_read_back`; returns the frame read."""
    import time

    deadline = time.monotonic() + 20
    while True:
        try:
            frame = read(model)
            _check_read_back(frame, model, pairs, started, ended)
            return frame
        except (AssertionError, MLOpsInputError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def _days(started: datetime, ended: datetime) -> list[str]:
    return sorted(
        {(started + timedelta(days=d)).date().isoformat() for d in (-1, 0)} | {ended.date().isoformat()}
    )


def _check_read_back(frame, model, pairs, started: datetime, ended: datetime) -> None:
    fields = [f.name for f in model.signature.request_fields]
    frame = frame[frame["version"] == model.version]
    for request, answer in pairs:
        match = frame
        for name in fields:
            match = match[match[name] == request[name]]
        assert len(match) >= 1, f"{model.name}: no logged prediction for {request}"
        row = match.iloc[-1]
        assert row["model"] == model.name and row["version"] == answer["model_version"]
        assert row["task"] == model.signature.task
        expected = logged_value(model.signature, answer)
        if isinstance(expected, float):
            assert row["prediction"] == pytest.approx(expected, rel=1e-12)
        else:
            assert row["prediction"] == expected
        assert started - timedelta(seconds=1) <= row["time"].to_pydatetime() <= ended + timedelta(seconds=1)


def test_every_prediction_is_read_back_from_the_log_with_its_value_version_and_time(served):
    sent, started, ended = _send_and_read(served, seed=3)
    days = _days(started, ended)
    for task in TASKS:
        model = served[task]
        frame = _read_back(
            lambda m: read_prediction_log(log_root(m.name), days), model, sent[task], started, ended
        )
        assert {"prediction", "model", "version", "task", "time"} <= set(frame.columns)


def test_the_drift_triggers_reading_gives_every_prediction_with_its_value_version_and_time(served):
    """The drift trigger (``DriftEventTrigger`` in prediction-log mode) reads the part files line by line
    and flattens each record with :func:`~airflow_mlops.ml.prediction_log.flatten`; the monitor's operator
    (``EvidentlyDriftOperator``, ``source="prediction_log"``) reads with ``read_prediction_log`` (above)."""
    import pandas as pd

    from airflow_mlops.artifacts import as_path

    def trigger_rows(model) -> pd.DataFrame:
        root = as_path(log_root(model.name))
        lines = [
            line
            for day in sorted(root.iterdir())
            for part in sorted(day.iterdir())
            if part.name.endswith(".jsonl")
            for line in part.read_text().splitlines()
            if line.strip()
        ]
        frame = pd.DataFrame.from_records([flatten(json.loads(line)) for line in lines])
        frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
        return frame

    sent, started, ended = _send_and_read(served, seed=4)
    for task in TASKS:
        model = served[task]
        _read_back(trigger_rows, model, sent[task], started, ended)


def test_a_version_without_a_signature_starts_but_is_not_ready_and_says_why(served):
    url = served["unsigned"].url
    ready = httpx.get(url + "/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "registered without a signature" in ready.json()["error"]
    refused = httpx.post(url + "/predict", json={"row": {"carrier": "UA"}}, timeout=10)
    assert refused.status_code == 503 and "registered without a signature" in refused.json()["error"]
