"""Guard rails of automatic retraining: dedupe triggering events, one retraining per cooldown window.

Airflow's Asset watchers are at-least-once, and a drifting feed produces a drift event every day; each
can start a run of the train DAG. The gate at the top of that DAG asks :func:`decide` whether the run
should train, given the run's triggering Asset events and the state of past retrainings:

- an event already seen (same ``event_id`` in its ``extra``, else same asset and content) is a duplicate;
  for an event an ``AssetWatcher`` created (``extra = {"from_trigger": True, "payload": ...}``, e.g.
  from :class:`~airflow_mlops.triggers.drift.DriftEventTrigger`) the figures are read from ``payload``;
- a new event whose data time (``extra["data_time"]``, else the event timestamp) falls less than
  ``cooldown`` after the last retraining's data time is inside the cooldown: no training;
- otherwise the run trains, and the event that caused it is recorded.

The state is one document per model in the shared state database (:class:`RetrainingState`), read and
written in one transaction, so concurrent gate runs, on any worker host, see each other's decisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_mlops.hooks.state import MLOpsStateHook

#: how many seen event ids the state keeps (oldest dropped first)
MAX_SEEN = 5000


@dataclass(frozen=True)
class TriggerEventInfo:
    """What the gate needs of one triggering Asset event."""

    event_id: str
    asset: str
    data_time: datetime
    extra: dict[str, Any]
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data_time": self.data_time.isoformat()}


@dataclass
class Decision:
    """Whether to retrain, why, and the event that caused it."""

    proceed: bool
    reason: str
    cause: dict[str, Any] | None = None
    duplicates: int = 0
    suppressed: int = 0
    last_retraining: dict[str, Any] | None = None
    new_events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    try:
        parsed = datetime.fromisoformat(text if len(text) > 10 else text + "T00:00:00")
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def event_figures(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The drift figures of an Asset event's ``extra``: as the drift operator emits them, or, for an
    event an ``AssetWatcher``'s trigger created, its trigger ``payload`` (Airflow 3 stores those as
    ``{"from_trigger": True, "payload": {...}}``). Use it wherever a DAG reads ``data_time`` or
    ``event_id`` of a triggering event."""
    extra = dict(extra or {})
    payload = extra.get("payload")
    if extra.get("from_trigger") and isinstance(payload, Mapping):
        return dict(payload)
    return extra


def event_info(asset: str, event: Any) -> TriggerEventInfo:
    """A triggering event (Airflow's ``AssetEventDagRunReference`` or a dict with the same fields)."""
    get = event.get if isinstance(event, Mapping) else lambda k, d=None: getattr(event, k, d)
    extra = event_figures(get("extra"))
    data_time = _parse_time(extra.get("data_time")) or _parse_time(get("timestamp")) or datetime.now(UTC)
    event_id = extra.get("event_id")
    if not event_id:
        payload = json.dumps({"asset": asset, "extra": extra}, sort_keys=True, default=str)
        event_id = "content-" + hashlib.sha256(payload.encode()).hexdigest()[:24]
    source = (
        "/".join(str(get(k)) for k in ("source_dag_id", "source_run_id", "source_task_id") if get(k)) or None
    )
    return TriggerEventInfo(
        event_id=str(event_id), asset=asset, data_time=data_time, extra=extra, source=source
    )


def events_from_context(triggering: Any) -> list[TriggerEventInfo]:
    """Every triggering event of a run (``context["triggering_asset_events"]``), once each."""
    out: dict[str, TriggerEventInfo] = {}
    for key in triggering or {}:
        name = getattr(key, "name", None) or str(key)
        for event in triggering[key]:
            info = event_info(name, event)
            out.setdefault(info.event_id, info)
    return list(out.values())


def decide(
    events: Iterable[TriggerEventInfo],
    state: Mapping[str, Any],
    *,
    cooldown: timedelta,
    manual_data_time: datetime | None = None,
) -> Decision:
    """Pure decision of the gate (no I/O); see the module docstring.

    :param events: the run's triggering events; none means a manual or scheduled run, which trains
        (and starts a new cooldown window at ``manual_data_time``).
    :param state: ``{"seen": [event ids], "retrainings": [{"data_time", "event_id", ...}]}``.
    """
    seen = set(state.get("seen") or [])
    retrainings = list(state.get("retrainings") or [])
    last = max(retrainings, key=lambda r: r["data_time"]) if retrainings else None
    events = sorted(events, key=lambda e: e.data_time)
    if not events:
        when = manual_data_time or datetime.now(UTC)
        return Decision(
            True,
            "started by hand or on schedule (no triggering Asset event)",
            cause={"event_id": None, "data_time": when.isoformat()},
            last_retraining=last,
        )
    new = [e for e in events if e.event_id not in seen]
    duplicates = len(events) - len(new)
    if not new:
        return Decision(
            False,
            f"all {duplicates} triggering event(s) were seen before (duplicate delivery)",
            duplicates=duplicates,
            last_retraining=last,
        )
    cause = new[-1]
    if last is not None:
        last_time = _parse_time(last["data_time"])
        if last_time is not None and cause.data_time - last_time < cooldown:
            return Decision(
                False,
                f"inside the cooldown: last retraining at data time {last_time.date()} "
                f"(event {last.get('event_id')}), next possible from {(last_time + cooldown).date()}",
                duplicates=duplicates,
                suppressed=len(new),
                last_retraining=last,
                new_events=[e.to_dict() for e in new],
            )
    return Decision(
        True,
        f"{len(new)} new drift event(s); caused by {cause.event_id} at data time {cause.data_time.date()}",
        cause=cause.to_dict(),
        duplicates=duplicates,
        last_retraining=last,
        new_events=[e.to_dict() for e in new],
    )


class RetrainingState:
    """The retraining state of one model: a document of the shared state database (namespace
    ``retraining``, key the model name; see :mod:`airflow_mlops.hooks.state`).

    :param folder: the gate's state folder (``<state_dir>/retraining``): where a former release kept
        ``<model>.json`` (imported once, never written again). A folder other than the default one also
        holds the embedded default's database when no state connection exists, so gates given their own
        folder never share state.
    :param model: model name.
    :param store: the state database; default :class:`~airflow_mlops.hooks.state.MLOpsStateHook`.
    """

    def __init__(self, folder: Path, model: str, store: MLOpsStateHook | None = None) -> None:
        self.folder = Path(folder)
        self.model = model
        self._store = store

    @property
    def store(self) -> MLOpsStateHook:
        if self._store is None:
            from airflow_mlops.config import load_settings
            from airflow_mlops.hooks.state import MLOpsStateHook

            default = load_settings().state_dir / "retraining"
            self._store = MLOpsStateHook(default_dir=None if self.folder == default else self.folder)
        return self._store

    @property
    def path(self) -> Path:
        """The JSON file a former release kept the state in (read once, to import it)."""
        return self.folder / f"{self.model}.json"

    def _empty(self) -> dict[str, Any]:
        return {"model": self.model, "seen": [], "retrainings": []}

    def _legacy(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return json.loads(self.path.read_text())

    def read(self) -> dict[str, Any]:
        return self.store.get("retraining", self.model, legacy=self._legacy) or self._empty()

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write in one transaction of the state database: gates on any host run one after the
        other; written when the block succeeds, left as it was when it raises."""
        with self.store.locked("retraining", self.model, default=self._empty, legacy=self._legacy) as state:
            yield state


def gate(
    state: RetrainingState,
    events: list[TriggerEventInfo],
    *,
    cooldown: timedelta,
    run_id: str,
    manual_data_time: datetime | None = None,
) -> Decision:
    """Decide under the state lock and record the outcome: every new event is marked seen, and a
    retraining that proceeds is appended with the event that caused it."""
    with state.locked() as current:
        for done in current.get("retrainings") or []:
            if done.get("run_id") == run_id:  # a retry of a run that was already let through
                return Decision(
                    True,
                    f"run {run_id} was already let through: {done.get('event_id')}",
                    cause=done.get("cause"),
                )
        decision = decide(events, current, cooldown=cooldown, manual_data_time=manual_data_time)
        current["seen"] = (list(current.get("seen") or []) + [e["event_id"] for e in decision.new_events])[
            -MAX_SEEN:
        ]
        if decision.proceed:
            current.setdefault("retrainings", []).append(
                {
                    "data_time": decision.cause["data_time"],
                    "event_id": decision.cause.get("event_id"),
                    "cause": decision.cause,
                    "run_id": run_id,
                    "decided_at": datetime.now(UTC).isoformat(),
                }
            )
        else:
            current.setdefault("suppressed", []).append(
                {"run_id": run_id, "reason": decision.reason, "at": datetime.now(UTC).isoformat()}
            )
            current["suppressed"] = current["suppressed"][-MAX_SEEN:]
    return decision
