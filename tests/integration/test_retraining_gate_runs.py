"""The retraining gate asks Airflow how the runs it let through ended (``dag.test()``, real task runner).

Only trainings that finished hold the cooldown: the gate records the run it lets through as ``started``
and, in a later run, reads that run's state through the Task SDK (``get_dagrun_state``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from airflow_mlops.ml.retraining import RetrainingState

DAG_FILE = """
from datetime import UTC, datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from airflow_mlops.operators.drift import RetrainingGateOperator


def train(**context):
    if context["dag_run"].conf.get("fail"):
        raise RuntimeError("Ray Tune found no trial that finished")


with DAG("gate_outcomes", schedule=None, start_date=datetime(2013, 1, 1, tzinfo=UTC), max_active_runs=1) as dag:
    RetrainingGateOperator(
        task_id="gate",
        model_name="delays",
        cooldown_days=14,
        state_dir={state!r},
        data_time="{{{{ dag_run.conf['day'] }}}}",
    ) >> PythonOperator(task_id="train", python_callable=train)
"""


def test_the_gate_marks_the_runs_it_let_through_finished_or_failed(
    airflow_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    folder, state = tmp_path / "dags", tmp_path / "retraining"
    folder.mkdir()
    (folder / "gate_outcomes.py").write_text(DAG_FILE.format(state=str(state)))
    # dag.test() writes the DAG to the metadata database from its bundle
    bundle = {"name": "gate-outcomes", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}
    monkeypatch.setenv(
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST",
        json.dumps([{**bundle, "kwargs": {"path": str(folder)}}]),
    )
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    dag = bag.get_dag("gate_outcomes")

    def run(day: int, **conf):
        return dag.test(
            logical_date=datetime(2013, 7, day, tzinfo=UTC), run_conf={"day": f"2013-07-{day}", **conf}
        )

    failed = run(10, fail=True)
    assert failed.state == "failed"
    done = run(12)
    assert done.state == "success"
    last = run(14)
    records = RetrainingState(state, "delays").read()["retrainings"]
    assert {r["run_id"]: r["status"] for r in records} == {
        failed.run_id: "failed",
        done.run_id: "finished",
        last.run_id: "started",
    }
    assert {r["dag_id"] for r in records} == {"gate_outcomes"}
