"""System test: drift found by ``flights_monitor`` starts ``flights_train`` through a real scheduler.

Real Airflow components run as subprocesses on the session's ``AIRFLOW_HOME`` and SQLite database with
the LocalExecutor (Airflow 3.3 supports that pair; it is what ``airflow standalone`` runs): an
``api-server`` (the Execution API the tasks talk to, and the REST API the test drives), a ``scheduler``,
a ``dag-processor`` parsing the real ``dags/`` folder, and a ``triggerer``. Nothing is run directly: the
test triggers monitor runs and posts Asset events over the REST API, then watches what the scheduler
does by itself. The components are started and stopped by :mod:`airflow_procs`.

Data: the reference is a parquet of the January-March 2013 flights joined with their origin's weather,
given to the monitor through its ``reference_uri`` param (no model is in production here); the offline
store holds the validated flights of a spring week (1-7 May) and a July week (15-21 July) and the
weather table, in the layout the ingest and features DAGs write.

``flights_train`` is the real DAG. Only its ``retraining_gate`` matters here: the tasks after it find
no labelled flights in this store and fail within seconds, which keeps the test short. That the rest of
the DAG trains, registers and deploys is covered by ``tests/integration/test_flights_train_dag.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from airflow_procs import AirflowComponents, airflow_components
from mlops_testing import ROOT

from airflow_mlops.lifecycle.spec import load_spec

MODEL = "flight_delay"
DRIFT_ASSET = "flight_delay_drift"
SPRING = ("2013-05-01", "2013-05-07")
JULY = ("2013-07-15", "2013-07-21")
#: the retraining gate's cooldown in the reference lifecycle (the train DAG is built from this spec)
COOLDOWN_DAYS = load_spec(ROOT / "dags" / "flights.yaml").monitoring.cooldown_days


def _write_data(state: Path) -> str:
    """Offline partitions of the spring and July weeks, the weather table, and the Jan-Mar reference."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.demo.data import read_table

    flights = read_table("flights")
    weather = read_table("weather")[["origin", "time_hour", "temp", "dewp"]]
    day = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    offline = state / "offline"
    for start, end in (SPRING, JULY):
        for when in pd.date_range(start, end).strftime("%Y-%m-%d"):
            part = offline / "flights" / f"date={when}" / "part-0.parquet"
            part.parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(flights[day == when], preserve_index=False), part)
    (offline / "weather").mkdir(parents=True)
    weather.to_parquet(offline / "weather" / "part-0.parquet", index=False)
    reference = state / "reference" / "flights-2013-q1.parquet"
    reference.parent.mkdir(parents=True)
    flights[day < "2013-04-01"].merge(weather, on=["origin", "time_hour"], how="left").to_parquet(
        reference, index=False
    )
    return f"file://{reference}"


@dataclass
class Airflow(AirflowComponents):
    """The running components, with the monitor's and the train DAG's objects."""

    state: Path
    reference_uri: str

    def trigger_monitor(self, run_id: str, last_day: str) -> dict:
        """A monitor run whose data interval is the day ``last_day`` (so its window ends there)."""
        return self.client.trigger(
            "flights_monitor",
            run_id=run_id,
            logical_date=last_day,
            data_interval=(last_day, str(date.fromisoformat(last_day) + timedelta(days=1))),
            conf={"reference_uri": self.reference_uri},
        )

    def drift_asset_id(self) -> int:
        asset_id = self.client.asset_id(DRIFT_ASSET)
        assert asset_id is not None, f"no Asset {DRIFT_ASSET!r}"
        return asset_id

    def drift_events(self) -> list[dict]:
        return [
            {k: e[k] for k in ("id", "extra", "source_dag_id", "source_run_id")}
            for e in self.asset_events(DRIFT_ASSET)
        ]

    def train_runs(self) -> dict[str, list[dict]]:
        """Asset-triggered ``flights_train`` runs with the Asset events that triggered each."""
        return self.asset_triggered_runs("flights_train")

    def gate_state(self, run_id: str) -> str | None:
        state = self.task_states("flights_train", run_id).get("retraining_gate")
        return state if state in ("success", "skipped", "failed", "upstream_failed") else None


@pytest.fixture(scope="module")
def airflow(airflow_pg_db, tmp_path_factory) -> Iterator[Airflow]:
    state = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "drift-system"
    logs = tmp_path_factory.mktemp("airflow-components")
    reference_uri = _write_data(state)
    with airflow_components(
        airflow_pg_db,
        logs,
        ("flights_monitor", "flights_train"),
        preload=True,  # the monitor's Evidently and the trainings' libraries, imported once
        AIRFLOW__MLOPS__STATE_DIR=str(state),
        AIRFLOW__MLOPS__OFFLINE_ROOT=f"file://{state}/offline",
        AIRFLOW__MLOPS__ARTIFACT_ROOT=f"file://{state}/artifacts",
    ) as components:
        yield Airflow(stack=components.stack, db=components.db, state=state, reference_uri=reference_uri)


def test_spring_is_calm_and_july_drift_makes_the_scheduler_start_retraining(airflow: Airflow) -> None:
    # A calm spring week: the run succeeds, reports no drift, emits no event, starts no retraining.
    airflow.trigger_monitor("spring", SPRING[1])
    assert airflow.finished_run("flights_monitor", "spring")["state"] == "success", airflow.log_tails()
    calm = airflow.xcom("flights_monitor", "spring", "drift")
    assert calm["drift_detected"] is False
    assert (calm["window"]["start"], calm["window"]["end"]) == SPRING
    assert calm["reference"]["source_uri"] == airflow.reference_uri
    assert airflow.drift_events() == []

    # A July week: drift, the report, and one event on the drift Asset carrying the figures.
    airflow.trigger_monitor("july", JULY[1])
    assert airflow.finished_run("flights_monitor", "july")["state"] == "success", airflow.log_tails()
    drifted = airflow.xcom("flights_monitor", "july", "drift")
    assert drifted["drift_detected"] is True
    assert (drifted["window"]["start"], drifted["window"]["end"]) == JULY
    assert {"temp", "dewp"} <= set(drifted["drifted_columns"])
    temp = load_spec(ROOT / "dags" / "flights.yaml").monitoring.columns["temp"]  # type: ignore[index]
    assert drifted["drifted_columns"]["temp"] >= temp["threshold"]
    assert Path(drifted["report_uri"].removeprefix("file://")).stat().st_size > 10_000
    [event] = airflow.drift_events()
    assert (event["source_dag_id"], event["source_run_id"]) == ("flights_monitor", "july")
    assert event["extra"]["event_id"] == drifted["event_id"]
    # the event links to the model's page, and Airflow's Assets page names the task producing the Asset
    assert event["extra"]["model_page"] == f"{airflow.stack.url}/plugin/mlops-models/{MODEL}"
    asset = airflow.get(f"/assets/{airflow.drift_asset_id()}")
    assert [(t["dag_id"], t["task_id"]) for t in asset["producing_tasks"]] == [("flights_monitor", "drift")]

    # The scheduler itself starts flights_train on that event; its gate lets the first retraining through
    # and records the event that caused it.
    runs = airflow.wait("the scheduler to start flights_train", airflow.train_runs, timeout=120)
    [(run_id, triggering)] = runs.items()
    [cause] = triggering
    assert cause["id"] == event["id"]
    assert cause["extra"]["drift_share"] == drifted["drift_share"]
    assert cause["extra"]["drifted_columns"] == drifted["drifted_columns"]
    assert cause["extra"]["data_time"] == JULY[1] and cause["extra"]["model"] == MODEL
    assert airflow.wait("the retraining gate", lambda: airflow.gate_state(run_id), timeout=120) == "success"
    decision = airflow.xcom("flights_train", run_id, "retraining_gate")
    assert decision["proceed"] is True
    assert decision["cause"]["event_id"] == drifted["event_id"]
    # the calm spring run never started one: the only retraining run is the July one
    assert list(airflow.train_runs()) == [run_id]


def test_a_failed_retraining_holds_nothing_back_and_a_finished_one_holds_the_burst(airflow: Airflow) -> None:
    # Ten drift events within three days of data time, a week after the July event's cooldown would end:
    # eight distinct ones and two redeliveries (watchers are at-least-once), as a feed that keeps
    # drifting would send them. Each is posted once the scheduler has started a run for the one
    # before, so every event gets a run of its own. (Posted faster, events can wait in Airflow 3.3.2
    # until a later event starts a run: the queue row of an Asset is deleted when a run is created, also
    # for events committed meanwhile.)
    #
    # The training tasks of this store fail within seconds (no labelled flights). Only a training that
    # finished counts for the cooldown: the first burst event's run fails, so the second event retrains
    # again. That run is then marked successful through the REST API, which is all the gate sees of a
    # finished training (that the train DAG trains for real is tests/integration/test_flights_train_dag.py),
    # and the gate holds the eight events after it back.
    asset_id = airflow.drift_asset_id()
    before = {e["id"] for e in airflow.drift_events()}
    known_runs = set(airflow.train_runs())
    ids = [f"burst-{i}" for i in range(8)] + ["burst-1", "burst-5"]
    first = date.fromisoformat(JULY[1]) + timedelta(days=COOLDOWN_DAYS + 7)
    days = [str(first + timedelta(days=d)) for d in (0, 0, 1, 1, 2)] * 2
    posted: list[int] = []

    def new_runs() -> dict[str, list[dict]]:
        return {r: e for r, e in airflow.train_runs().items() if r not in known_runs}

    def post(event_id: str, day: str) -> str:
        """Post the event; the run the scheduler started for it."""
        extra = {"event_id": event_id, "model": MODEL, "data_time": day, "drift_detected": True}
        posted.append(airflow.post("/assets/events", {"asset_id": asset_id, "extra": extra})["id"])

        def its_run() -> str | None:
            return next(
                (r for r, events in new_runs().items() if posted[-1] in {e["id"] for e in events}), None
            )

        return airflow.wait(f"a flights_train run for event {event_id}", its_run, timeout=90)

    def ended(run_id: str) -> dict:
        return airflow.finished_run("flights_train", run_id, timeout=180)

    # burst-0 retrains; its training fails
    failed_run = post(ids[0], days[0])
    assert ended(failed_run)["state"] == "failed"
    assert airflow.gate_state(failed_run) == "success"
    # burst-1 retrains again: the failed training did not start a cooldown
    trained = post(ids[1], days[1])
    assert ended(trained)["state"] == "failed"
    assert airflow.gate_state(trained) == "success", airflow.xcom("flights_train", trained, "retraining_gate")
    assert (
        airflow.client.request("PATCH", f"/dags/flights_train/dagRuns/{trained}", json={"state": "success"})[
            "state"
        ]
        == "success"
    )
    # the other eight are held back by the finished one
    for event_id, day in zip(ids[2:], days[2:], strict=True):
        post(event_id, day)
    assert len(set(posted)) == 10 and not before & set(posted)

    def all_ended() -> dict[str, list[dict]] | None:
        runs = new_runs()
        consumed = {e["id"] for events in runs.values() for e in events}
        states = [airflow.run("flights_train", r)["state"] for r in runs]
        return runs if set(posted) <= consumed and set(states) <= {"success", "failed"} else None

    runs = airflow.wait(
        "flights_train runs for all ten events",
        all_ended,
        timeout=180,
        detail=lambda: {"posted": posted, "runs": airflow.train_runs(), "events": airflow.drift_events()},
    )
    gates = {run_id: airflow.gate_state(run_id) for run_id in runs}
    assert len(runs) == 10 and sorted(e["id"] for events in runs.values() for e in events) == posted
    from airflow_mlops.hooks.state import MLOpsStateHook

    record = MLOpsStateHook(default_dir=airflow.state).get("retraining", MODEL)  # the gate's state
    assert sorted(gates.values()) == ["skipped"] * 8 + ["success"] * 2, (gates, record)
    assert {r for r, s in gates.items() if s == "success"} == {failed_run, trained}

    decision = airflow.xcom("flights_train", trained, "retraining_gate")
    assert decision["cause"]["event_id"] == "burst-1"
    assert [e["id"] for e in runs[trained]] == posted[1:2]
    for run_id, state in gates.items():
        if state == "skipped":  # the rest changed nothing downstream
            assert {
                s for t, s in airflow.task_states("flights_train", run_id).items() if t != "retraining_gate"
            } <= {"skipped"}

    burst = {r["run_id"]: r for r in record["retrainings"] if str(r["event_id"]).startswith("burst-")}
    assert set(burst) == {failed_run, trained}
    assert (burst[failed_run]["status"], burst[trained]["status"]) == ("failed", "finished")
    assert set(ids) <= set(record["seen"])
    reasons = [entry["reason"] for entry in record["suppressed"] if entry["run_id"] in runs]
    assert len(reasons) == 8
    # the redeliveries of burst-1 and burst-5 were seen before; so is an event that arrived before the gate
    # of the run before it decided (that gate reads the events no run was given yet, apache/airflow#56050)
    seen_before = sum("were seen before" in r for r in reasons)
    assert seen_before >= 2 and seen_before + sum("inside the cooldown" in r for r in reasons) == 8, reasons
