"""EvidentlyDriftOperator for a regression and a multiclass model, with the real Evidently 0.7.

Real models trained here on the Seattle weather of vega_datasets (see ``tests/seattle_models.py``), a
registry entry as promotion leaves it (the promote decision with its metric, holdout score and
``holdout_uri``), the window's days as offline-store partitions, and the served predictions written by
the real prediction-log writer with the answers the service builds from the model's signature. The
operator reads them back through :mod:`airflow_mlops.ml.prediction_log`: prediction drift of the
production version against its predictions on the holdout, and quality decay of the task's metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from seattle_models import (
    CLASS_FEATURES,
    between,
    multiclass_model,
    regression_model,
    seattle,
)

from airflow_mlops.operators.drift import EvidentlyDriftOperator, emitted_drift_events

pytestmark = pytest.mark.integration


class FakeTI:
    def __init__(self, run_id: str) -> None:
        self.dag_id, self.run_id, self.task_id = "seattle_monitor", run_id, "drift"
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@pytest.fixture(scope="module")
def weather() -> Any:
    return seattle()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry, artifact store and offline store of this test's own."""
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("AIRFLOW__MLOPS__OFFLINE_ROOT", raising=False)
    return tmp_path


def _parquet(path: Path, frame: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=["date"]).to_parquet(path, index=False)
    return f"file://{path}"


def _promote(
    state: Path, name: str, model: Any, train: Any, holdout: Any, metric: str, holdout_score: float
) -> None:
    """``name`` v3 in production, as registration and promotion record it."""
    from airflow_mlops.hooks.bentoml import BentoMLHook

    data = _parquet(state / "sets" / f"{name}_train.parquet", train)
    manifest = state / "sets" / f"{name}_train.json"
    manifest.write_text(json.dumps({"data_uri": data, "label": model.label, "rows": len(train)}))
    holdout_data = _parquet(state / "sets" / f"{name}_holdout.parquet", holdout)
    holdout_manifest = state / "sets" / f"{name}_holdout.json"
    holdout_manifest.write_text(json.dumps({"data_uri": holdout_data, "label": model.label}))
    record = {
        "tag": f"{name}:v3",
        "version": "v3",
        "stage": "production",
        "metrics": {},
        "training_manifest": {"uri": f"file://{manifest}"},
        "decisions": [
            {
                "action": "promote",
                "version": "v3",
                "metric": metric,
                "candidate_score": holdout_score,
                "holdout_uri": f"file://{holdout_manifest}",
            }
        ],
    }
    BentoMLHook().write_index(
        name, {"model": name, "production": "v3", "versions": {"v3": record}, "history": []}
    )


def _land(state: Path, rows: Any) -> str:
    """The window's rows as offline-store partitions of table ``seattle``; returns the offline root."""
    offline = state / "offline"
    for day, part in rows.groupby("day"):
        _parquet(offline / "seattle" / f"date={day}" / "part-0.parquet", part)
    return f"file://{offline}"


def _serve(name: str, model: Any, rows: Any, version: str = "v3") -> list[Any]:
    """What the model service logs when it answers ``rows``: the real writer, the signature's answers."""
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record
    from airflow_mlops.ml.signature import ModelSignature, answers, logged_value

    signature = ModelSignature(
        task=model.task, label=model.label, classes=model.classes, features=model.features
    )
    replies = answers(signature, model.predict(rows))
    writer = PredictionLogWriter(name, flush_seconds=3600)
    records = [
        make_record(
            model=name,
            version=version,
            task=model.task,
            request={f: row[f] for f in model.features},
            features={f: row[f] for f in model.features},
            prediction=logged_value(signature, reply),
            answer=reply,
            time=f"{row['day']}T12:00:00+00:00",
        )
        for row, reply in zip(rows.to_dict("records"), replies, strict=True)
    ]
    writer.append(records)
    writer.close()
    return [r["prediction"] for r in records]


def _check(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    model: Any,
    offline_root: str,
    end: str,
    days: int,
    **kwargs: Any,
) -> tuple[dict, list]:
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from airflow_mlops.hooks.bentoml import BentoMLHook

    # the registry is real; the model is the one trained here (BentoMLHook.load would read its files)
    monkeypatch.setattr(BentoMLHook, "load", lambda self, name, version: model)
    asset = Asset(name=f"{name}_drift")
    events = OutletEventAccessors()
    op = EvidentlyDriftOperator(
        task_id="drift",
        model_name=name,
        table="seattle",
        offline_root=offline_root,
        window_end=end,
        window_days=days,
        label_column=model.label,
        prediction_drift=True,
        drift_asset=asset,
        **kwargs,
    )
    result = op.execute({"ti": FakeTI(f"{name}-{end}"), "outlet_events": events, "run_id": f"{name}-{end}"})
    return result, emitted_drift_events(op, events)


def test_regression_model_in_a_hot_summer(weather: Any, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from scipy.stats import ks_2samp

    from airflow_mlops.artifacts import as_path

    model = regression_model(weather)
    train, holdout = (
        between(weather, "2012-01-01", "2014-01-01"),
        between(weather, "2014-01-01", "2014-07-01"),
    )
    holdout_rmse = float(np.sqrt(np.mean((holdout["temp_max"] - model.predict(holdout)) ** 2)))
    _promote(state, "seattle_temp", model, train, holdout, "rmse", holdout_rmse)
    summer = between(weather, "2015-07-01", "2015-09-01")
    offline = _land(state, summer)
    served = _serve("seattle_temp", model, summer)
    _serve("seattle_temp", model, summer.head(5), version="v2")  # an older version still answering

    result, events = _check(
        monkeypatch, "seattle_temp", model, offline, "2015-08-31", 62, columns=["temp_min", "wind"]
    )
    # prediction drift: the 62 answers of v3 against v3's answers on its holdout (Jan-Jun 2014)
    predictions = result["prediction_drift"]
    assert predictions["rows"] == len(served) == 62 and predictions["reference_rows"] == len(holdout)
    assert predictions["kind"] == "numerical" and predictions["method"] == "K-S p_value"
    expected = ks_2samp(model.predict(holdout), np.asarray(served, dtype=float)).pvalue
    assert predictions["score"] == pytest.approx(expected, rel=1e-6)
    assert predictions["score"] < predictions["threshold"] and predictions["drift_detected"] is True
    assert as_path(predictions["report_uri"]).exists()
    # quality: RMSE on the summer against the holdout RMSE, as a rise ratio
    window_rmse = float(np.sqrt(np.mean((summer["temp_max"] - model.predict(summer)) ** 2)))
    quality = result["quality"]
    assert (quality["metric"], quality["holdout_score"]) == ("rmse", holdout_rmse)
    assert quality["score"] == pytest.approx(window_rmse)
    assert (
        quality["decay"] == pytest.approx(window_rmse / holdout_rmse - 1) and result["decay_detected"] is True
    )
    [event] = events
    assert event.extra["prediction_drift_detected"] is True and event.extra["decay_detected"] is True
    assert event.extra["metric"] == "rmse" and event.extra["decay"] == quality["decay"]
    assert event.extra["auc"] is None  # no AUC for a regression model

    # the reference predictions are computed once per version and read back afterwards
    cached = as_path(predictions["reference_uri"])
    stamp = cached.stat().st_mtime
    again, _ = _check(monkeypatch, "seattle_temp", model, offline, "2015-08-31", 62, columns=["temp_min"])
    assert again["prediction_drift"]["reference_uri"] == predictions["reference_uri"]
    assert cached.stat().st_mtime == stamp and again["prediction_drift"]["score"] == predictions["score"]
    # a window nothing was served in: no prediction drift, no failure
    july, _ = _check(monkeypatch, "seattle_temp", model, offline, "2015-07-31", 31, columns=["temp_min"])
    assert july["prediction_drift"]["rows"] == 31  # July was served
    may, _ = _check(
        monkeypatch,
        "seattle_temp",
        model,
        _land(state, between(weather, "2015-05-01", "2015-06-01")),
        "2015-05-31",
        31,
        columns=["temp_min"],
    )
    assert may["prediction_drift"] == {
        "rows": 0,
        "reason": "no prediction was served in 2015-05-01..2015-05-31",
    }


def test_multiclass_model_served_as_on_its_holdout(
    weather: Any, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_mlops.ml.drift import label_codes
    from airflow_mlops.ml.metrics import scores

    model = multiclass_model(weather)
    train, holdout = (
        between(weather, "2012-01-01", "2013-01-01"),
        between(weather, "2013-01-01", "2013-04-01"),
    )
    holdout_f1 = scores(
        "multiclass", label_codes(holdout["weather"], "multiclass", model.classes), model.predict(holdout)
    )["macro_f1"]
    _promote(state, "seattle_sky", model, train, holdout, "macro_f1", holdout_f1)
    offline = _land(state, holdout)
    served = _serve("seattle_sky", model, holdout)  # the same days the model was promoted on
    assert set(served) <= set(model.classes)

    result, events = _check(
        monkeypatch, "seattle_sky", model, offline, "2013-03-31", 90, columns=CLASS_FEATURES[:2]
    )
    predictions = result["prediction_drift"]
    assert predictions["rows"] == 90 and predictions["kind"] == "categorical"
    # the same classes in the same shares
    assert predictions["drift_detected"] is False and predictions["score"] == pytest.approx(1.0)
    quality = result["quality"]
    assert quality["metric"] == "macro_f1" and quality["decay"] == pytest.approx(0.0, abs=1e-12)
    assert result["decay_detected"] is False
    # the winter's temperatures are far from the whole year the model was trained on: data drift only
    assert list(result["drifted_columns"]) == ["temp_max"] and result["drift_detected"] is True
    [event] = events
    assert event.extra["drift_detected"] is True
    assert event.extra["prediction_drift_detected"] is False and event.extra["decay_detected"] is False
    assert "auc" not in quality

    # a summer served: mostly "sun" predicted, where the holdout's winter was mostly "rain"
    summer = between(weather, "2013-07-01", "2013-09-01")
    served = _serve("seattle_sky", model, summer)
    assert served.count("sun") > len(served) / 2
    result, events = _check(
        monkeypatch, "seattle_sky", model, _land(state, summer), "2013-08-31", 62, columns=CLASS_FEATURES[:2]
    )
    predictions = result["prediction_drift"]
    assert predictions["rows"] == 62 and predictions["drift_detected"] is True
    assert predictions["score"] < predictions["threshold"]  # a chi-square p-value
    [event] = events
    assert event.extra["prediction_drift_detected"] is True
    assert event.extra["prediction_drift_score"] == predictions["score"]
