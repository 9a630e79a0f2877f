"""Unit tests of the drift operators and the retraining gate: arguments, summaries, the registry
baseline, quality decay for each task (real scikit-learn models trained here on the Seattle weather of
vega_datasets), and the cooldown/dedup guard rails. Evidently is not imported here (the real library
runs in tests/integration/test_drift_flights.py and test_drift_any_task.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import Asset

from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.ml.retraining import RetrainingState, decide, event_figures, event_info
from airflow_mlops.operators.drift import (
    DriftReportLink,
    EvidentlyDriftOperator,
    RetrainingGateOperator,
    normalize_columns,
    production_reference,
    summarize_snapshot,
    window_dates,
)

DRIFT = Asset(name="flight_delay_drift", uri="mlops://models/flight_delay/drift")


def test_template_fields_link_and_asset_outlet() -> None:
    op = EvidentlyDriftOperator(
        task_id="drift",
        model_name="m",
        table="t",
        window_end="{{ ds }}",
        window_days="{{ params.days }}",
        prediction_drift="{{ params.predictions }}",
        drift_asset=DRIFT,
    )
    assert {"model_name", "reference_uri", "columns", "window_end", "window_days", "joins"} <= set(
        op.template_fields
    )
    assert op.window_days == "{{ params.days }}"  # kept as given, converted in execute()
    assert {"quality_metric", "prediction_drift"} <= set(op.template_fields)
    assert op.prediction_drift == "{{ params.predictions }}"
    assert [link.name for link in op.operator_extra_links] == ["Drift report"]
    assert DriftReportLink().xcom_key == "_link_DriftReportLink"
    # the drift Asset itself is a declared outlet (the Assets page names this task as its producer)
    assert op.outlets == [DRIFT]
    assert EvidentlyDriftOperator(task_id="d", model_name="m", table="t", drift_asset="x_drift").outlets == [
        Asset(name="x_drift")
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": "t"}, "needs model_name or reference_uri"),
        ({"model_name": "m"}, "names no table"),
        ({"model_name": "m", "source": "kafka"}, "source 'kafka'"),
        ({"model_name": "m", "table": "t", "drift_share": 0}, "drift_share must be in"),
        (
            {
                "model_name": "m",
                "table": "t",
                "label_column": "y",
                "label_rule": {"column": "d", "gt": 1, "lt": 3},
            },
            "label_rule",
        ),
        ({"model_name": "m", "table": "t", "label_rule": {"column": "d", "gt": 1}}, "names none"),
        ({"model_name": "m", "table": "t", "max_decay": 0.1, "max_auc_decay": 0.1}, "both max_decay"),
        ({"model_name": "m", "table": "t", "max_decay": "0.1"}, "max_decay '0.1'"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MLOpsArgumentError, match=message):
        EvidentlyDriftOperator(task_id="drift", **kwargs)


def test_window_dates() -> None:
    assert window_dates("2013-07-21", 7) == [f"2013-07-{d}" for d in range(15, 22)]
    assert window_dates("2013-03-01T00:00:00+00:00", 2) == ["2013-02-28", "2013-03-01"]
    assert window_dates("2013-01-03", 7, window_start="2013-01-02") == ["2013-01-02", "2013-01-03"]
    with pytest.raises(MLOpsArgumentError, match="starts"):
        window_dates("2013-01-01", 7, window_start="2013-01-05")


def test_column_specs() -> None:
    specs = normalize_columns(
        {"temp": {"kind": "numerical", "threshold": 4}, "origin": {"kind": "categorical"}}
    )
    assert specs == {
        "temp": {"kind": "numerical", "method": None, "threshold": 4.0},
        "origin": {"kind": "categorical", "method": None, "threshold": None},
    }
    with pytest.raises(MLOpsArgumentError, match="unknown settings"):
        normalize_columns({"temp": {"treshold": 1}})
    with pytest.raises(MLOpsArgumentError, match="kind 'text'"):
        normalize_columns({"temp": {"kind": "text"}})


def test_reference_columns_read_under_their_snapshot_names(tmp_path: Path) -> None:
    import pandas as pd

    from airflow_mlops.operators.drift import read_frame, reference_key

    snapshot = tmp_path / "training_set.parquet"
    pd.DataFrame(
        {"weather_hourly__temp": [30.5, 80.1], "sched_hour": [5, 23], "carrier": ["UA", "B6"]}
    ).to_parquet(snapshot)
    manifest = tmp_path / "training_set.manifest.json"
    manifest.write_text(json.dumps({"data_uri": f"file://{snapshot}"}))
    aliases = {"temp": "weather_hourly__temp", "hour": "sched_hour", "carrier": "never_used"}
    frame = read_frame(f"file://{manifest}", ["temp", "hour", "carrier"], aliases)
    assert list(frame.columns) == ["temp", "hour", "carrier"]  # a column present under its own name wins
    assert frame["temp"].tolist() == [30.5, 80.1] and frame["carrier"].tolist() == ["UA", "B6"]
    with pytest.raises(MLOpsInputError, match=r"lacks the drift columns \['dewp'\].*reference_columns"):
        read_frame(str(snapshot), ["temp", "dewp"], aliases)
    specs = {"temp": {"kind": "numerical"}}
    assert reference_key("u", specs) == reference_key("u", specs, {"hour": "sched_hour"})  # unused alias
    assert reference_key("u", specs) != reference_key("u", specs, aliases)


def _metric(mid: str, column: str, method: str, threshold: float, value: float) -> dict[str, Any]:
    return {
        "id": mid,
        "config": {
            "type": "evidently:metric_v2:ValueDrift",
            "column": column,
            "method": method,
            "threshold": threshold,
        },
        "value": value,
    }


def test_summary_of_a_snapshot_uses_test_status_and_method_direction() -> None:
    snapshot = {
        "metrics": [
            _metric("a", "temp", "Wasserstein distance (normed)", 4.0, 5.2),
            _metric("b", "origin", "Jensen-Shannon distance", 0.1, 0.01),
            _metric("c", "hour", "ks", 0.05, 0.001),  # a p-value below its threshold: drifted
            _metric("d", "dist", "ks", 0.05, 0.3),
        ],
        "tests": [
            {"metric_config": {"metric_id": "a"}, "status": "FAIL"},
            {"metric_config": {"metric_id": "b"}, "status": "SUCCESS"},
        ],
    }
    summary = summarize_snapshot(snapshot, drift_share=0.5)
    assert summary["drifted_columns"] == {"hour": 0.001, "temp": 5.2}
    assert summary["drift_share"] == 0.5 and summary["drift_detected"] is True
    assert summarize_snapshot(snapshot, drift_share=0.75)["drift_detected"] is False


def _registry_with_production(tmp_path: Path, *, manifest: bool = True) -> None:
    from airflow_mlops.hooks.bentoml import BentoMLHook

    data = tmp_path / "train.parquet"
    data.write_bytes(b"PAR1")
    manifest_uri = tmp_path / "manifest.json"
    manifest_uri.write_text(json.dumps({"data_uri": f"file://{data}", "rows": 10}))
    record: dict[str, Any] = {
        "tag": "flight_delay:v2",
        "version": "v2",
        "stage": "production",
        "metrics": {"auc": 0.70},
        "decisions": [{"action": "promote", "metric": "auc", "candidate_score": 0.72}],
    }
    if manifest:
        record["training_manifest"] = {
            "uri": f"file://{manifest_uri}",
            "time_range": {"start": "2013-01-01", "end": "2013-03-31"},
        }
    BentoMLHook().write_index(
        "flight_delay",
        {
            "model": "flight_delay",
            "production": "v2",
            "versions": {"v2": record, "v1": {"stage": "archived"}},
            "history": [],
        },
    )


def test_production_reference_follows_the_training_manifest(tmp_path: Path) -> None:
    _registry_with_production(tmp_path)
    ref = production_reference("flight_delay")
    assert ref["version"] == "v2"
    assert ref["reference_uri"] == f"file://{tmp_path / 'train.parquet'}"
    assert ref["time_range"]["end"] == "2013-03-31"
    assert ref["holdout_metrics"] == {"auc": 0.72}  # the score at promotion, not at registration


def test_production_reference_errors(tmp_path: Path) -> None:
    _registry_with_production(tmp_path, manifest=False)
    with pytest.raises(MLOpsInputError, match="records no training manifest"):
        production_reference("flight_delay")
    with pytest.raises(MLOpsInputError, match="has no production version"):
        production_reference("never_promoted")


def _promoted(name: str, metric: str, holdout_score: float, holdout_uri: str = "file:///h.parquet") -> dict:
    """``name`` in a registry with its production version promoted on ``metric`` at ``holdout_score``;
    returns what the monitor reads back (``production_model``)."""
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.drift import production_model

    record = {
        "tag": f"{name}:v3",
        "version": "v3",
        "stage": "production",
        "metrics": {"validation_" + metric: 0.0},
        "decisions": [
            {"action": "reject", "metric": metric, "candidate_score": 0.0},
            {
                "action": "promote",
                "metric": metric,
                "candidate_score": holdout_score,
                "holdout_uri": holdout_uri,
            },
        ],
    }
    BentoMLHook().write_index(
        name, {"model": name, "production": "v3", "versions": {"v3": record}, "history": []}
    )
    production = production_model(name)
    assert production is not None
    return production


def _monitor(monkeypatch: pytest.MonkeyPatch, model: Any, **kwargs: Any) -> EvidentlyDriftOperator:
    monkeypatch.setattr(EvidentlyDriftOperator, "hook", SimpleNamespace(load=lambda name, version: model))
    return EvidentlyDriftOperator(
        task_id="drift", model_name="m", table="t", label_column=model.label, **kwargs
    )


@pytest.fixture(scope="module")
def weather() -> Any:
    from seattle_models import seattle

    return seattle()


def test_regression_decay_is_the_rise_of_rmse_as_a_ratio(
    weather: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from seattle_models import between, regression_model

    model = regression_model(weather)

    def rmse(rows: Any) -> float:
        return float(np.sqrt(np.mean((rows["temp_max"].to_numpy() - model.predict(rows)) ** 2)))

    holdout = rmse(between(weather, "2014-01-01", "2014-07-01"))
    production = _promoted("seattle_temp", "rmse", holdout)
    op = _monitor(monkeypatch, model)
    year = between(weather, "2015-01-01", "2016-01-01")
    calm = op._quality(year, production)
    assert (calm["metric"], calm["holdout_score"], calm["max_decay"]) == ("rmse", holdout, 0.2)
    assert calm["labelled_rows"] == len(year) and calm["unlabelled_rows"] == 0
    assert calm["score"] == pytest.approx(rmse(year))
    assert calm["decay"] == pytest.approx(rmse(year) / holdout - 1) and 0 < calm["decay"] < 0.2
    assert "auc" not in calm and calm["model_version"] == "v3"

    summer = between(weather, "2015-07-01", "2015-09-01")  # hot days the linear model underestimates
    hot = op._quality(summer, production)
    assert hot["decay"] == pytest.approx(rmse(summer) / holdout - 1) and hot["decay"] > 0.2
    # a threshold per metric: 30 % of RMSE rise tolerated
    assert (
        _monitor(monkeypatch, model, max_decay={"rmse": 0.3})._quality(summer, production)["max_decay"] == 0.3
    )
    # another metric of the task, on request
    mae = _monitor(monkeypatch, model, quality_metric="mae")._quality(summer, production)
    assert mae["metric"] == "mae" and mae["holdout_score"] is None and mae["decay"] is None
    assert "no holdout mae" in mae["reason"]
    with pytest.raises(MLOpsArgumentError, match="quality_metric 'auc' does not fit a regression model"):
        _monitor(monkeypatch, model, quality_metric="auc")._quality(summer, production)


def test_multiclass_decay_is_the_drop_of_macro_f1_with_class_labels(
    weather: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from seattle_models import between, multiclass_model
    from sklearn.metrics import f1_score

    model = multiclass_model(weather)
    assert model.classes == ["drizzle", "fog", "rain", "snow", "sun"]

    def macro_f1(rows: Any) -> float:
        predicted = np.asarray(model.classes)[model.predict(rows).argmax(axis=1)]
        return float(
            f1_score(rows["weather"], predicted, average="macro", labels=model.classes, zero_division=0)
        )

    holdout = macro_f1(between(weather, "2013-01-01", "2013-04-01"))
    production = _promoted("seattle_weather", "macro_f1", holdout)
    op = _monitor(monkeypatch, model)
    spring = between(weather, "2013-01-01", "2013-07-01")
    calm = op._quality(spring, production)
    assert calm["metric"] == "macro_f1" and calm["score"] == pytest.approx(macro_f1(spring))
    assert calm["decay"] == pytest.approx(holdout - macro_f1(spring)) and calm["decay"] < 0.05
    assert calm["labels"]["rows_per_class"]["sun"] == int((spring["weather"] == "sun").sum())

    # 2014: the station reports fog where it reported rain and drizzle in 2012; the model trained then decays
    later = between(weather, "2014-01-01", "2015-01-01")
    drifted = op._quality(later, production)
    assert drifted["decay"] == pytest.approx(holdout - macro_f1(later)) and drifted["decay"] > 0.05
    # a label the model never saw is refused with the classes it knows
    odd = later.assign(weather=["hail"] + later["weather"].tolist()[1:])
    with pytest.raises(MLOpsInputError, match=r"\['hail'\] are not among the model's classes"):
        op._quality(odd, production)


def test_binary_decay_with_class_labels_or_0_1(weather: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from seattle_models import between, binary_model
    from sklearn.metrics import roc_auc_score

    model = binary_model(weather)
    assert model.classes == ["dry", "wet"]
    window = between(weather, "2013-01-01", "2013-03-01")
    expected = roc_auc_score(window["wet"] == "wet", model.predict(window))
    production = _promoted("seattle_wet", "auc", 0.99)
    with_classes = _monitor(monkeypatch, model)._quality(window, production)
    as_01 = _monitor(monkeypatch, model)._quality(
        window.assign(wet=(window["wet"] == "wet").astype(int)), production
    )
    for quality in (with_classes, as_01):
        assert quality["metric"] == "auc" and quality["score"] == pytest.approx(expected)
        assert quality["auc"] == quality["score"] and quality["holdout_auc"] == 0.99
        assert quality["decay"] == quality["auc_decay"] == pytest.approx(0.99 - expected)
    # the deprecated threshold still works, as {"auc": x}
    with pytest.warns(DeprecationWarning, match="max_auc_decay"):
        op = _monitor(monkeypatch, model, max_auc_decay=0.001)
    assert op.max_decay == {"auc": 0.001} and op._quality(window, production)["max_decay"] == 0.001


def test_label_rule_derives_a_0_1_label(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {"arr_delay": [0, 30, 5, 60, -3, 20, None], "score": [0.9, 0.1, 0.8, 0.2, 0.7, 0.75, 0.5]}
    )

    class Scores:
        task, classes, features, label = "binary", [0, 1], ["score"], "late"

        def predict(self, rows: pd.DataFrame) -> np.ndarray:
            return rows["score"].to_numpy()

    op = _monitor(monkeypatch, Scores(), label_rule={"column": "arr_delay", "gt": 15})
    quality = op._quality(frame, {"version": "v2", "holdout_metrics": {"auc": 0.72}})
    # labels 0,1,0,1,0,1; only the pair (0.75 > 0.7) is ranked right: AUC 1/9
    assert quality["labelled_rows"] == 6 and quality["unlabelled_rows"] == 1
    assert quality["score"] == pytest.approx(1 / 9) and quality["decay"] == pytest.approx(0.72 - 1 / 9)
    one_class = op._quality(
        frame[frame["arr_delay"] < 15], {"version": "v2", "holdout_metrics": {"auc": 0.7}}
    )
    assert one_class["score"] is None and "undefined" in one_class["reason"]


def test_quality_needs_the_production_version_and_the_models_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np
    import pandas as pd

    class Model:
        task, classes, label = "binary", [0, 1], "delayed"
        features = ["carrier", "temp"]

        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            return frame["temp"].to_numpy()

    op = _monitor(monkeypatch, Model())
    rows = pd.DataFrame({"carrier": ["UA", "B6", "UA"], "delayed": [1, 0, None]})
    quality = op._quality(rows, {})
    assert quality["labelled_rows"] == 0 and "no production version" in quality["reason"]
    production = {"version": "v2", "holdout_metrics": {"auc": 0.7}, "feature_service": None}
    with pytest.raises(MLOpsInputError, match=r"lack the model's features \['temp'\].*no feature service"):
        op._quality(rows, production)

    joined: list[tuple[list[str], str]] = []

    def with_features(self, frame: pd.DataFrame, prod: dict, missing: list[str]) -> pd.DataFrame:
        joined.append((missing, prod["feature_service"]))
        return frame.assign(temp=[0.9, 0.1])

    monkeypatch.setattr(EvidentlyDriftOperator, "_with_features", with_features)
    quality = op._quality(rows, {**production, "feature_service": "delay_model"})
    assert joined == [(["temp"], "delay_model")]
    assert quality["labelled_rows"] == 2 and quality["unlabelled_rows"] == 1
    assert quality["auc"] == 1.0 and quality["decay"] == pytest.approx(-0.3)


def test_max_decay_per_metric() -> None:
    from airflow_mlops.ml.drift import resolve_max_decay

    assert resolve_max_decay(None, "rmse") == 0.2 and resolve_max_decay(None, "auc") == 0.05
    assert resolve_max_decay({"rmse": 0.5}, "rmse") == 0.5 and resolve_max_decay({"rmse": 0.5}, "auc") == 0.05
    assert resolve_max_decay(0.01, "macro_f1") == 0.01
    with pytest.raises(MLOpsArgumentError, match=r"unknown metrics \['f2'\]"):
        resolve_max_decay({"f2": 0.1}, "auc")
    with pytest.raises(MLOpsArgumentError, match="positive number"):
        resolve_max_decay({"auc": -1}, "auc")


def test_labels_not_yet_written_give_no_auc_but_do_not_fail(tmp_path: Path) -> None:
    import pandas as pd

    op = EvidentlyDriftOperator(
        task_id="drift", model_name="m", table="t", label_column="delayed", labels_table="labelled"
    )
    assert op._labelled_rows(pd.DataFrame({"a": [1]}), f"file://{tmp_path}", ["2013-07-01"]) is None
    assert (
        EvidentlyDriftOperator(task_id="d", model_name="m", table="t")._labelled_rows(pd.DataFrame(), "x", [])
        is None
    )


# ----------------------------------------------------------------------------- retraining guard rails
def _event(day: int, *, asset: Asset = DRIFT, event_id: str | None = None) -> SimpleNamespace:
    extra = {"data_time": f"2013-07-{day:02d}", "drift_share": 0.33}
    if event_id is not None:
        extra["event_id"] = event_id
    return SimpleNamespace(
        asset=asset,
        extra=extra,
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
        source_dag_id="monitor",
        source_run_id=f"r{day}",
        source_task_id="drift",
        source_map_index=-1,
    )


def _run_gate(
    tmp_path: Path, run_id: str, events: list[SimpleNamespace], cooldown: float = 7
) -> dict[str, Any] | None:
    from airflow.sdk.exceptions import AirflowSkipException

    op = RetrainingGateOperator(
        task_id="gate", model_name="flight_delay", cooldown_days=cooldown, state_dir=str(tmp_path)
    )
    context = {
        "run_id": run_id,
        "triggering_asset_events": {DRIFT: events} if events else {},
        "logical_date": datetime(2013, 7, 1, tzinfo=UTC),
    }
    try:
        return op.execute(context)
    except AirflowSkipException:
        return None


def test_ten_drift_events_in_one_cooldown_window_start_one_retraining(tmp_path: Path) -> None:
    outcomes = []
    # ten daily drift events, July 10-19, each delivered twice, inside one 14-day cooldown window
    for i, day in enumerate(range(10, 20)):
        event = _event(day, event_id=f"drift-{day}")
        outcomes.append(_run_gate(tmp_path, f"train-{i}", [event, event], cooldown=14))
        outcomes.append(_run_gate(tmp_path, f"train-{i}-dup", [event], cooldown=14))
    started = [o for o in outcomes if o is not None]
    assert len(started) == 1
    assert started[0]["cause"]["event_id"] == "drift-10"
    state = RetrainingState(tmp_path, "flight_delay").read()
    assert [r["event_id"] for r in state["retrainings"]] == ["drift-10"]
    assert state["retrainings"][0]["run_id"] == "train-0"
    assert len(state["suppressed"]) == 19

    # a retry of the run that was let through trains again (idempotent), not skipped as a duplicate
    assert _run_gate(tmp_path, "train-0", [_event(10, event_id="drift-10")]) is not None
    # the next window: an event a cooldown (14 days of data time) after the last retraining starts a new one
    assert _run_gate(tmp_path, "train-23", [_event(23, event_id="drift-23")], cooldown=14) is None
    later = _run_gate(tmp_path, "train-later", [_event(10 + 14, event_id="drift-24")], cooldown=14)
    assert later is not None and later["cause"]["event_id"] == "drift-24"
    assert later["last_retraining"]["event_id"] == "drift-10"


def test_events_without_id_are_deduplicated_by_content() -> None:
    a, b = event_info("d", _event(10)), event_info("d", _event(10))
    assert a.event_id == b.event_id and a.event_id.startswith("content-")
    assert event_info("d", _event(11)).event_id != a.event_id
    assert a.data_time == datetime(2013, 7, 10, tzinfo=UTC)


def test_events_of_an_asset_watcher_are_read_from_the_trigger_payload() -> None:
    # Airflow stores a watcher's event as {"from_trigger": True, "payload": <the trigger event>}
    payload = {"status": "drift", "event_id": "log-abc", "data_time": "2013-07-21", "drift_share": 0.5}
    event = SimpleNamespace(
        extra={"from_trigger": True, "payload": payload}, timestamp=datetime(2026, 1, 1, tzinfo=UTC)
    )
    info = event_info("drift_log_watched", event)
    assert info.event_id == "log-abc" and info.extra == payload
    assert info.data_time == datetime(2013, 7, 21, tzinfo=UTC)  # data time, not the wall clock of the event
    assert event_figures({"event_id": "x", "payload": "not a trigger's"}) == {
        "event_id": "x",
        "payload": "not a trigger's",
    }


def test_decide_without_events_is_a_manual_run() -> None:
    decision = decide(
        [], {"retrainings": []}, cooldown=timedelta(days=7), manual_data_time=datetime(2013, 7, 1, tzinfo=UTC)
    )
    assert decision.proceed and "by hand" in decision.reason


def test_gate_refuses_bad_cooldown(tmp_path: Path) -> None:
    with pytest.raises(MLOpsArgumentError, match="cooldown_days"):
        _run_gate(tmp_path, "x", [], cooldown="a week")  # type: ignore[arg-type]


def test_drift_to_retrained_timeline_from_airflow_records() -> None:
    from airflow_mlops.ml.timeline import timeline

    event = {
        "id": 7,
        "timestamp": "2026-11-25T10:00:30Z",
        "extra": {"from_trigger": True, "payload": {"event_id": "july", "data_time": "2013-07-21"}},
    }
    landed = datetime(2026, 11, 25, 9, 58, 0, tzinfo=UTC)
    run = {"dag_run_id": "asset_triggered__1", "start_date": "2026-11-25T10:00:40Z"}
    served = {"task_id": "deploy", "state": "success", "end_date": "2026-11-25T10:09:30Z"}
    result = timeline(event, landed_at=landed, train_run=run, served=served)
    assert (result["event_id"], result["data_time"], result["retraining_run_id"]) == (
        "july",
        "2013-07-21",
        "asset_triggered__1",
    )
    assert result["seconds"] == {
        "landing_to_drift_event": 150.0,
        "drift_event_to_served": 540.0,
        "landing_to_served": 690.0,
    }
    assert result["served"] is True
    pending = timeline(event, landed_at=None, train_run=run, served=None)
    assert pending["served"] is False and set(pending["seconds"].values()) == {None}


def test_a_run_by_hand_starts_its_cooldown_at_its_data_time_not_the_wall_clock(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    manual = RetrainingGateOperator(
        task_id="gate",
        model_name="flight_delay",
        cooldown_days=60,
        state_dir=str(tmp_path),
        data_time="2013-04-01",
    )
    # triggered by hand today: the logical date is the wall clock, the data trained on ends 2013-04-01
    assert manual.execute(
        {"run_id": "manual", "triggering_asset_events": {}, "logical_date": datetime.now(UTC)}
    )
    # a drift event in July 2013 is past the 60-day cooldown counted from April, so it retrains
    assert _run_gate(tmp_path, "drift-july", [_event(10, event_id="drift-july")], cooldown=60) is not None
    with pytest.raises(AirflowSkipException, match="cooldown"):
        RetrainingGateOperator(
            task_id="gate", model_name="flight_delay", cooldown_days=60, state_dir=str(tmp_path)
        ).execute(
            {
                "run_id": "drift-again",
                "triggering_asset_events": {DRIFT: [_event(20, event_id="drift-later")]},
                "logical_date": datetime(2013, 7, 21, tzinfo=UTC),
            }
        )


def test_prediction_drift_flag_rendered_from_a_template() -> None:
    def flag(value: Any) -> bool:
        op = EvidentlyDriftOperator(task_id="d", model_name="m", table="t", prediction_drift=value)
        return op._wants_prediction_drift()

    assert flag("True") is True and flag(" false ") is False and flag(True) is True and flag("") is False
    with pytest.raises(MLOpsArgumentError, match="prediction_drift 'sometimes' is not a boolean"):
        flag("sometimes")


def test_a_prediction_drift_finding_is_a_different_event() -> None:
    from airflow_mlops.operators.drift import drift_event_id

    summary = {"drifted_columns": {"temp": 5.0}}
    window = ["2013-07-15", "2013-07-21"]
    plain = drift_event_id("m", window, summary)
    assert drift_event_id("m", window, summary, also=()) == plain  # ids of data drift alone are unchanged
    assert drift_event_id("m", window, summary, also=["prediction"]) != plain


class _AssetEvents:
    """The part of Airflow's ``inlet_events[asset]`` accessor the gate uses (after / ascending / limit)."""

    def __init__(self, events: list[SimpleNamespace]) -> None:
        self.events, self.query = events, {"ascending": True, "limit": None, "after": None}

    def after(self, after: str) -> _AssetEvents:
        self.query["after"] = datetime.fromisoformat(after)
        return self

    def ascending(self, ascending: bool = True) -> _AssetEvents:
        self.query["ascending"] = ascending
        return self

    def limit(self, limit: int) -> _AssetEvents:
        self.query["limit"] = limit
        return self

    def __iter__(self):
        chosen = [e for e in self.events if self.query["after"] is None or e.timestamp >= self.query["after"]]
        chosen.sort(key=lambda e: e.timestamp, reverse=not self.query["ascending"])
        return iter(chosen[: self.query["limit"]])


def test_events_airflow_gave_to_no_run_are_decided_by_the_next_run(tmp_path: Path) -> None:
    """apache/airflow#56050: while a train run is active, the first drift event queues the next run and
    the later ones (29 July, 5 August) are given to no run; the run that event starts decides over them,
    so 5 August, outside the cooldown, retrains now instead of waiting for an event that may never come."""
    from airflow.sdk.exceptions import AirflowSkipException

    def event(day: str, minute: int) -> SimpleNamespace:
        return SimpleNamespace(
            asset=DRIFT,
            extra={"data_time": day, "event_id": f"drift-{day}", "auc": 0.65},
            timestamp=datetime(2026, 11, 30, 15, minute, tzinfo=UTC),
            source_dag_id="monitor",
            source_run_id=f"check__{day}",
            source_task_id="drift",
            source_map_index=-1,
        )

    earlier = event("2013-07-01", 0)  # consumed by an earlier run, which retrained
    queued, left = event("2013-07-15", 1), [event("2013-07-29", 2), event("2013-08-05", 3)]
    gate = RetrainingGateOperator(
        task_id="gate", model_name="flight_delay", cooldown_days=28, state_dir=str(tmp_path), inlets=[DRIFT]
    )

    def run(run_id: str, triggering: list[SimpleNamespace], every: list[SimpleNamespace]) -> dict | None:
        context = {
            "run_id": run_id,
            "triggering_asset_events": {DRIFT: triggering},
            "inlet_events": {DRIFT: _AssetEvents(every)},
        }
        try:
            return gate.execute(context)
        except AirflowSkipException:
            return None

    assert run("first", [earlier], [earlier])["cause"]["event_id"] == "drift-2013-07-01"
    decided = run("second", [queued], [earlier, queued, *left])
    assert decided is not None and decided["cause"]["event_id"] == "drift-2013-08-05"
    state = RetrainingState(tmp_path, "flight_delay").read()
    assert {"drift-2013-07-15", "drift-2013-07-29", "drift-2013-08-05"} <= set(state["seen"])
    # the run a later event starts sees them as decided (no second retraining for 5 August)
    later = event("2013-08-12", 4)
    assert run("third", [later], [earlier, queued, *left, later]) is None
    # without inlets (a hand-written DAG that declares none) the gate decides on its own events only
    plain = RetrainingGateOperator(
        task_id="gate", model_name="other_model", cooldown_days=28, state_dir=str(tmp_path / "other")
    )
    context = {
        "run_id": "plain",
        "triggering_asset_events": {DRIFT: [queued]},
        "inlet_events": {DRIFT: _AssetEvents([queued, *left])},
    }
    assert plain.execute(context)["cause"]["event_id"] == "drift-2013-07-15"
