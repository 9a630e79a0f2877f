"""The shared state on a real PostgreSQL 15 (the scaled topology's database): processes on what stand for
two worker hosts (each its own ``state_dir``) share one registry and one retraining gate through the
connection ``mlops_state``, with no lost update and nothing kept on a worker's disk."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlops_testing import run_python
from serving.models import training_frame, write_manifest, write_model
from state_workers import race

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.hooks.state import MLOpsStateHook
from airflow_mlops.ml.retraining import RetrainingState, TriggerEventInfo, gate
from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator


@pytest.fixture
def shared(monkeypatch, tmp_path: Path, postgres_url: str) -> SimpleNamespace:
    """Worker A's environment: its own state folder, the shared artifact store and the PostgreSQL state."""
    artifacts = tmp_path / "artifacts"
    worker_a = tmp_path / "worker-a"
    env = {
        "AIRFLOW_CONN_MLOPS_STATE": postgres_url,
        "AIRFLOW_CONN_MLOPS_REGISTRY": json.dumps({"conn_type": "generic", "password": "k" * 40}),
        "AIRFLOW__MLOPS__ARTIFACT_ROOT": f"file://{artifacts}",
    }
    for key, value in {**env, "AIRFLOW__MLOPS__STATE_DIR": str(worker_a)}.items():
        monkeypatch.setenv(key, value)
    return SimpleNamespace(env=env, worker_a=worker_a, worker_b=tmp_path / "worker-b", url=postgres_url)


def test_two_processes_incrementing_one_key_lose_no_update(shared) -> None:
    race(shared.env, str(shared.worker_a), times=50)
    doc = MLOpsStateHook().get("test", "counter")
    assert doc["n"] == 100 and len(set(doc["by"])) == 2
    assert not (shared.worker_a / "mlops-state.db").exists(), "nothing in the worker's state folder"


def test_a_promotion_on_one_worker_is_what_another_worker_serves(shared, tmp_path: Path) -> None:
    flights = training_frame(months=(1, 2, 3, 4))
    train = flights[flights["month"] <= 3]
    models = tmp_path / "models"
    context = {"run_id": "manual__1", "ti": SimpleNamespace(dag_id="flights_train")}
    versions = []
    for name, iterations in (("weak", 5), ("strong", 150)):
        folder = write_model(models / name, train, max_iter=iterations)
        versions.append(
            RegisterModelOperator(
                task_id="register",
                model_name="flight_delay",
                model_uri=str(folder),
                training_manifest_uri=write_manifest(models, "train", train),
            ).execute(context)["version"]
        )
    holdout = write_manifest(models, "holdout", flights[flights["month"] == 4])
    for version in versions:
        PromoteModelOperator(
            task_id="promote",
            model_name="flight_delay",
            candidate_version=version,
            holdout_uri=holdout,
            min_improvement=0.0,
            floor=0.0,
        ).execute(context)
    production = BentoMLHook().production_version("flight_delay")
    assert production in versions
    shutil.rmtree(shared.worker_a)  # worker A's disk is gone: nothing of the registry was on it

    # worker B: another process, another state folder (its model store is empty), the same connections
    probe = """
from airflow_mlops.hooks.bentoml import BentoMLHook
hook = BentoMLHook()
index = hook.read_index("flight_delay")
version = hook.production_version("flight_delay")
predictor = hook.load("flight_delay", version)
print("@@", version, sorted(v["stage"] for v in index["versions"].values()), predictor.task)
"""
    result = run_python(probe, env={**shared.env, "AIRFLOW__MLOPS__STATE_DIR": str(shared.worker_b)})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(row for row in result.stdout.splitlines() if row.startswith("@@"))
    assert line.split()[1] == production
    assert "production" in line and "binary" in line
    assert not (shared.worker_b / "mlops-state.db").exists()


def _event(day: int, event_id: str) -> TriggerEventInfo:
    return TriggerEventInfo(
        event_id=event_id,
        asset="drift://flight_delay",
        data_time=datetime(2013, 4, day, tzinfo=UTC),
        extra={},
    )


def test_the_retraining_gate_is_shared_by_workers_on_two_hosts(shared) -> None:
    cooldown = timedelta(days=7)
    on_a = gate(
        RetrainingState(shared.worker_a / "retraining", "flight_delay"),
        [_event(1, "d1")],
        cooldown=cooldown,
        run_id="r1",
    )
    on_b = gate(
        RetrainingState(shared.worker_b / "retraining", "flight_delay"),
        [_event(2, "d2")],
        cooldown=cooldown,
        run_id="r2",
    )
    assert on_a.proceed
    assert not on_b.proceed and "cooldown" in on_b.reason, "worker B sees the retraining worker A let through"
    rows = MLOpsStateHook().keys("retraining")
    assert rows == ["flight_delay"]


def test_a_failed_write_leaves_the_document_unless_it_must_record_what_it_started(shared) -> None:
    hook = MLOpsStateHook()
    with hook.locked("deployment", "d", default=dict) as doc:
        doc["active"] = "v1"
    with pytest.raises(RuntimeError), hook.locked("deployment", "d", default=dict) as doc:
        doc["active"] = "half-done"
        raise RuntimeError("boom")
    assert hook.get("deployment", "d") == {"active": "v1"}
    with (
        pytest.raises(RuntimeError),
        hook.locked("deployment", "d", default=dict, write_on_error=True) as doc,
    ):
        doc["started"] = ["pid 42"]
        raise RuntimeError("boom")
    assert hook.get("deployment", "d") == {"active": "v1", "started": ["pid 42"]}
