"""Unit tests of the landing trigger and sensor: serialization, firing, deferral."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_mlops.exceptions import MLOpsError
from airflow_mlops.sensors.landing import LandedBatchSensor
from airflow_mlops.triggers.landing import LandedBatchTrigger


def first_event(trigger: LandedBatchTrigger, timeout: float = 10.0) -> Any:
    async def _first() -> Any:
        return await asyncio.wait_for(anext(trigger.run()), timeout)

    return asyncio.run(_first())


def test_serialize_round_trip() -> None:
    trigger = LandedBatchTrigger(
        uri="s3://bucket/landing/f.parquet", poke_interval=5.0, conn_id="aws_default"
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_mlops.triggers.landing.LandedBatchTrigger"
    assert kwargs == {"uri": "s3://bucket/landing/f.parquet", "poke_interval": 5.0, "conn_id": "aws_default"}
    rebuilt = LandedBatchTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_fires_when_the_file_appears_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "date=2013-01-01" / "flights.parquet"
    trigger = LandedBatchTrigger(uri=f"file://{target}", poke_interval=0.05)
    threaded: list[str] = []
    real_to_thread = asyncio.to_thread

    async def spy_to_thread(func, /, *args, **kwargs):
        threaded.append(func.__name__)
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy_to_thread)

    async def scenario() -> tuple[Any, int]:
        ticks = 0

        async def land_later() -> None:
            nonlocal ticks
            for _ in range(10):  # the event loop keeps running while the trigger waits
                await asyncio.sleep(0.03)
                ticks += 1
            target.parent.mkdir(parents=True)
            target.write_bytes(b"PAR1")

        lander = asyncio.create_task(land_later())
        event = await asyncio.wait_for(anext(trigger.run()), 10)
        await lander
        return event, ticks

    event, ticks = asyncio.run(scenario())
    assert event.payload == {"status": "success", "uri": f"file://{target}"}
    assert ticks == 10
    assert len(threaded) >= 2 and set(threaded) == {"_exists"}  # every check ran in a thread


def test_store_error_becomes_an_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    trigger = LandedBatchTrigger(uri="file:///nowhere/f.parquet", poke_interval=0.01)

    def broken() -> bool:
        raise PermissionError("access denied")

    monkeypatch.setattr(trigger, "_exists", broken)
    event = first_event(trigger)
    assert event.payload["status"] == "error"
    assert "access denied" in event.payload["message"]


def test_sensor_defers_with_the_trigger_when_the_batch_is_missing(tmp_path: Path) -> None:
    target = tmp_path / "missing.parquet"
    sensor = LandedBatchSensor(task_id="wait", uri=str(target), poke_interval=7, timeout=60, deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, LandedBatchTrigger)
    assert trigger.serialize()[1] == {"uri": f"file://{target}", "poke_interval": 7.0, "conn_id": None}
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout.total_seconds() == 60


def test_sensor_returns_at_once_when_the_batch_is_there(tmp_path: Path) -> None:
    target = tmp_path / "there.parquet"
    target.write_bytes(b"PAR1")
    sensor = LandedBatchSensor(task_id="wait", uri=str(target), deferrable=True)
    assert sensor.execute({}) == f"file://{target}"


def test_sensor_resumes_from_the_event_only() -> None:
    sensor = LandedBatchSensor(task_id="wait", uri="flights/{{ ds }}.parquet", deferrable=True)
    assert sensor.execute_complete({}, {"status": "success", "uri": "s3://b/f.parquet"}) == "s3://b/f.parquet"
    with pytest.raises(MLOpsError, match="s3://b/f.parquet.*denied"):
        sensor.execute_complete({}, {"status": "error", "uri": "s3://b/f.parquet", "message": "denied"})


def test_sensor_relative_uri_is_under_landing_root() -> None:
    sensor = LandedBatchSensor(task_id="wait", uri="flights/date=2013-01-01/flights.parquet")
    assert sensor.template_fields == ("uri",)
    assert sensor.resolved_uri().endswith("/mlops/landing/flights/date=2013-01-01/flights.parquet")
    assert sensor.deferrable is False  # [operators] default_deferrable is False in the suite's config
