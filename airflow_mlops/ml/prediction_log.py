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

:func:`read_prediction_log` returns it as a table with one column per request field and feature, plus
``prediction``, ``model``, ``version``, ``task`` and ``time``. This module imports nothing heavy at
module level (the drift trigger runs in the triggerer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
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
) -> dict[str, Any]:
    """One log record in the schema above."""
    return {
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


def read_prediction_log(root: str, dates: Sequence[str]) -> Any:
    """The predictions logged on ``dates`` as a pandas DataFrame (see the module docstring).

    :raises MLOpsInputError: the log holds no prediction for those days.
    """
    import pandas as pd

    from airflow_mlops.exceptions import MLOpsInputError

    records = read_records(root, dates)
    if not records:
        raise MLOpsInputError(
            f"no predictions were logged under {root!r} for {dates[0]}..{dates[-1]}.",
            fix="check that the model is served and logging predictions, or move the window.",
        )
    frame = pd.DataFrame.from_records([flatten(r) for r in records])
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    return frame


class PredictionLogWriter:
    """Buffers records and flushes them as atomic JSON-lines part files (see the module docstring).

    :param model: registry name of the served model.
    :param flush_rows: flush when this many records are buffered.
    :param flush_seconds: flush at least this often while records are buffered.
    """

    def __init__(self, model: str, flush_rows: int = 2000, flush_seconds: float = 5.0) -> None:
        from airflow_mlops.artifacts import ArtifactStore

        self.model = model
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.store = ArtifactStore()
        self._buffer: list[tuple[str, str]] = []  # (date, JSON line)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def append(self, records: list[dict[str, Any]]) -> None:
        """Buffer ``records`` (made by :func:`make_record`). They are encoded here, by the caller's
        thread, a batch at a time: encoding thousands at flush time would hold the GIL long enough to
        stall requests."""
        lines = [(r["time"][:10], json.dumps(r, default=str) + "\n") for r in records]
        with self._lock:
            self._buffer.extend(lines)
            full = len(self._buffer) >= self.flush_rows
        if full:
            threading.Thread(target=self.flush, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def flush(self) -> list[str]:
        """Write what is buffered; returns the part files written. A batch that cannot be written is
        kept for the next flush."""
        from airflow_mlops.artifacts import staged
        from airflow_mlops.exceptions import MLOpsError

        with self._write_lock:
            with self._lock:
                records, self._buffer = self._buffer, []
            by_date: dict[str, list[tuple[str, str]]] = {}
            for record in records:
                by_date.setdefault(record[0], []).append(record)
            written = []
            for date, rows in sorted(by_date.items()):
                self._seq += 1
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
                target = self.store.path(
                    "predictions",
                    self.model,
                    f"date={date}",
                    f"part-{stamp}-{os.getpid()}-{self._seq:06d}.jsonl",
                )
                try:
                    with staged(target) as local:
                        local.write_text("".join(line for _, line in rows))
                except MLOpsError:
                    log.exception(
                        "Could not write %d predictions to %s; keeping them for the next flush",
                        len(rows),
                        target,
                    )
                    with self._lock:
                        self._buffer[:0] = rows
                    continue
                written.append(str(target))
            return written

    def close(self) -> None:
        self._stop.set()
        self.flush()
