"""The retraining gate's cooldown counts only trainings that finished, and refuses data times in the future."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow_mlops.ml.retraining import RetrainingState, TriggerEventInfo, decide, gate

COOLDOWN = timedelta(days=14)
DAG = "flights_train"


def drift(day: str, event_id: str | None = None) -> TriggerEventInfo:
    return TriggerEventInfo(
        event_id=event_id or f"drift-{day}",
        asset="flight_delay_drift",
        data_time=datetime.fromisoformat(day).replace(tzinfo=UTC),
        extra={"data_time": day},
    )


class Runs:
    """The DAG runs' states as Airflow reports them to the gate (``RuntimeTaskInstance.get_dagrun_state``)."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], str] = {}
        self.asked: list[str] = []

    def __call__(self, dag_id: str, run_id: str) -> str:
        self.asked.append(run_id)
        return self.states[(dag_id, run_id)]


def run_gate(state: RetrainingState, runs: Runs, run_id: str, *events: TriggerEventInfo):
    runs.states[(DAG, run_id)] = "running"
    return gate(state, list(events), cooldown=COOLDOWN, run_id=run_id, dag_id=DAG, run_state=runs)


def test_a_failed_training_does_not_hold_the_cooldown(tmp_path: Path) -> None:
    state, runs = RetrainingState(tmp_path, "flight_delay"), Runs()
    assert run_gate(state, runs, "r1", drift("2013-07-10")).proceed
    runs.states[(DAG, "r1")] = "failed"  # Ray Tune failed: nothing was trained
    # the next drift event, inside the 14 days after July 10, retrains: the July 10 retraining never finished
    second = run_gate(state, runs, "r2", drift("2013-07-12"))
    assert second.proceed, second.reason
    assert runs.asked == ["r1"]
    runs.states[(DAG, "r2")] = "success"
    third = run_gate(state, runs, "r3", drift("2013-07-14"))
    assert not third.proceed and "last retraining at data time 2013-07-12" in third.reason
    # past the cooldown of the training that finished
    assert run_gate(state, runs, "r4", drift("2013-07-26")).proceed
    statuses = {r["run_id"]: r["status"] for r in state.read()["retrainings"]}
    assert statuses == {"r1": "failed", "r2": "finished", "r4": "started"}


def test_a_retraining_whose_run_state_is_unknown_keeps_counting(tmp_path: Path) -> None:
    state, runs = RetrainingState(tmp_path, "flight_delay"), Runs()
    assert run_gate(state, runs, "r1", drift("2013-07-10")).proceed
    del runs.states[(DAG, "r1")]  # e.g. the run was deleted: the lookup raises
    assert not run_gate(state, runs, "r2", drift("2013-07-12")).proceed
    runs.states[(DAG, "r1")] = "running"  # still in progress: never two retrainings at once
    assert not run_gate(state, runs, "r3", drift("2013-07-13")).proceed


def test_a_far_future_data_time_is_refused_and_never_stored(tmp_path: Path) -> None:
    state, runs = RetrainingState(tmp_path, "flight_delay"), Runs()
    refused = run_gate(state, runs, "r1", drift("9999-01-01", "from-a-broken-clock"))
    assert not refused.proceed and "data time in the future" in refused.reason
    assert [e["event_id"] for e in refused.refused] == ["from-a-broken-clock"]
    stored = state.read()
    assert stored["retrainings"] == [] and "from-a-broken-clock" in stored["seen"]
    # the next honest drift event retrains (before: silenced until the year 9999)
    honest = run_gate(state, runs, "r2", drift("2013-07-10"))
    assert honest.proceed and honest.cause["event_id"] == "drift-2013-07-10"
    # a day of skew is tolerated (dates of a time zone ahead of UTC)
    tomorrow = (datetime.now(UTC) + timedelta(hours=20)).date().isoformat()
    runs.states[(DAG, "r2")] = "success"
    assert run_gate(state, runs, "r3", drift(tomorrow)).proceed


def test_a_future_time_recorded_before_the_fix_no_longer_silences_retraining(tmp_path: Path) -> None:
    poisoned = {
        "seen": ["old"],
        "retrainings": [{"data_time": "9999-01-01T00:00:00+00:00", "event_id": "old", "run_id": "r0"}],
    }
    decision = decide([drift("2013-07-10")], poisoned, cooldown=COOLDOWN)
    assert decision.proceed and decision.last_retraining is None


def test_a_run_by_hand_with_a_future_data_time_counts_from_now() -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    decision = decide([], {}, cooldown=COOLDOWN, manual_data_time=datetime(2100, 1, 1, tzinfo=UTC), now=now)
    assert decision.proceed and decision.cause["data_time"] == now.isoformat()
    within = now + timedelta(hours=23)  # inside the one day of skew allowed
    assert decide([], {}, cooldown=COOLDOWN, manual_data_time=within, now=now).cause["data_time"] == (
        within.isoformat()
    )
