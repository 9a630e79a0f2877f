"""Unit tests of DriftEventTrigger: serialization, firing on a metric file and on the prediction log."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest
from airflow.triggers.base import BaseEventTrigger

from airflow_mlops.triggers.drift import STATE_KEY, DriftEventTrigger, column_psi, psi


def first_event(trigger: DriftEventTrigger, timeout: float = 10.0) -> Any:
    async def _first() -> Any:
        return await asyncio.wait_for(anext(trigger.run()), timeout)

    return asyncio.run(_first())


def no_event_within(trigger: DriftEventTrigger, seconds: float) -> bool:
    try:
        first_event(trigger, timeout=seconds)
    except TimeoutError:
        return True
    return False


def test_serialize_round_trip_is_exactly_the_init_arguments() -> None:
    trigger = DriftEventTrigger(
        source_uri="s3://b/predictions/m",
        reference_stats_uri="s3://b/drift/reference/k/stats.json",
        columns=["temp"],
        threshold=0.25,
        drift_share=0.4,
        window_files=3,
        min_rows=50,
        poll_interval=5.0,
        conn_id="aws",
    )
    classpath, kwargs = trigger.serialize()
    assert isinstance(trigger, BaseEventTrigger)
    assert set(kwargs) == set(inspect.signature(DriftEventTrigger.__init__).parameters) - {"self"}
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["threshold"] == 0.25 and kwargs["columns"] == ["temp"]


def test_psi() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2))
    stats = {"kind": "numerical", "edges": [0.0, 1.0, 2.0, 3.0], "shares": [1 / 3, 1 / 3, 1 / 3]}
    assert column_psi(stats, [0.5, 1.5, 2.5, 3.0]) == pytest.approx(psi([1 / 3] * 3, [0.25, 0.25, 0.5]))
    assert column_psi(stats, [None, float("nan")]) is None
    cats = {"kind": "categorical", "shares": {"EWR": 0.5, "JFK": 0.5}}
    assert column_psi(cats, ["EWR", "JFK"]) == 0
    assert column_psi(cats, ["LGA", "LGA"]) > 1


def test_metric_file_fires_when_drift_crosses_the_threshold(tmp_path: Path) -> None:
    metric = tmp_path / "drift_summary.json"
    trigger = DriftEventTrigger(source_uri=f"file://{metric}", threshold=0.3, poll_interval=0.05)
    assert no_event_within(trigger, 0.3)  # no file yet
    metric.write_text(json.dumps({"drift_share": 0.17, "window": {"end": "2013-05-07"}}))
    assert no_event_within(trigger, 0.3)
    metric.write_text(
        json.dumps(
            {
                "drift_share": 0.33,
                "event_id": "e1",
                "drifted_columns": {"temp": 5.2},
                "window": {"end": "2013-07-21"},
            }
        )
    )
    event = first_event(trigger)
    assert event.payload == {
        "status": "drift",
        "event_id": "e1",
        "data_time": "2013-07-21",
        "drift_share": 0.33,
        "drifted_columns": {"temp": 5.2},
        "metric": {"drift_share": 0.33},
        "source_uri": f"file://{metric}",
    }


def test_unreadable_metric_is_polled_again_and_never_fires(tmp_path: Path) -> None:
    # Every watcher event becomes an Asset event that schedules DAGs: an "error" event would start a
    # retraining, so a broken source only logs and the trigger fires once the source is readable.
    metric = tmp_path / "m.json"
    metric.write_text("{not json")
    trigger = DriftEventTrigger(source_uri=str(metric), poll_interval=0.05)
    assert no_event_within(trigger, 0.3)

    async def fix_then_wait() -> Any:
        events = trigger.run()
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        assert not pending.done()
        metric.write_text(json.dumps({"drift_share": 0.9, "event_id": "fixed"}))
        return await asyncio.wait_for(pending, 5)

    assert asyncio.run(fix_then_wait()).payload["event_id"] == "fixed"


class FakeStateStore:
    """The watched Asset's state store as the triggerer injects it (``aget``/``aset``)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = value


def test_keeps_watching_and_fires_only_new_findings_across_restarts(tmp_path: Path) -> None:
    metric = tmp_path / "drift_summary.json"
    metric.write_text(json.dumps({"drift_detected": True, "event_id": "july", "drift_share": 0.5}))
    store = FakeStateStore()

    async def watch(seconds: float) -> list[str]:
        """Event ids one trigger instance fires within ``seconds`` (a fresh instance: a restart)."""
        trigger = DriftEventTrigger(source_uri=str(metric), metric_key="drift_detected", poll_interval=0.05)
        trigger.asset_state_store = store
        fired: list[str] = []

        async def consume() -> None:
            async for event in trigger.run():
                fired.append(event.payload["event_id"])
                if len(fired) == 1:  # a new finding while the trigger keeps running
                    metric.write_text(
                        json.dumps({"drift_detected": True, "event_id": "august", "drift_share": 0.7})
                    )

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consume(), seconds)
        return fired

    assert asyncio.run(watch(0.6)) == ["july", "august"]  # each finding once, not once per poll
    assert store.values == {STATE_KEY: {"event_id": "august"}}
    assert asyncio.run(watch(0.4)) == []  # a restarted trigger does not fire the same finding again


ORIGINS = ["EWR"] * 4 + ["JFK"] * 3 + ["LGA"] * 3  # the reference's shares


def _serve(
    model: str,
    day: str,
    temps: list[float],
    probability: float | list[float] = 0.2,
    version: str = "v1",
    shadow: bool = False,
) -> None:
    """What the model service logs for one day of requests: records made and written by the real
    prediction-log writer (:mod:`airflow_mlops.ml.prediction_log`), with the answer built from the
    model's signature as the service builds it."""
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record
    from airflow_mlops.ml.signature import ModelSignature, answers, logged_value

    signature = ModelSignature(task="binary", label="delayed", classes=[0, 1], features=["origin", "temp"])
    writer = PredictionLogWriter(model, flush_seconds=3600)
    records = []
    for i, t in enumerate(temps):
        p = probability[i] if isinstance(probability, list) else probability
        [answer] = answers(signature, [p])
        records.append(
            make_record(
                model=model,
                version=version,
                task="binary",
                request={"origin": ORIGINS[i % 10]},
                features={"origin": ORIGINS[i % 10], "temp": t},
                prediction=logged_value(signature, answer),
                answer=answer,
                time=f"{day}T10:{i % 60:02d}:00+00:00",
                request_id=f"{day}-{i}",
                shadow=shadow,
            )
        )
    writer.append(records)
    writer.close()


@pytest.fixture
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{root}")
    return root


def _winter_stats(tmp_path: Path) -> Path:
    """Reference statistics of winter temperatures and the origins' shares."""
    stats = tmp_path / "stats.json"
    stats.write_text(
        json.dumps(
            {
                "columns": {
                    "temp": {
                        "kind": "numerical",
                        "edges": [20.0, 30.0, 40.0, 50.0],
                        "shares": [1 / 3, 1 / 3, 1 / 3],
                    },
                    "origin": {"kind": "categorical", "shares": {"EWR": 0.4, "JFK": 0.3, "LGA": 0.3}},
                }
            }
        )
    )
    return stats


HOT = [80.0 + (i % 10) for i in range(150)]  # July temperatures, far above the winter bins


def test_prediction_log_fires_on_drift_and_not_on_calm_data(tmp_path: Path, artifacts: Path) -> None:
    from airflow_mlops.ml.prediction_log import log_root

    stats = _winter_stats(tmp_path)
    log = log_root("delays")
    assert log == f"file://{artifacts}/predictions/delays"
    calm = [20.0 + (i % 30) for i in range(150)]
    _serve("delays", "2013-03-30", calm)
    _serve("delays", "2013-03-31", calm)
    trigger = DriftEventTrigger(
        source_uri=log,
        reference_stats_uri=str(stats),
        threshold=0.2,
        drift_share=0.5,
        window_files=2,
        poll_interval=0.05,
    )
    assert no_event_within(trigger, 0.5)

    hot = [80.0 + (i % 10) for i in range(150)]  # July temperatures, far above the winter bins
    _serve("delays", "2013-07-20", hot)
    _serve("delays", "2013-07-21", hot)
    event = first_event(trigger)
    assert event.payload["status"] == "drift"
    assert set(event.payload["drifted_columns"]) == {"temp"}
    assert event.payload["drift_share"] == 0.5 and event.payload["rows"] == 300
    assert event.payload["data_time"] == "2013-07-21"  # the newest prediction's time
    # the same log content gives the same event id (repeated firing is deduplicated downstream)
    assert first_event(trigger).payload["event_id"] == event.payload["event_id"]


def test_prediction_drift_of_one_version_against_its_holdout_predictions(
    tmp_path: Path, artifacts: Path
) -> None:
    """The logged ``prediction`` scored against the statistics of the production model's predictions
    on its holdout (as :func:`airflow_mlops.ml.drift.prediction_reference` caches them), one version only."""
    import pandas as pd

    from airflow_mlops.ml.drift import column_statistics
    from airflow_mlops.ml.prediction_log import log_root

    spec = {"prediction": {"kind": "numerical", "method": None, "threshold": None}}
    holdout_predictions = pd.DataFrame({"prediction": [0.1 + 0.2 * (i % 4) for i in range(400)]})
    stats = tmp_path / "prediction_stats.json"
    stats.write_text(json.dumps({"columns": column_statistics(holdout_predictions, spec)}))
    temps = [25.0] * 200
    calm = [0.1 + 0.2 * (i % 4) for i in range(200)]  # as on the holdout
    _serve("delays", "2013-07-20", temps, probability=calm, version="v1")
    _serve("delays", "2013-07-20", temps, probability=0.9, version="v2")  # a new version answers higher

    def watching(version: str) -> DriftEventTrigger:
        return DriftEventTrigger(
            source_uri=log_root("delays"),
            reference_stats_uri=str(stats),
            columns=["prediction"],
            threshold=0.2,
            drift_share=1.0,
            window_files=5,
            poll_interval=0.05,
            model_version=version,
        )

    event = first_event(watching("v2"))
    assert event.payload["rows"] == 200 and set(event.payload["drifted_columns"]) == {"prediction"}
    assert no_event_within(watching("v1"), 0.3)  # v1 answers as it did on its holdout
    assert no_event_within(watching("v3"), 0.3)  # no prediction of v3 was served
    both = first_event(watching(None))  # type: ignore[arg-type]
    assert both.payload["rows"] == 400


def test_drift_that_lasts_fires_once_and_a_new_drifted_window_once_more(
    tmp_path: Path, artifacts: Path
) -> None:
    """The trigger's own run loop over a log the real writer wrote: a finding is drift in a window of
    part files; drift that lasts over many polls, with predictions still arriving, is one finding; a whole
    new window that drifts is the next. The last finding survives a restart (the Asset's state store)."""
    from airflow_mlops.ml.prediction_log import log_root

    stats, store = _winter_stats(tmp_path), FakeStateStore()
    _serve("delays", "2013-07-20", HOT)
    _serve("delays", "2013-07-21", HOT)

    def watcher() -> DriftEventTrigger:
        trigger = DriftEventTrigger(
            source_uri=log_root("delays"),
            reference_stats_uri=str(stats),
            window_files=2,
            poll_interval=0.05,
        )
        trigger.asset_state_store = store
        return trigger

    async def watch() -> list[dict]:
        fired: list[dict] = []

        async def consume() -> None:
            async for event in watcher().run():
                fired.append(event.payload)

        task = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.6)  # a dozen polls while the drift lasts
            assert len(fired) == 1
            await asyncio.to_thread(_serve, "delays", "2013-07-22", HOT)  # more drifted predictions
            await asyncio.sleep(0.6)
            assert len(fired) == 1  # still the same finding: half of a new window
            await asyncio.to_thread(_serve, "delays", "2013-07-23", HOT)  # a whole new window
            for _ in range(100):
                if len(fired) == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)
        finally:
            task.cancel()
        return fired

    first, second = asyncio.run(watch())
    assert first["data_time"] == "2013-07-21" and first["window_end"].startswith("2013-07-21/part-")
    assert second["data_time"] == "2013-07-23" and second["window_start"].startswith("2013-07-22/")
    assert first["event_id"] != second["event_id"] and second["rows"] == 300
    assert store.values[STATE_KEY] == {"event_id": second["event_id"], "window_end": second["window_end"]}

    # a restarted triggerer neither fires the last finding again nor rescores its window
    assert no_event_within(watcher(), 0.4)
    _serve("delays", "2013-07-24", HOT)
    _serve("delays", "2013-07-25", HOT)
    assert first_event(watcher()).payload["window_start"].startswith("2013-07-24/")


def test_a_shadow_servers_records_are_not_served_traffic_and_never_fire(
    tmp_path: Path, artifacts: Path
) -> None:
    """A candidate in shadow mode logs its answers to copies of live requests next to production's; they
    were never served, so a shadow answering on drifted features (here: its own feature pipeline) must not
    count as the production model's traffic."""
    from airflow_mlops.ml.prediction_log import log_root

    stats = _winter_stats(tmp_path)
    calm = [20.0 + (i % 30) for i in range(150)]
    _serve("delays", "2013-03-30", calm)
    _serve("delays", "2013-03-30", HOT, version="v2", shadow=True)
    _serve("delays", "2013-03-31", calm)
    _serve("delays", "2013-03-31", HOT, version="v2", shadow=True)
    trigger = DriftEventTrigger(
        source_uri=log_root("delays"),
        reference_stats_uri=str(stats),
        threshold=0.2,
        drift_share=0.5,
        window_files=4,
        poll_interval=0.05,
    )
    assert no_event_within(trigger, 0.5)
