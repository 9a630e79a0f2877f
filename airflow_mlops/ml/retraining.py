"""Guard rails of automatic retraining: dedupe triggering events, one retraining per cooldown window.

Airflow's Asset watchers are at-least-once, and a drifting feed produces a drift event every day; each
can start a run of the train DAG. The gate at the top of that DAG asks :func:`decide` whether the run
should train, given the run's triggering Asset events and the state of past retrainings:

- an event already seen (same ``event_id`` in its ``extra``, else same asset and content) is a duplicate;
  for an event an ``AssetWatcher`` created (``extra = {"from_trigger": True, "payload": ...}``, e.g.
  from :class:`~airflow_mlops.triggers.drift.DriftEventTrigger`) the figures are read from ``payload``;
- a new event whose data time (``extra["data_time"]``, else the event timestamp) falls less than
  ``cooldown`` after the last retraining's data time is inside the cooldown: no training;
- an event whose data time lies in the future (beyond :data:`FUTURE_SKEW`) is refused: stored, it would
  hold the cooldown until that date, i.e. silence retraining for ever; a run by hand with a future data
  time is clamped to now;
- otherwise the run trains, and the event that caused it is recorded with ``status: "started"``.

Only trainings that finished count for the cooldown. A retraining is recorded when its run is let
through; before deciding, the gate asks Airflow for the state of the DAG runs it let through earlier
(``run_state``): a run that ended ``success`` becomes ``finished``, one that ended ``failed`` becomes
``failed`` and no longer counts, so the next drift event retrains. A run still in progress, or whose
state cannot be read, keeps counting (never two retrainings at once; the factory's train DAG has
``max_active_runs=1``, so the previous run has always ended by the time the next gate runs).

The state is one document per model in the shared state database (:class:`RetrainingState`), read and
written in one transaction, so concurrent gate runs, on any worker host, see each other's decisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_mlops.hooks.state import MLOpsStateHook

log = logging.getLogger(__name__)

#: how many seen event ids the state keeps (oldest dropped first)
MAX_SEEN = 5000
#: how far in the future a data time may be (clock skew, and dates in a time zone ahead of UTC)
FUTURE_SKEW = timedelta(days=1)
#: how many of the latest unfinished retrainings the gate asks Airflow about
MAX_RUN_LOOKUPS = 20
#: DAG run states of Airflow that end a run
_RUN_ENDED = {"success": "finished", "failed": "failed"}


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
    refused: list[dict[str, Any]] = field(default_factory=list)

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


def counted(retrainings: Iterable[Mapping[str, Any]], now: datetime | None = None) -> list[dict[str, Any]]:
    """The retrainings the cooldown counts: all but those whose run failed, and those whose data time is
    in the future (a state written before such times were refused; each is logged and ignored)."""
    limit = (now or datetime.now(UTC)) + FUTURE_SKEW
    out = []
    for record in retrainings:
        if record.get("status", "finished") == "failed":
            continue
        when = _parse_time(record.get("data_time"))
        if when is not None and when > limit:
            log.warning(
                "Ignoring the recorded retraining of run %s: its data time %s is in the future and would "
                "hold the cooldown until then",
                record.get("run_id"),
                record.get("data_time"),
            )
            continue
        out.append(dict(record))
    return out


def decide(
    events: Iterable[TriggerEventInfo],
    state: Mapping[str, Any],
    *,
    cooldown: timedelta,
    manual_data_time: datetime | None = None,
    now: datetime | None = None,
) -> Decision:
    """Pure decision of the gate (no I/O); see the module docstring.

    :param events: the run's triggering events; none means a manual or scheduled run, which trains
        (and starts a new cooldown window at ``manual_data_time``, clamped to ``now``).
    :param state: ``{"seen": [event ids], "retrainings": [{"data_time", "event_id", "status", ...}]}``.
    :param now: the wall clock (for tests); data times later than ``now + FUTURE_SKEW`` are refused.
    """
    now = now or datetime.now(UTC)
    seen = set(state.get("seen") or [])
    retrainings = counted(state.get("retrainings") or [], now)
    last = max(retrainings, key=lambda r: _parse_time(r["data_time"]) or now) if retrainings else None
    events = sorted(events, key=lambda e: e.data_time)
    if not events:
        when = manual_data_time or now
        if when > now + FUTURE_SKEW:
            log.warning(
                "The run's data time %s is in the future; the cooldown counts from now (%s) instead",
                when.isoformat(),
                now.isoformat(),
            )
            when = now
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
            f"all {duplicates} triggering event(s) were seen before (a duplicate delivery, or an earlier "
            "run's gate decided them)",
            duplicates=duplicates,
            last_retraining=last,
        )
    refused = [e for e in new if e.data_time > now + FUTURE_SKEW]
    for event in refused:
        log.warning(
            "Refusing drift event %s: its data time %s is in the future (now %s); recorded, it would hold "
            "the cooldown until then. Fix the clock or the data_time of whatever emits it.",
            event.event_id,
            event.data_time.isoformat(),
            now.isoformat(),
        )
    valid = [e for e in new if e not in refused]
    if not valid:
        return Decision(
            False,
            f"{len(refused)} new event(s) refused: data time in the future "
            f"({', '.join(e.data_time.isoformat() for e in refused)})",
            duplicates=duplicates,
            last_retraining=last,
            new_events=[e.to_dict() for e in new],
            refused=[e.to_dict() for e in refused],
        )
    cause = valid[-1]
    if last is not None:
        last_time = _parse_time(last["data_time"])
        if last_time is not None and cause.data_time - last_time < cooldown:
            return Decision(
                False,
                f"inside the cooldown: last retraining at data time {last_time.date()} "
                f"(event {last.get('event_id')}), next possible from {(last_time + cooldown).date()}",
                duplicates=duplicates,
                suppressed=len(valid),
                last_retraining=last,
                new_events=[e.to_dict() for e in new],
                refused=[e.to_dict() for e in refused],
            )
    return Decision(
        True,
        f"{len(valid)} new drift event(s); caused by {cause.event_id} at data time {cause.data_time.date()}",
        cause=cause.to_dict(),
        duplicates=duplicates,
        last_retraining=last,
        new_events=[e.to_dict() for e in new],
        refused=[e.to_dict() for e in refused],
    )


def resolve_runs(
    retrainings: list[dict[str, Any]],
    run_state: Callable[[str, str], str | None],
    *,
    dag_id: str | None,
    current_run_id: str,
) -> None:
    """Mark the retrainings whose DAG run ended: ``finished`` (run ``success``) or ``failed``, in place.

    :param run_state: ``(dag_id, run_id) -> state`` of a DAG run, e.g. the Task SDK's
        ``RuntimeTaskInstance.get_dagrun_state``; an error or an unknown state leaves the record as it is
        (it keeps counting).
    """
    unresolved = [
        r
        for r in retrainings
        if r.get("status") in ("started", "failed") and r.get("run_id") and r.get("run_id") != current_run_id
    ]
    for record in unresolved[-MAX_RUN_LOOKUPS:]:
        run_dag = record.get("dag_id") or dag_id
        if not run_dag:
            continue
        try:
            state = run_state(run_dag, record["run_id"])
        except Exception as err:  # e.g. the run was deleted: keep counting it, as before
            log.warning("Cannot read the state of retraining run %s: %s", record["run_id"], err)
            continue
        status = _RUN_ENDED.get(str(getattr(state, "value", state)))
        if status and status != record.get("status"):
            log.info("Retraining run %s ended: %s", record["run_id"], status)
            record["status"] = status
            record["ended_seen_at"] = datetime.now(UTC).isoformat()


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
    dag_id: str | None = None,
    run_state: Callable[[str, str], str | None] | None = None,
) -> Decision:
    """Decide under the state lock and record the outcome: every new event is marked seen, and a
    retraining that proceeds is appended with the event that caused it (``status: "started"``).

    :param dag_id: the train DAG's id, recorded with the retraining so its run's state can be read.
    :param run_state: reads a DAG run's state (see :func:`resolve_runs`); without it every recorded
        retraining counts, finished or not.
    """
    with state.locked() as current:
        if run_state is not None:
            resolve_runs(current.get("retrainings") or [], run_state, dag_id=dag_id, current_run_id=run_id)
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
                    "dag_id": dag_id,
                    "status": "started",
                    "decided_at": datetime.now(UTC).isoformat(),
                }
            )
        else:
            current.setdefault("suppressed", []).append(
                {"run_id": run_id, "reason": decision.reason, "at": datetime.now(UTC).isoformat()}
            )
            current["suppressed"] = current["suppressed"][-MAX_SEEN:]
    return decision
