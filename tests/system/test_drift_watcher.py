"""System test: ``DriftEventTrigger`` in a real triggerer starts DAGs through ``AssetWatcher``.

The components of :mod:`airflow_procs` (api-server, scheduler, dag-processor, triggerer) run on the
session's database with their own DAGs folder, ``tests/system/drift_dags/`` (``drift_watched.py``): two
DAGs scheduled on Assets whose watchers are ``DriftEventTrigger`` s, one on a monitor's metric file,
one on a serving prediction log. The dag-processor parses them and, once the DAGs are unpaused,
registers the watchers' triggers; the triggerer imports ``airflow_mlops.triggers.drift``, rebuilds each
trigger from its serialized arguments and polls. The test only writes files: calm data fires nothing,
drifted data makes the triggerer fire, Airflow records the Asset event, and the scheduler starts the DAG
by itself, whose retraining gate records the event as the cause (and
:func:`~airflow_mlops.ml.timeline.drift_to_retrained` reads the path back over the REST API). A finding
fires once (the trigger keeps the last fired id in the Asset's state store); a new finding inside the
cooldown starts a run that the gate holds back.

Data (real flights of 2013): the reference statistics are those of the January-March flights joined
with their origin's weather (``column_statistics``, as the drift operator caches them); the calm log is
a sample of those reference flights, the drifted log the flights of 20-21 July with their weather (each
written as one day's log file).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow_procs import AirflowComponents, airflow_components
from mlops_testing import FLIGHTS_SPEC

from airflow_mlops.lifecycle.spec import load_spec
from airflow_mlops.ml.timeline import drift_to_retrained

#: the flights spec's drift columns (dags/flights.yaml), with their kinds, methods and thresholds
FLIGHTS_DRIFT_COLUMNS: dict[str, Any] = dict(load_spec(FLIGHTS_SPEC).monitoring.columns)  # type: ignore[arg-type]

#: the DAGs folder of this test (``drift_watched.py``)
DRIFT_DAGS = Path(__file__).resolve().parent / "drift_dags"
DAGS = ("drift_watch_metric", "drift_watch_log")
ASSETS = {"drift_watch_metric": "drift_metric_watched", "drift_watch_log": "drift_log_watched"}
POLL = 2.0
LOG_COLUMNS = {"request": ["carrier", "origin", "distance", "hour"], "features": ["temp", "dewp"]}


def _flights() -> tuple[Any, Any]:
    """Jan-Mar flights (the reference) and 20-21 July flights, each joined with the origin's weather."""
    import pandas as pd

    from airflow_mlops.demo.data import read_table

    flights = read_table("flights")
    weather = read_table("weather")[["origin", "time_hour", "temp", "dewp"]]
    day = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    flights = flights.assign(day=day).merge(weather, on=["origin", "time_hour"], how="left")
    return flights[flights["day"] < "2013-04-01"], flights[flights["day"].isin(["2013-07-20", "2013-07-21"])]


def _write_log(root: Path, day: str, frame: Any) -> None:
    """One day of the prediction log, written as the model service writes it: records made and flushed
    by :class:`~airflow_mlops.ml.prediction_log.PredictionLogWriter` (one part file, written atomically,
    so the trigger never reads half a file) under ``<root>/predictions/flight_delay``."""
    from airflow_mlops.config import environ_set
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record

    rows = json.loads(frame[[*LOG_COLUMNS["request"], *LOG_COLUMNS["features"]]].to_json(orient="records"))
    with environ_set({"AIRFLOW__MLOPS__ARTIFACT_ROOT": f"file://{root}"}):
        writer = PredictionLogWriter("flight_delay", flush_seconds=3600)
        writer.append(
            [
                make_record(
                    model="flight_delay",
                    version="v1",
                    task="binary",
                    request={c: row[c] for c in LOG_COLUMNS["request"]},
                    features={c: row[c] for c in LOG_COLUMNS["features"]},
                    prediction=0.2,
                    answer={"probability": 0.2, "label": 0},
                    time=f"{day}T12:00:00+00:00",
                )
                for row in rows
            ]
        )
        writer.close()


def _write_metric(root: Path, body: dict) -> None:
    path = root / "monitor" / "drift_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(body))
    os.replace(path.with_suffix(".tmp"), path)


def _summary(event_id: str, day: str, drifted: bool) -> dict:
    """A monitor's drift summary (the fields the metric-mode trigger reads)."""
    columns = {"temp": 5.8, "dewp": 4.9} if drifted else {}
    return {
        "event_id": event_id,
        "drift_detected": drifted,
        "drift_share": len(columns) / 6,
        "drifted_columns": columns,
        "window": {"start": day, "end": day},
        "data_time": day,
    }


@dataclass
class Watched(AirflowComponents):
    """The running components, the folder of the watched sources, and the July flights."""

    root: Path
    july: Any = field(repr=False)

    def watcher_triggers(self) -> dict[str, dict]:
        """The watchers' triggers by Asset name, with the triggerer each is assigned to."""
        rows = self.query(
            "SELECT a.name, w.name AS watcher, t.id, t.classpath, t.triggerer_id FROM asset_watcher w "
            "JOIN asset a ON a.id = w.asset_id JOIN trigger t ON t.id = w.trigger_id"
        )
        return {row["name"]: dict(row) for row in rows}

    def state_store(self, asset: str) -> dict[str, Any]:
        rows = self.query(
            "SELECT s.key, s.value FROM asset_state_store s JOIN asset a ON a.id = s.asset_id WHERE a.name = :name",
            name=asset,
        )
        return {
            row["key"]: json.loads(row["value"]) if isinstance(row["value"], str) else row["value"]
            for row in rows
        }

    def gate(self, dag_id: str, run_id: str) -> dict | None:
        """The gate's decision once its task finished (its XCom when it let the run through)."""
        state = self.task_states(dag_id, run_id).get("retraining_gate")
        if state not in ("success", "skipped", "failed", "upstream_failed"):
            return None
        return {
            "state": state,
            "decision": self.xcom(dag_id, run_id, "retraining_gate") if state == "success" else None,
        }


@pytest.fixture(scope="module")
def watched(airflow_pg_db, tmp_path_factory) -> Iterator[Watched]:
    from airflow_mlops.ml.drift import column_statistics, typed

    reference, july = _flights()
    root = tmp_path_factory.mktemp("drift-watch")
    logs = tmp_path_factory.mktemp("airflow-watch-components")
    stats = column_statistics(typed(reference, FLIGHTS_DRIFT_COLUMNS), FLIGHTS_DRIFT_COLUMNS)
    (root / "reference").mkdir()
    (root / "reference" / "stats.json").write_text(json.dumps({"columns": stats}))
    # Calm sources before anything starts: the monitor found nothing; live traffic looks like training.
    _write_metric(root, _summary("calm-2013-07-14", "2013-07-14", drifted=False))
    calm = reference.sample(1200, random_state=7)
    _write_log(root, "2013-07-14", calm)
    with airflow_components(
        airflow_pg_db,
        logs,
        DAGS,
        dags_folder=DRIFT_DAGS,
        # the watchers are registered at the first parse after the DAGs were unpaused
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
        AIRFLOW__MLOPS__STATE_DIR=str(root / "mlops"),
        MLOPS_DRIFT_WATCH_ROOT=str(root),
        MLOPS_DRIFT_WATCH_POLL=str(POLL),
    ) as components:
        yield Watched(stack=components.stack, db=components.db, root=root, july=july)


def test_drift_in_a_watched_source_makes_the_triggerer_start_the_dag(watched: Watched) -> None:
    # The dag-processor registered both watchers' triggers and the triggerer took them.
    def assigned() -> dict | None:
        triggers = watched.watcher_triggers()
        ok = set(triggers) >= set(ASSETS.values()) and all(t["triggerer_id"] for t in triggers.values())
        return triggers if ok else None

    triggers = watched.wait("the triggerer to take both watchers' triggers", assigned, timeout=120)
    for name in ASSETS.values():
        assert triggers[name]["classpath"] == "airflow_mlops.triggers.drift.DriftEventTrigger"
    assert triggers["drift_log_watched"]["watcher"] == "prediction_log_watcher"
    assert triggers["drift_metric_watched"]["watcher"] == "drift_summary_watcher"

    # Calm sources, polled several times: no Asset event, no run.
    time.sleep(4 * POLL)
    for dag_id, asset in ASSETS.items():
        assert watched.asset_events(asset) == [], watched.log_tails()
        assert watched.asset_triggered_runs(dag_id) == {}

    # Drift: the monitor reports the July week; live traffic is July's.
    _write_metric(watched.root, _summary("july-2013-07-21", "2013-07-21", drifted=True))
    _write_log(watched.root, "2013-07-21", watched.july)  # one file, replaced atomically: one finding

    def one_run_each() -> dict | None:
        runs = {dag_id: watched.asset_triggered_runs(dag_id) for dag_id in DAGS}
        return runs if all(len(r) == 1 and all(r.values()) for r in runs.values()) else None

    runs = watched.wait("the scheduler to start both watched DAGs", one_run_each, timeout=120)
    for dag_id, asset in ASSETS.items():
        [event] = watched.asset_events(asset)
        assert event["source_dag_id"] is None  # from the triggerer, not from a task
        assert event["extra"]["from_trigger"] is True
        payload = event["extra"]["payload"]
        assert payload["status"] == "drift"
        [(run_id, [cause])] = runs[dag_id].items()
        assert cause["id"] == event["id"]
        gate = watched.wait(
            f"the retraining gate of {dag_id}", lambda d=dag_id, r=run_id: watched.gate(d, r), 120
        )
        assert gate["state"] == "success", watched.client.failure_report(dag_id, run_id)
        # the gate read the trigger's payload: its event id and data time are the cause
        decision = gate["decision"]
        assert decision["proceed"] is True
        assert decision["cause"]["event_id"] == payload["event_id"]
        assert decision["cause"]["data_time"].startswith("2013-07-21")
        # the last finding: its id, and in prediction-log mode the end of its window
        finding = {"event_id": payload["event_id"]}
        if "window_end" in payload:
            finding["window_end"] = payload["window_end"]
        assert watched.state_store(asset) == {"drift_trigger_last_event_id": finding}

    metric = watched.asset_events("drift_metric_watched")[0]["extra"]["payload"]
    assert metric["event_id"] == "july-2013-07-21" and metric["drifted_columns"] == {"temp": 5.8, "dewp": 4.9}
    log = watched.asset_events("drift_log_watched")[0]["extra"]["payload"]
    assert {"temp", "dewp"} <= set(log["drifted_columns"]) and not {"carrier", "origin"} & set(
        log["drifted_columns"]
    )
    assert log["rows"] == len(watched.july) and log["data_time"] == "2013-07-21"

    # The drift-to-retrained timeline, read back over the REST API (no ingest DAG here: no landing time).
    first = drift_to_retrained(
        watched.client.http,
        "july-2013-07-21",
        drift_asset="drift_metric_watched",
        train_dag="drift_watch_metric",
        served_task="retraining_gate",
        ingest_dag=None,
    )
    [metric_run] = runs["drift_watch_metric"]
    assert first["retraining_run_id"] == metric_run and first["served"] is True
    assert first["data_time"] == "2013-07-21" and first["landed_at"] is None
    assert 0 < first["seconds"]["drift_event_to_served"] < 300

    # The triggers keep watching: the same finding, polled again, fires nothing more.
    time.sleep(4 * POLL)
    for asset in ASSETS.values():
        assert len(watched.asset_events(asset)) == 1

    # A new finding a day later fires again; the scheduler starts a run; the gate holds it back.
    _write_metric(watched.root, _summary("july-2013-07-22", "2013-07-22", drifted=True))

    def second_run() -> str | None:
        new = [
            r
            for r, events in watched.asset_triggered_runs("drift_watch_metric").items()
            if r not in runs["drift_watch_metric"] and events
        ]
        return new[0] if new else None

    run_id = watched.wait("a run for the second finding", second_run, timeout=120)
    gate = watched.wait("the second gate", lambda: watched.gate("drift_watch_metric", run_id), 120)
    assert gate["state"] == "skipped"
    [second] = watched.asset_events("drift_metric_watched")[1:]
    assert second["extra"]["payload"]["event_id"] == "july-2013-07-22"
    from airflow_mlops.ml.retraining import RetrainingState

    record = RetrainingState(watched.root / "retraining", "drift_watch_metric").read()
    assert [r["event_id"] for r in record["retrainings"]] == ["july-2013-07-21"]
    assert "inside the cooldown" in record["suppressed"][-1]["reason"]
