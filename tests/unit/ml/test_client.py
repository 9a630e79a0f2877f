"""The sample client's choice of rows: real rows of a data set that the model's request schema accepts."""

from __future__ import annotations

import pandas as pd
import pytest

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.ml.client import request_rows
from airflow_mlops.ml.signature import infer_signature, request_model


def _signature():
    training = pd.DataFrame(
        {
            "station": ["a", "b", "c"],
            "kind": ["x", "y", "x"],
            "temp": [1.0, 5.0, 9.0],
            "wind": [0.5, None, 2.0],
            "y": [1.0, 2.0, 3.0],
        }
    )
    return infer_signature(
        training,
        task="regression",
        label="y",
        classes=[],
        features=["kind", "temp", "wind"],
        entity_keys=["station"],
    )


def test_rows_have_every_required_field_and_their_true_label(tmp_path):
    holdout = pd.DataFrame(
        {
            "station": ["a", None, "zz", "b", "c"],  # no key
            "kind": ["x", "x", "q", "y", "y"],  # q: a kind never seen in training
            "temp": [2.0, 3.0, 4.0, None, 6.0],  # no temp
            "wind": [None, 1.0, 1.0, 1.0, 1.5],  # wind may be missing (it was in training)
            "y": [1.5, 2.5, 3.5, 4.5, 5.5],
            "other": [1, 2, 3, 4, 5],
        }
    )
    holdout.to_parquet(tmp_path / "holdout.parquet")
    signature = _signature()
    chosen = request_rows(f"file://{tmp_path}/holdout.parquet", signature, "m", rows=10)
    assert chosen == [
        {"row": {"station": "a", "kind": "x", "temp": 2.0, "wind": None}, "actual": 1.5},
        {"row": {"station": "c", "kind": "y", "temp": 6.0, "wind": 1.5}, "actual": 5.5},
    ]
    schema = request_model(signature, "m")
    assert all(schema.model_validate(c["row"]) for c in chosen)
    assert len(request_rows(f"file://{tmp_path}/holdout.parquet", signature, "m", rows=1)) == 1


def test_a_data_set_without_the_request_fields_is_refused_naming_them(tmp_path):
    pd.DataFrame({"temp": [1.0]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(MLOpsInputError, match=r"lacks the request fields \['station', 'kind', 'wind'\]"):
        request_rows(f"file://{tmp_path}/x.parquet", _signature(), "m", rows=5)
