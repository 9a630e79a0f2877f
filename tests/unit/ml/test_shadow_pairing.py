"""Pairing production's and a shadow's prediction-log records by request id, and their agreement per task.

The records are made as the model service makes them (answers built from the signature, the request id
and shadow flag given to :func:`make_record`) and written by the real :class:`PredictionLogWriter`; the
report reads them back from the log."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_mlops.ml.prediction_log import PredictionLogWriter, log_root, make_record
from airflow_mlops.ml.shadow import shadow_report
from airflow_mlops.ml.signature import ModelSignature, answers, logged_value

DAY = "2026-03-02"
SIGNATURES = {
    "binary": ModelSignature(task="binary", label="delayed", classes=[0, 1], features=["temp"]),
    "multiclass": ModelSignature(task="multiclass", label="kind", classes=["a", "b", "c"], features=["temp"]),
    "regression": ModelSignature(task="regression", label="minutes", features=["temp"]),
}


@pytest.fixture(autouse=True)
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path}")
    return tmp_path


def _serve(
    model: str, task: str, version: str, outputs: list[Any], ids: list[str | None], shadow: bool
) -> None:
    """Log what a server of ``version`` answered with ``outputs`` (the model's raw output per row)."""
    signature = SIGNATURES[task]
    writer = PredictionLogWriter(model, flush_seconds=3600, max_rows=10_000, retention_days=0)
    writer.append(
        [
            make_record(
                model=model,
                version=version,
                task=task,
                request={"id": i},
                features={"temp": float(i)},
                prediction=logged_value(signature, answer),
                answer=answer,
                time=f"{DAY}T10:{i % 60:02d}:00+00:00",
                request_id=request_id,
                shadow=shadow,
            )
            for i, (answer, request_id) in enumerate(zip(answers(signature, outputs), ids, strict=True))
        ]
    )
    writer.close()


def test_binary_agreement_pairs_by_request_id_and_ignores_what_cannot_pair() -> None:
    ids = [f"r{i}" for i in range(10)]
    production = [0.2, 0.7, 0.9, 0.1, 0.6, 0.3, 0.8, 0.4, 0.55, 0.05]
    # the shadow disagrees on two labels (r1: 0.7 -> 0.4, r8: 0.55 -> 0.45); r9 never reached it,
    # and it answered one request production never logged (x1)
    candidate = [0.3, 0.4, 0.9, 0.1, 0.6, 0.3, 0.8, 0.4, 0.45, 0.5]
    _serve("delays", "binary", "v1", production + [0.5], ids + [None], shadow=False)  # + a batch row
    _serve("delays", "binary", "v2", candidate[:9] + [0.9], ids[:9] + ["x1"], shadow=True)
    report = shadow_report(log_root("delays"), [DAY], production_version="v1", shadow_version="v2")
    assert (report["paired"], report["production_unpaired"], report["shadow_unpaired"]) == (9, 1, 1)
    figures = report["agreement"]
    assert figures["task"] == "binary" and figures["rows"] == 9
    assert figures["label_agreement"] == pytest.approx(7 / 9, abs=1e-6)
    assert figures["probability_mean_abs_diff"] == pytest.approx((0.1 + 0.3 + 0.1) / 9, abs=1e-6)
    # another version's records (an earlier shadow) are not this one's
    assert shadow_report(log_root("delays"), [DAY], shadow_version="v3")["paired"] == 0


def test_multiclass_label_agreement() -> None:
    ids = [f"m{i}" for i in range(4)]
    rows = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]]
    shifted = [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]]
    _serve("kinds", "multiclass", "v1", rows, ids, shadow=False)
    _serve("kinds", "multiclass", "v2", shifted, ids, shadow=True)
    figures = shadow_report(log_root("kinds"), [DAY])["agreement"]
    assert figures == {"task": "multiclass", "rows": 4, "label_agreement": 0.75}


def test_regression_correlation_and_mean_absolute_difference() -> None:
    ids = [f"g{i}" for i in range(5)]
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    _serve("minutes", "regression", "v1", values, ids, shadow=False)
    _serve("minutes", "regression", "v2", [v * 2 + 1 for v in values], ids, shadow=True)
    figures = shadow_report(log_root("minutes"), [DAY])["agreement"]
    assert figures["correlation"] == pytest.approx(1.0)
    assert figures["value_mean_abs_diff"] == pytest.approx(31.0)
    # a constant shadow has no correlation (not a crash, not a made-up number)
    _serve("flat", "regression", "v1", values, ids, shadow=False)
    _serve("flat", "regression", "v2", [7.0] * 5, ids, shadow=True)
    assert shadow_report(log_root("flat"), [DAY])["agreement"]["correlation"] is None


def test_the_window_bounds_which_records_pair() -> None:
    ids = [f"w{i}" for i in range(30)]
    _serve("late", "binary", "v1", [0.9] * 30, ids, shadow=False)
    _serve("late", "binary", "v2", [0.9] * 30, ids, shadow=True)
    start = datetime.fromisoformat(f"{DAY}T10:10:00+00:00")
    report = shadow_report(log_root("late"), [DAY], start=start, end=start + timedelta(minutes=5))
    assert report["paired"] == 5 and report["agreement"]["label_agreement"] == 1.0
