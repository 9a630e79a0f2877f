"""The prediction log: one schema, written by the model service, read by the monitor and the drift trigger.

Where: ``<artifact_root>/predictions/<model>/date=YYYY-MM-DD/part-<time>-<pid>-<n>.jsonl`` (the UTC day
of the prediction), each part file written atomically. Each line is one JSON record:

``schema``
    :data:`SCHEMA_VERSION` (1).
``time``
    when the prediction was made, ISO 8601 in UTC (``2013-06-01T12:00:00.123456+00:00``).
``model`` / ``version``
    registry name and version of the model that answered.
``task``
    ``binary``, ``multiclass`` or ``regression``.
``request``
    the request row as sent: entity keys and request features.
``features``
    the model's input row (request features plus the values the feature store filled in).
``prediction``
    the one value prediction drift compares: binary, the probability of the positive class;
    multiclass, the predicted class; regression, the predicted value.
``answer``
    the whole answer without model and version: ``probability`` and ``label`` (binary), ``label`` and
    ``probabilities`` (multiclass), ``value`` (regression).
``request_id`` (optional)
    the ``X-MLOps-Request-Id`` header of the request, which the deployment's router sets on every request
    it forwards (and on its shadow copy: :mod:`airflow_mlops.ml.shadow` pairs production's and the
    shadow's records by it). Absent on records of requests sent without one and on records written before
    it existed; ``/predict_batch`` records carry none (BentoML's adaptive batching merges requests).
``shadow`` (optional)
    ``true`` on records of a server started in shadow mode (``MLOPS_SERVE_SHADOW=true``): answers to
    copies of live requests that were never returned to a client. Absent means ``false``.

:func:`read_prediction_log` returns it as a table with one column per request field and feature, plus
``prediction``, ``model``, ``version``, ``task`` and ``time``; it leaves shadow records out unless asked
(the monitor and the drift trigger count served predictions only). This module imports nothing heavy at
module level (the drift trigger runs in the triggerer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import date as date_type
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: the columns every row read back has besides the request fields and features
RECORD_COLUMNS = ("prediction", "model", "version", "task", "time")


def log_root(model: str, artifact_root: str | None = None) -> str:
    """The prediction log folder of ``model``: ``<artifact_root>/predictions/<model>``."""
    if artifact_root is None:
        from airflow_mlops.config import load_settings

        artifact_root = load_settings().artifact_root
    return f"{str(artifact_root).rstrip('/')}/predictions/{model}"


def clean(value: Any) -> Any:
    """A JSON-able value: NumPy scalars to Python, NaN to None, timestamps to ISO strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def make_record(
    *,
    model: str,
    version: str,
    task: str,
    request: Mapping[str, Any],
    features: Mapping[str, Any],
    prediction: Any,
    answer: Mapping[str, Any],
    time: str | None = None,
    request_id: str | None = None,
    shadow: bool = False,
) -> dict[str, Any]:
    """One log record in the schema above (``request_id`` and ``shadow`` only when set)."""
    record = {
        "schema": SCHEMA_VERSION,
        "time": time or datetime.now(UTC).isoformat(),
        "model": model,
        "version": version,
        "task": task,
        "request": {k: clean(v) for k, v in request.items()},
        "features": {k: clean(v) for k, v in features.items()},
        "prediction": clean(prediction),
        "answer": {k: clean(v) if not isinstance(v, Mapping) else dict(v) for k, v in answer.items()},
    }
    if request_id:
        record["request_id"] = request_id
    if shadow:
        record["shadow"] = True
    return record


def is_shadow(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a shadow server's answer (never returned to a client)."""
    return record.get("shadow") is True


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as one flat row: request fields, then features (which win on a shared name), then
    ``prediction``, ``model``, ``version``, ``task``, ``time``."""
    row: dict[str, Any] = {}
    for part in ("request", "features"):
        if isinstance(record.get(part), Mapping):
            row.update(record[part])
    for column in RECORD_COLUMNS:
        row[column] = record.get(column)
    return row


def read_records(root: str, dates: Sequence[str]) -> list[dict[str, Any]]:
    """The raw records logged on ``dates`` (``YYYY-MM-DD``) under ``root``, in file order."""
    from airflow_mlops.artifacts import as_path

    folder_root = as_path(root)
    records: list[dict[str, Any]] = []
    for day in dates:
        folder = folder_root / f"date={day}"
        if not folder.exists():
            continue
        for part in sorted(p for p in folder.iterdir() if p.name.endswith(".jsonl")):
            for line in part.read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    return records


def read_prediction_log(root: str, dates: Sequence[str], *, include_shadow: bool = False) -> Any:
    """The predictions logged on ``dates`` as a pandas DataFrame (see the module docstring).

    :param include_shadow: keep the records of shadow servers too (by default only the predictions that
        were served to clients).
    :raises MLOpsInputError: the log holds no prediction for those days.
    """
    import pandas as pd

    from airflow_mlops.exceptions import MLOpsInputError

    records = read_records(root, dates)
    if not include_shadow:
        records = [r for r in records if not is_shadow(r)]
    if not records:
        raise MLOpsInputError(
            f"no predictions were logged under {root!r} for {dates[0]}..{dates[-1]}"
            f"{'' if include_shadow else ' (shadow records left out)'}.",
            fix="check that the model is served and logging predictions, or move the window.",
        )
    frame = pd.DataFrame.from_records([flatten(r) for r in records])
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    return frame


@dataclass
class _Part:
    """Rows of one day sealed under a part-file name. The name is fixed when sealed, so a retried write
    replaces the same file or object instead of adding a second copy of the rows."""

    date: str
    name: str
    lines: list[str]
    attempted: bool = False


class PredictionLogWriter:
    """Buffers records and flushes them as atomic JSON-lines part files (see the module docstring).

    One flusher thread writes the buffer every ``flush_seconds``, or sooner once ``flush_rows`` records
    wait. A write that fails (disk full, object store unreachable, expired credentials: any error) keeps
    its rows buffered and is retried with exponential backoff up to ``max_retry_seconds``; the thread
    never dies, and an outage is logged once when it starts and once when it ends, not per attempt. A
    retried part keeps its file name, so a write that failed after the store had taken it is not
    duplicated. While the store cannot be written at most ``max_rows`` rows are kept: past that the
    oldest are dropped (serving never blocks on the log), counted in :meth:`stats` and logged once per
    outage. Day partitions older than ``retention_days`` are removed (checked hourly).

    :param model: registry name of the served model.
    :param flush_rows: flush when this many records are buffered.
    :param flush_seconds: flush at least this often while records are buffered.
    :param max_rows: most rows kept in memory; default ``[mlops] prediction_log_max_rows`` (200,000).
    :param retention_days: remove ``date=`` partitions older than this many days (0: keep all); default
        ``[mlops] prediction_log_retention_days`` (0).
    :param max_retry_seconds: longest wait between two attempts while writes fail.
    """

    #: first wait after a failed write (doubles per failure up to ``max_retry_seconds``)
    first_retry_seconds = 1.0
    #: how often the retention sweep runs
    retention_check_seconds = 3600.0

    def __init__(
        self,
        model: str,
        flush_rows: int = 2000,
        flush_seconds: float = 5.0,
        *,
        max_rows: int | None = None,
        retention_days: int | None = None,
        max_retry_seconds: float = 60.0,
    ) -> None:
        from airflow_mlops.artifacts import ArtifactStore

        if max_rows is None or retention_days is None:
            from airflow_mlops.config import load_settings

            settings = load_settings()
            max_rows = settings.prediction_log_max_rows if max_rows is None else max_rows
            if retention_days is None:
                retention_days = settings.prediction_log_retention_days
        self.model = model
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_rows = max(1, int(max_rows))
        self.retention_days = int(retention_days)
        self.max_retry_seconds = max_retry_seconds
        self.store = ArtifactStore()
        self._open: list[tuple[str, str]] = []  # (date, JSON line), not yet sealed into a part
        self._sealed: deque[_Part] = deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._seq = 0
        # figures of stats(); guarded by _lock
        self._written = 0
        self._parts_written = 0
        self._dropped = 0
        self._failed_writes = 0
        self._failing_since: float | None = None
        self._episode_dropped = 0
        self._last_error: str | None = None
        self._last_error_at: str | None = None
        self._last_write_at: str | None = None
        self._partitions_removed = 0
        self._retry_seconds = self.first_retry_seconds
        self._next_sweep = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ buffering
    def append(self, records: list[dict[str, Any]]) -> None:
        """Buffer ``records`` (made by :func:`make_record`). They are encoded here, by the caller's
        thread, a batch at a time: encoding thousands at flush time would hold the GIL long enough to
        stall requests. Never blocks on the store and never raises because of it."""
        lines = [(r["time"][:10], json.dumps(r, default=str) + "\n") for r in records]
        with self._lock:
            self._open.extend(lines)
            self._buffered += len(lines)
            if self._buffered > self.max_rows:
                self._drop_oldest(self._buffered - self.max_rows)
            full = len(self._open) >= self.flush_rows
        if full:
            self._wake.set()

    def _drop_oldest(self, count: int) -> None:
        """Drop ``count`` of the oldest buffered rows (sealed parts first); caller holds ``_lock``."""
        left = count
        while left and self._sealed:
            part = self._sealed[0]
            if len(part.lines) <= left:
                left -= len(part.lines)
                self._sealed.popleft()
            else:
                del part.lines[:left]
                left = 0
        if left:
            del self._open[:left]
        self._buffered -= count
        self._dropped += count
        if not self._episode_dropped:
            log.error(
                "Prediction log of %s: more than %d rows wait for the store (%s); dropping the oldest "
                "until writes succeed again (counted in rows_dropped)",
                self.model,
                self.max_rows,
                self._last_error or "writes are slower than predictions",
            )
        self._episode_dropped += count

    # -------------------------------------------------------------------------------------- writing
    def _run(self) -> None:
        while True:
            if self._failing_since is not None:
                stopped = self._stop.wait(self._retry_seconds)  # back off: appends do not wake us
            else:
                self._wake.wait(self.flush_seconds)
                self._wake.clear()
                stopped = self._stop.is_set()
            if stopped:
                return
            try:
                self.flush()
                self._sweep()
            except Exception:  # a bug here must not stop logging for the life of the server
                log.exception("Prediction log flusher of %s hit an unexpected error; carrying on", self.model)

    def _seal(self) -> None:
        """Move the open rows into parts, one per day; caller holds ``_lock``. Rows join the newest part
        of their day while that part was never attempted (one file per day per outage, not per retry)."""
        if not self._open:
            return
        by_date: dict[str, list[str]] = {}
        for date, line in self._open:
            by_date.setdefault(date, []).append(line)
        self._open = []
        for date, lines in sorted(by_date.items()):
            last = next((p for p in reversed(self._sealed) if p.date == date), None)
            if last is not None and not last.attempted:
                last.lines.extend(lines)
                continue
            self._seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            self._sealed.append(_Part(date, f"part-{stamp}-{os.getpid()}-{self._seq:06d}.jsonl", lines))

    def flush(self, timeout: float | None = None) -> list[str]:
        """Write what is buffered, oldest part first; returns the part files written. At the first part
        that cannot be written it stops: that part and the later ones stay buffered for the next attempt
        (the error is recorded in :meth:`stats`, never raised).

        :param timeout: give up (writing nothing) when another flush holds the writer this long, e.g. a
            write hanging on an unreachable store; default wait.
        """
        from airflow_mlops.artifacts import staged

        written: list[str] = []
        if not self._write_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return written
        try:
            with self._lock:
                self._seal()
                todo = list(self._sealed)
            for part in todo:
                with self._lock:
                    if not self._sealed or self._sealed[0] is not part:
                        continue  # dropped meanwhile (memory bound)
                    part.attempted = True
                    lines = list(part.lines)
                try:
                    target = self.store.path("predictions", self.model, f"date={part.date}", part.name)
                    with staged(target) as local:
                        local.write_text("".join(lines))
                except Exception as err:
                    self._failed(err, part)
                    break
                self._succeeded(part, len(lines))
                written.append(str(target))
            else:
                self._drained()
        finally:
            self._write_lock.release()
        return written

    def _failed(self, err: Exception, part: _Part) -> None:
        with self._lock:
            self._failed_writes += 1
            self._last_error = f"{type(err).__name__}: {err}"
            self._last_error_at = datetime.now(UTC).isoformat()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self._retry_seconds = self.first_retry_seconds
                log.error(
                    "Prediction log of %s cannot be written (%s); keeping %d rows in memory and retrying "
                    "with backoff (at most %d rows kept)",
                    self.model,
                    self._last_error,
                    self._buffered,
                    self.max_rows,
                )
            else:
                self._retry_seconds = min(self._retry_seconds * 2, self.max_retry_seconds)
                log.debug("Prediction log of %s still failing: %s", self.model, self._last_error)

    def _succeeded(self, part: _Part, rows: int) -> None:
        with self._lock:
            if self._sealed and self._sealed[0] is part:
                self._sealed.popleft()
                self._buffered -= len(part.lines)
                trimmed = rows - len(part.lines)
            else:  # the whole part was dropped by the memory bound while it was being written
                trimmed = rows
            # rows dropped from this part while it was being written were written all the same
            self._dropped -= trimmed
            self._episode_dropped = max(0, self._episode_dropped - trimmed)
            self._written += rows
            self._parts_written += 1
            self._last_write_at = datetime.now(UTC).isoformat()

    def _drained(self) -> None:
        """Every buffered part was written: an outage (if any) is over; say so once."""
        with self._lock:
            if self._failing_since is not None:
                log.warning(
                    "Prediction log of %s written again after %.0f s of failed writes; %d rows dropped "
                    "meanwhile (%d failed attempts in all)",
                    self.model,
                    time.monotonic() - self._failing_since,
                    self._episode_dropped,
                    self._failed_writes,
                )
                self._failing_since = None
            self._episode_dropped = 0

    # ------------------------------------------------------------------------------------ retention
    def _sweep(self) -> None:
        if self.retention_days <= 0 or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.retention_check_seconds
        try:
            removed = self.remove_expired()
        except Exception as err:  # retried at the next sweep
            log.warning("Prediction log retention of %s failed: %s: %s", self.model, type(err).__name__, err)
            return
        if removed:
            log.info(
                "Prediction log of %s: removed %d day(s) older than %d days: %s",
                self.model,
                len(removed),
                self.retention_days,
                ", ".join(removed),
            )

    def remove_expired(self, today: date_type | None = None) -> list[str]:
        """Remove the ``date=YYYY-MM-DD`` partitions more than ``retention_days`` before ``today`` (UTC);
        returns the days removed. Nothing is removed when ``retention_days`` is 0."""
        if self.retention_days <= 0:
            return []
        today = today or datetime.now(UTC).date()
        cutoff = (today - timedelta(days=self.retention_days)).isoformat()
        root = self.store.path("predictions", self.model)
        if not root.exists():
            return []
        removed = []
        for folder in sorted(root.iterdir(), key=lambda p: p.name):
            day = folder.name[5:] if folder.name.startswith("date=") else ""
            if len(day) == 10 and day < cutoff:
                try:
                    folder.fs.rm(folder.path, recursive=True)
                except FileNotFoundError:  # another replica removed it first
                    pass
                removed.append(day)
        with self._lock:
            self._partitions_removed += len(removed)
        return removed

    # --------------------------------------------------------------------------------------- status
    def stats(self) -> dict[str, Any]:
        """What a service can report about its log (JSON-able): ``rows_written``, ``rows_buffered``,
        ``rows_dropped`` (lost to the memory bound), ``parts_written``, ``failed_writes``,
        ``failing_seconds`` (0 while writes succeed), ``last_error`` and ``last_error_at``,
        ``last_write_at``, ``partitions_removed``, ``max_rows``, ``retention_days`` and
        ``flusher_alive``."""
        with self._lock:
            return {
                "rows_written": self._written,
                "rows_buffered": self._buffered,
                "rows_dropped": self._dropped,
                "parts_written": self._parts_written,
                "failed_writes": self._failed_writes,
                "failing_seconds": (
                    0.0 if self._failing_since is None else round(time.monotonic() - self._failing_since, 3)
                ),
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "last_write_at": self._last_write_at,
                "partitions_removed": self._partitions_removed,
                "max_rows": self.max_rows,
                "retention_days": self.retention_days,
                "flusher_alive": self._thread.is_alive(),
            }

    def close(self, timeout: float = 10.0) -> None:
        """Stop the flusher and write what is buffered, retrying for up to ``timeout`` seconds; rows
        that still cannot be written are logged as lost."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        wait = min(self.first_retry_seconds, timeout)
        while True:
            self.flush(timeout=max(0.0, deadline - time.monotonic()))
            with self._lock:
                left = self._buffered
            if not left or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            wait = min(wait * 2, self.max_retry_seconds)
        if left:
            log.error(
                "Prediction log of %s: %d rows could not be written before shutdown and are lost (%s)",
                self.model,
                left,
                self._last_error,
            )
