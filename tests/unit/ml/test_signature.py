"""A model's signature (ml/signature.py) inferred from a real training snapshot (Seattle's daily weather,
vega_datasets): the request schema refuses a value of the wrong type, an unknown category, a missing
entity key and garbage numbers; the answer has the task's fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from airflow_mlops.ml.signature import (
    ModelSignature,
    SignatureError,
    answers,
    infer_signature,
    logged_value,
    request_model,
    response_model,
    signature_of,
)

FEATURES = ["temp_max", "temp_min", "wind", "month", "season"]


@pytest.fixture(scope="module")
def snapshot() -> pd.DataFrame:
    from vega_datasets import data

    frame = data.seattle_weather()
    frame["station"] = "SEA"
    frame["month"] = frame["date"].dt.month
    frame["season"] = frame["month"].map(lambda m: ["winter", "spring", "summer", "autumn"][(m % 12) // 3])
    return frame


@pytest.fixture(scope="module")
def signature(snapshot) -> ModelSignature:
    return infer_signature(
        snapshot,
        task="multiclass",
        label="weather",
        classes=sorted(snapshot["weather"].unique()),
        features=FEATURES,
        entity_keys=["station"],
        store_features=["temp_max", "temp_min", "wind"],
        feature_service="weather_model",
    )


def test_the_signature_splits_keys_request_and_store_features(signature):
    assert [f.name for f in signature.entity_keys] == ["station"]
    assert [f.name for f in signature.request_features] == ["month", "season"]
    assert signature.store_features == ["temp_max", "temp_min", "wind"]
    month, season = signature.request_features
    assert month.type == "integer" and (month.minimum, month.maximum) == (1, 12)
    assert season.type == "string" and season.allowed == ["autumn", "spring", "summer", "winter"]
    assert signature.classes == ["drizzle", "fog", "rain", "snow", "sun"]
    # what the registry stores, and reads back
    record = {"tag": "weather:v1", "signature": signature.model_dump(mode="json")}
    assert signature_of(record) == signature


def test_the_request_model_refuses_bad_rows(signature):
    model = request_model(signature, "seattle_weather")
    assert model(station="SEA", month=3, season="spring").month == 3
    with pytest.raises(ValidationError, match="station"):
        model(month=3, season="spring")  # the entity key is missing
    with pytest.raises(ValidationError, match="month"):
        model(station="SEA", month="March", season="spring")  # wrong type
    with pytest.raises(ValidationError, match="season"):
        model(station="SEA", month=3, season="monsoon")  # a category never seen in training
    with pytest.raises(ValidationError, match="month"):
        model(station="SEA", month=10**9, season="spring")  # far outside the training range
    with pytest.raises(ValidationError, match="temp_max"):
        model(station="SEA", month=3, season="spring", temp_max=10.0)  # the store fills it, not the client
    schema = model.model_json_schema()
    assert set(schema["required"]) == {"station", "month", "season"}


def test_the_answer_per_task(signature):
    matrix = np.array([[0.1, 0.1, 0.6, 0.1, 0.1], [0.0, 0.0, 0.1, 0.0, 0.9]])
    first, second = answers(signature, matrix)
    assert first["label"] == "rain" and second["label"] == "sun"
    assert first["probabilities"]["rain"] == pytest.approx(0.6)
    assert logged_value(signature, first) == "rain"
    response_model(signature, "seattle_weather")(**first, model="seattle_weather", model_version="v1")

    binary = signature.model_copy(update={"task": "binary", "classes": ["dry", "wet"]})
    assert answers(binary, np.array([0.8])) == [{"probability": 0.8, "label": "wet"}]
    regression = signature.model_copy(update={"task": "regression", "classes": []})
    assert answers(regression, np.array([12.5])) == [{"value": 12.5}]


def test_a_version_without_a_signature_is_named():
    with pytest.raises(SignatureError, match="weather:v0 was registered without a signature"):
        signature_of({"tag": "weather:v0"})
    with pytest.raises(SignatureError, match="is not valid"):
        signature_of({"tag": "weather:v0", "signature": {"task": "ranking"}})


def test_a_snapshot_lacking_a_request_field_is_refused(snapshot):
    with pytest.raises(SignatureError, match=r"lacks the request fields \['visibility'\]"):
        infer_signature(
            snapshot, task="multiclass", label="weather", classes=["a", "b", "c"], features=["visibility"]
        )
