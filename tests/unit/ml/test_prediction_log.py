"""The prediction log writer under store failures: a real full disk (a small tmpfs), bounded memory, retention.

The model server's ``PredictionLogWriter`` must never lose the rows it buffers because the store failed
for a while, never let its flusher thread die, and never grow without bound. The disk-full cases mount a
real tmpfs of 4 MiB (root only; skipped otherwise) and fill it, so the writes fail with the
same ``OSError(ENOSPC)`` a full volume gives.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.ml.prediction_log import (
    PredictionLogWriter,
    log_root,
    make_record,
    read_prediction_log,
    read_records,
)

MODEL = "delays"


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def records(first: int, count: int, day: str | None = None) -> list[dict]:
    day = day or datetime.now(UTC).date().isoformat()
    return [
        make_record(
            model=MODEL,
            version="v1",
            task="binary",
            request={"id": i, "origin": "EWR"},
            features={"origin": "EWR", "temp": 20.0 + i % 30},
            prediction=0.25,
            answer={"probability": 0.25, "label": 0},
            time=f"{day}T10:00:00.{i % 1_000_000:06d}+00:00",
        )
        for i in range(first, first + count)
    ]


class Disk:
    """A real tmpfs mounted as the artifact root, which the test can fill and free."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    def fill(self) -> None:
        """Write until the file system says ENOSPC."""
        with self.filler.open("ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        # the suite runs as root (README): there a failed mount is an error; a developer's run as another
        # user cannot mount at all
        assert os.geteuid() != 0, f"mounting a tmpfs as root failed: {done.stderr.strip()}"
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{mount}/artifacts")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def writer_for_tests(**kwargs) -> PredictionLogWriter:
    """A writer that flushes every 50 ms or 50 rows and retries after 50 ms, backing off to 300 ms."""
    writer = PredictionLogWriter(MODEL, **{"flush_rows": 50, "flush_seconds": 0.05, **kwargs})
    writer.first_retry_seconds, writer.max_retry_seconds = 0.05, 0.3
    return writer


class Collect(logging.Handler):
    """The writer's log records (Airflow's logging setup does not let pytest's ``caplog`` see them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[Collect]:
    handler, logger = Collect(), logging.getLogger("airflow_mlops.ml.prediction_log")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_a_full_disk_loses_no_row_and_the_flusher_survives(disk: Disk, logged: Collect) -> None:
    writer = writer_for_tests()
    writer.append(records(0, 100))
    wait_for(lambda: writer.stats()["rows_written"] == 100)

    disk.fill()
    outage_started = time.monotonic()
    for batch in range(1, 31):  # predictions keep coming for ~1.5 s while nothing can be written
        writer.append(records(batch * 100, 100))
        time.sleep(0.05)
    wait_for(lambda: writer.stats()["failed_writes"] >= 3)
    during = writer.stats()
    outage = time.monotonic() - outage_started
    assert during["flusher_alive"] is True
    assert during["rows_buffered"] == 3000 and during["rows_dropped"] == 0
    assert "No space left on device" in during["last_error"] and during["failing_seconds"] > 0
    # retried with backoff, not once per append (30 appends each past flush_rows) nor per 50 ms tick
    assert during["failed_writes"] <= 4 + outage / 0.3
    errors = [r for r in logged.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot be written" in errors[0].getMessage()  # once per outage

    disk.free()
    wait_for(lambda: writer.stats()["rows_buffered"] == 0)
    after = writer.stats()
    assert after["rows_written"] == 3100 and after["failing_seconds"] == 0 and after["flusher_alive"]
    assert [r.getMessage() for r in logged.records if r.levelno == logging.WARNING][-1].startswith(
        f"Prediction log of {MODEL} written again after"
    )
    # the log has every row once, readable by the monitor's reader
    frame = read_prediction_log(log_root(MODEL), [datetime.now(UTC).date().isoformat()])
    assert sorted(frame["id"]) == list(range(3100))

    # and the thread still works after the outage
    writer.append(records(3100, 10))
    wait_for(lambda: writer.stats()["rows_written"] == 3110)
    writer.close()
    assert len(read_records(log_root(MODEL), [datetime.now(UTC).date().isoformat()])) == 3110


def test_a_long_outage_keeps_memory_bounded_and_counts_what_it_dropped(disk: Disk) -> None:
    writer = writer_for_tests(max_rows=1000)
    disk.fill()
    batches = [records(batch * 500, 500) for batch in range(60)]  # 30,000 predictions, ~9 MB of JSON
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            writer.append(batch)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    wait_for(lambda: writer.stats()["failed_writes"] >= 1)
    during = writer.stats()
    assert during["rows_buffered"] == 1000 and during["rows_dropped"] == 29_000
    assert grown < 2_000_000  # what 1,000 rows take, not 30,000
    assert during["flusher_alive"]

    disk.free()
    wait_for(lambda: writer.stats()["rows_buffered"] == 0)
    writer.close()
    # the newest rows were kept, each once
    frame = read_prediction_log(log_root(MODEL), [datetime.now(UTC).date().isoformat()])
    assert sorted(frame["id"]) == list(range(29_000, 30_000))
    assert writer.stats()["rows_dropped"] == 29_000 and writer.stats()["rows_written"] == 1000


def test_close_writes_what_is_buffered_once_the_store_is_back(disk: Disk) -> None:
    writer = writer_for_tests(flush_seconds=3600)
    disk.fill()
    writer.append(records(0, 40))
    assert writer.flush() == [] and writer.stats()["rows_buffered"] == 40  # kept, not raised
    disk.free()
    writer.close()
    assert len(read_records(log_root(MODEL), [datetime.now(UTC).date().isoformat()])) == 40


def test_retention_removes_old_days_and_keeps_recent_ones(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path}/artifacts")
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in (40, 31, 30, 1, 0)]
    seed = PredictionLogWriter(MODEL, flush_seconds=3600, retention_days=0)
    for n, day in enumerate(days):
        seed.append(records(n * 10, 10, day=day))
    seed.close()
    assert len(read_records(log_root(MODEL), days)) == 50

    # the server's writer sweeps by itself, in its flusher thread
    writer = PredictionLogWriter(MODEL, flush_seconds=0.05, retention_days=30)
    wait_for(lambda: writer.stats()["partitions_removed"] == 2)
    writer.close()
    kept = sorted(p.name for p in (tmp_path / "artifacts" / "predictions" / MODEL).iterdir())
    assert kept == [f"date={d}" for d in days[2:]]
    assert len(read_records(log_root(MODEL), days)) == 30
    assert writer.remove_expired(today=today + timedelta(days=365)) == days[2:]
    assert PredictionLogWriter(MODEL, retention_days=0).remove_expired(today=date(2100, 1, 1)) == []


def test_the_limits_default_to_the_mlops_settings(tmp_path: Path, monkeypatch) -> None:
    from airflow_mlops.exceptions import MLOpsConfigError

    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path}/artifacts")
    writer = PredictionLogWriter(MODEL)
    assert (writer.max_rows, writer.retention_days) == (200_000, 0)
    monkeypatch.setenv("AIRFLOW__MLOPS__PREDICTION_LOG_MAX_ROWS", "5000")
    monkeypatch.setenv("AIRFLOW__MLOPS__PREDICTION_LOG_RETENTION_DAYS", "90")
    writer = PredictionLogWriter(MODEL)
    assert (writer.max_rows, writer.retention_days) == (5000, 90)
    monkeypatch.setenv("AIRFLOW__MLOPS__PREDICTION_LOG_RETENTION_DAYS", "a quarter")
    with pytest.raises(MLOpsConfigError, match="prediction_log_retention_days must be a whole number"):
        PredictionLogWriter(MODEL)


def test_the_monitors_reader_leaves_shadow_records_out_and_old_records_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records of a shadow server (answers never returned to a client) are not served predictions: the
    drift monitor's reader leaves them out unless asked; records written before ``request_id`` and
    ``shadow`` existed read as before."""
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path}")
    day = datetime.now(UTC).date().isoformat()
    served = records(0, 10)  # written without a request id, as before the field existed
    shadow = [
        make_record(
            **{k: r[k] for k in ("model", "task", "request", "features", "prediction", "answer", "time")},
            version="v2",
            request_id=f"r{i}",
            shadow=True,
        )
        for i, r in enumerate(records(0, 4))
    ]
    assert "request_id" not in served[0] and "shadow" not in served[0]
    writer = PredictionLogWriter(MODEL, flush_seconds=3600, max_rows=1000, retention_days=0)
    writer.append(served + shadow)
    writer.close()
    frame = read_prediction_log(log_root(MODEL), [day])
    assert len(frame) == 10 and set(frame["version"]) == {"v1"}
    everything = read_prediction_log(log_root(MODEL), [day], include_shadow=True)
    assert len(everything) == 14 and (everything["version"] == "v2").sum() == 4

    writer = PredictionLogWriter("candidate-only", flush_seconds=3600, max_rows=1000, retention_days=0)
    writer.append(shadow)
    writer.close()
    with pytest.raises(MLOpsInputError, match="shadow records left out"):
        read_prediction_log(log_root("candidate-only"), [day])
