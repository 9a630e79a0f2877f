"""The model's input frame: rows as the service sends them (a list of dicts) and rows as the monitor and
batch code read them (a DataFrame) must reach the model as the same typed frame."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.ml.model_io import Predictor

ROWS = [
    {"carrier": "UA", "hour": 5, "distance": 1400.0, "extra": "ignored"},
    {"carrier": "ZZ", "hour": None, "distance": "719"},  # unseen carrier, missing hour, a number as text
    {"carrier": None, "hour": 23, "distance": "far"},  # missing carrier, unparseable distance
]


@pytest.fixture
def predictor() -> Predictor:
    return Predictor(
        task="binary",
        label="late",
        features=["carrier", "hour", "distance"],
        categorical={"carrier": ["AA", "UA"]},
        model_format="skops",
        model=None,
    )


def test_records_and_dataframe_give_the_same_frame(predictor):
    from_records = predictor.frame(ROWS)
    from_frame = predictor.frame(pd.DataFrame(ROWS))
    pd.testing.assert_frame_equal(from_records, from_frame)
    assert list(from_records.columns) == ["carrier", "hour", "distance"]
    assert list(from_records["carrier"].cat.categories) == ["AA", "UA"]
    assert from_records["carrier"].tolist()[0] == "UA"
    assert all(isinstance(v, float) and math.isnan(v) for v in from_records["carrier"].tolist()[1:])
    assert from_records["hour"].dtype == "float64" and math.isnan(from_records["hour"][1])
    assert from_records["distance"].tolist()[:2] == [1400.0, 719.0]
    assert math.isnan(from_records["distance"][2])


def test_a_feature_no_row_carries_is_named(predictor):
    rows = [{"carrier": "UA", "hour": 5}]
    for given in (rows, pd.DataFrame(rows)):
        with pytest.raises(MLOpsInputError, match=r"\['distance'\]"):
            predictor.frame(given)
