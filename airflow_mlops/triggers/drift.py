"""Event-driven drift monitoring: a ``BaseEventTrigger`` for ``AssetWatcher``.

:class:`DriftEventTrigger` polls either a metric JSON (e.g. the ``drift_summary.json`` a monitor
writes, or any external monitor's output) or the prediction log the model service writes (its one
schema is :mod:`airflow_mlops.ml.prediction_log`; each record is flattened to its request fields,
features, ``prediction``, ``version`` and ``time``) and fires when drift crosses the threshold. For the
prediction log it scores each column's population stability index (PSI) against cached reference
statistics (``stats.json``: quantile bins and category shares): those of
:func:`airflow_mlops.ml.drift.prepare_reference` for the request fields and features, or those of
:func:`airflow_mlops.ml.drift.prediction_reference` for the ``prediction`` column (the production
model's predictions on its holdout). No reference rows and no Evidently are needed in the triggerer. All
file reads run in a worker thread (``asyncio.to_thread``).

One event per finding. In metric mode a finding is new metric content (its ``event_id``). In
prediction-log mode a finding is drift in a window of part files; after firing, the trigger scores only
part files newer than the last finding's window end (``window_end``, ``<day>/<part file>``), so drift
that lasts gives one event, and the next event needs a whole new window of predictions that drifts: new
data, never a window that overlaps the last one. The last finding (``event_id`` and ``window_end``) is
kept in memory and in the watched Asset's state store (Airflow 3.3's triggerer gives a watcher's trigger
one), so a restarted triggerer neither fires the same finding again nor rescores its window. The state
store, not the trigger's kwargs: a watcher's kwargs come from the DAG file and cannot be updated by the
running trigger. Without a state store (outside a triggerer, or a trigger watching several Assets) a
restart may fire the last finding once more. Watchers are still at-least-once (a crash between the event
and the state write repeats it), and the retraining gate (:mod:`airflow_mlops.ml.retraining`) drops
repeated ids.

Airflow stores a watcher's event as an Asset event with ``extra`` =
``{"from_trigger": True, "payload": <the event payload>}``; every event schedules the DAGs on that Asset.
A source that cannot be read is therefore logged and polled again, never reported as an event (an
"error" event would start a retraining).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

_EPS = 1e-4
#: key of the last finding (``{"event_id", "window_end"}``) in the watched Asset's state store
STATE_KEY = "drift_trigger_last_event_id"


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    total = 0.0
    for r, c in zip(reference, current, strict=True):
        r, c = max(r, _EPS), max(c, _EPS)
        total += (c - r) * math.log(c / r)
    return total


def column_psi(stats: Mapping[str, Any], values: Sequence[Any]) -> float | None:
    """PSI of ``values`` against one column of the reference statistics (None: no usable values)."""
    if stats["kind"] == "numerical":
        numbers = [
            float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and v == v
        ]
        edges = stats["edges"]
        if not numbers or len(edges) < 2:
            return None
        counts = [0] * (len(edges) - 1)
        for v in numbers:
            v = min(max(v, edges[0]), edges[-1])
            lo, hi = 0, len(edges) - 2  # bin i holds [edges[i], edges[i+1]), the last one closed
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if v >= edges[mid]:
                    lo = mid
                else:
                    hi = mid - 1
            counts[lo] += 1
        return psi(stats["shares"], [c / len(numbers) for c in counts])
    cats = [str(v) for v in values if v is not None]
    if not cats:
        return None
    keys = sorted(set(stats["shares"]) | set(cats))
    current = {k: 0 for k in keys}
    for v in cats:
        current[v] += 1
    return psi([stats["shares"].get(k, 0.0) for k in keys], [current[k] / len(cats) for k in keys])


class DriftEventTrigger(BaseEventTrigger):
    """Fire when drift crosses the threshold in a metric file or in the prediction log.

    With ``reference_stats_uri`` unset, ``source_uri`` is a JSON file and the trigger fires when
    ``metric_key`` in it reaches ``threshold`` (for ``drift_share``, or a boolean ``drift_detected``).
    With ``reference_stats_uri`` set, ``source_uri`` is a prediction-log root; the newest
    ``window_files`` part files are scored column by column (PSI); the trigger fires when the share of
    columns with PSI >= ``threshold`` reaches ``drift_share`` and at least ``min_rows`` rows were read.
    With ``model_version`` set only the predictions of that version are scored.

    Event: ``{"status": "drift", "event_id", "data_time", "drift_share", "drifted_columns", "source_uri"}``
    (plus ``metric`` in metric mode; ``rows``, ``window_start`` and ``window_end`` in log mode). One event
    per finding: after firing the trigger keeps polling and fires again only for new metric content
    (metric mode) or for drift in a window of part files all newer than the last finding's
    ``window_end`` (log mode); the last finding survives a triggerer restart in the watched Asset's state
    store. An unreadable source is logged and polled again; it never fires.

    :param source_uri: metric JSON or prediction-log root (``file://``, ``s3://``, ``gs://``).
    :param reference_stats_uri: ``stats.json`` of the cached drift reference (prediction-log mode).
    :param columns: columns to score; default every column of the reference statistics.
    :param threshold: metric value (metric mode) or per-column PSI (log mode) that counts as drift.
    :param drift_share: share of drifted columns that fires (log mode).
    :param metric_key: key of the metric in the JSON (metric mode).
    :param window_files: newest log part files scored (log mode).
    :param min_rows: fewest log rows to score (log mode).
    :param model_version: score only the records of this registered version (log mode; default all).
    :param poll_interval: seconds between two checks.
    :param conn_id: Airflow connection of a remote store.
    """

    def __init__(
        self,
        source_uri: str,
        reference_stats_uri: str | None = None,
        columns: list[str] | None = None,
        threshold: float = 0.2,
        drift_share: float = 0.5,
        metric_key: str = "drift_share",
        window_files: int = 7,
        min_rows: int = 100,
        poll_interval: float = 60.0,
        conn_id: str | None = None,
        model_version: str | None = None,
    ) -> None:
        super().__init__()
        self.source_uri = source_uri
        self.reference_stats_uri = reference_stats_uri
        self.columns = columns
        self.threshold = threshold
        self.drift_share = drift_share
        self.metric_key = metric_key
        self.window_files = window_files
        self.min_rows = min_rows
        self.poll_interval = poll_interval
        self.conn_id = conn_id
        self.model_version = model_version

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "source_uri": self.source_uri,
                "reference_stats_uri": self.reference_stats_uri,
                "columns": self.columns,
                "threshold": self.threshold,
                "drift_share": self.drift_share,
                "metric_key": self.metric_key,
                "window_files": self.window_files,
                "min_rows": self.min_rows,
                "poll_interval": self.poll_interval,
                "conn_id": self.conn_id,
                "model_version": self.model_version,
            },
        )

    def _path(self, uri: str) -> Any:
        from airflow_mlops.artifacts import as_path

        return as_path(uri, conn_id=self.conn_id)

    def check_metric(self) -> dict[str, Any] | None:
        """Metric mode, blocking: the event payload when the metric crosses the threshold, else None."""
        path = self._path(self.source_uri)
        if not path.exists():
            return None
        raw = path.read_bytes()
        body = json.loads(raw)
        value = body.get(self.metric_key)
        crossed = value is True or (
            isinstance(value, int | float) and not isinstance(value, bool) and value >= self.threshold
        )
        if not crossed:
            return None
        return {
            "status": "drift",
            "event_id": body.get("event_id") or hashlib.sha256(raw).hexdigest()[:24],
            "data_time": body.get("data_time") or (body.get("window") or {}).get("end"),
            "drift_share": body.get("drift_share"),
            "drifted_columns": body.get("drifted_columns") or {},
            "metric": {self.metric_key: value},
            "source_uri": self.source_uri,
        }

    def check_log(self, after: str | None = None) -> dict[str, Any] | None:
        """Prediction-log mode, blocking: the event payload when drift is found, else None.

        :param after: the last finding's ``window_end``: only part files after it are scored, and only
            once ``window_files`` of them exist.
        """
        from airflow_mlops.ml.prediction_log import flatten, is_shadow

        stats = json.loads(self._path(self.reference_stats_uri).read_bytes())["columns"]
        root = self._path(self.source_uri)
        if not root.exists():
            return None
        days = sorted((p for p in root.iterdir() if p.name.startswith("date=")), key=lambda p: p.name)
        parts = [
            (d.name[5:], f)
            for d in days
            for f in sorted(d.iterdir(), key=lambda p: p.name)
            if f.name.endswith(".jsonl")
        ]
        if after:  # after a finding, only a whole window of newer part files makes a new one
            parts = [(day, f) for day, f in parts if f"{day}/{f.name}" > after]
            if len(parts) < int(self.window_files):
                return None
        parts = parts[-int(self.window_files) :]
        if not parts:
            return None
        rows: list[dict[str, Any]] = []
        identity = hashlib.sha256()
        for day, part in parts:
            text = part.read_text()
            identity.update(f"{day}/{part.name}:{len(text)};".encode())
            records = (json.loads(line) for line in text.splitlines() if line.strip())
            rows.extend(
                flatten(r)
                for r in records
                # a shadow server's answers were never served: they are not the production model's traffic
                if not is_shadow(r)
                and (self.model_version is None or str(r.get("version")) == str(self.model_version))
            )
        if len(rows) < self.min_rows:
            return None
        scores = {}
        for column in self.columns or list(stats):
            if column in stats:
                score = column_psi(stats[column], [r.get(column) for r in rows])
                if score is not None:
                    scores[column] = score
        drifted = {c: s for c, s in scores.items() if s >= self.threshold}
        share = len(drifted) / len(scores) if scores else 0.0
        if not scores or share < self.drift_share:
            self.log.debug("Prediction log drift share %.2f below %.2f", share, self.drift_share)
            return None
        times = [str(r["time"]) for r in rows if r.get("time")]
        return {
            "status": "drift",
            "event_id": "log-" + identity.hexdigest()[:24],
            "data_time": max(times)[:10] if times else parts[-1][0],
            "drift_share": share,
            "drifted_columns": drifted,
            "rows": len(rows),
            "window_start": f"{parts[0][0]}/{parts[0][1].name}",
            "window_end": f"{parts[-1][0]}/{parts[-1][1].name}",
            "source_uri": self.source_uri,
        }

    async def _last_fired(self) -> dict[str, Any]:
        """The last finding, ``{"event_id", "window_end"}``, from the watched Asset's state store (empty
        outside a triggerer; a bare string is an ``event_id`` stored by an earlier version)."""
        store = getattr(self, "asset_state_store", None)
        if store is None:
            return {}
        try:
            value = await store.aget(STATE_KEY)
        except Exception as err:  # e.g. one trigger watching several Assets: keep the finding in memory only
            self.log.warning(
                "Asset state store unavailable (%s); findings are only remembered in memory", err
            )
            return {}
        if isinstance(value, str):
            return {"event_id": value}
        return dict(value) if isinstance(value, Mapping) else {}

    async def _remember(self, finding: dict[str, Any]) -> None:
        store = getattr(self, "asset_state_store", None)
        if store is None:
            return
        try:
            await store.aset(STATE_KEY, finding)
        except Exception as err:
            self.log.warning("Could not record finding %s in the Asset state store: %s", finding, err)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        log_mode = bool(self.reference_stats_uri)
        last = await self._last_fired()
        while True:
            try:
                if log_mode:
                    payload = await asyncio.to_thread(self.check_log, last.get("window_end"))
                else:
                    payload = await asyncio.to_thread(self.check_metric)
            except Exception as err:  # a transient read error must not become an Asset event
                self.log.error(
                    "Cannot read drift source %s (polling again in %.0f s): %s: %s",
                    self.source_uri,
                    self.poll_interval,
                    type(err).__name__,
                    err,
                )
                payload = None
            if payload is not None and payload["event_id"] != last.get("event_id"):
                self.log.info(
                    "Drift found in %s (event %s): %s",
                    self.source_uri,
                    payload["event_id"],
                    payload["drifted_columns"],
                )
                yield TriggerEvent(payload)
                last = {"event_id": payload["event_id"]}
                if payload.get("window_end"):
                    last["window_end"] = payload["window_end"]
                await self._remember(last)
            elif payload is not None:
                self.log.debug("Drift event %s was already fired", last.get("event_id"))
                if payload.get("window_end") and not last.get("window_end"):
                    last = {**last, "window_end": payload["window_end"]}  # state of an earlier version
                    await self._remember(last)
            await asyncio.sleep(self.poll_interval)
