"""The shared state store on its embedded default (SQLite): no lost update between processes, the state
folder is only a cache, former JSON files are imported once, an unreachable database is named."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from state_workers import race

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.hooks.state import MLOpsStateHook, StateStoreError
from airflow_mlops.ml.retraining import RetrainingState, TriggerEventInfo, gate


@pytest.fixture
def state_dir(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_MLOPS_STATE", raising=False)
    return tmp_path


def test_two_processes_incrementing_one_key_lose_no_update(state_dir: Path) -> None:
    race({}, str(state_dir), times=50)
    doc = MLOpsStateHook(default_dir=state_dir).get("test", "counter")
    assert doc["n"] == 100
    assert len(set(doc["by"])) == 2, "both processes wrote"
    assert (state_dir / "mlops-state.db").is_file(), "the embedded default is a SQLite file in state_dir"


def _event(day: int, event_id: str) -> TriggerEventInfo:
    return TriggerEventInfo(
        event_id=event_id,
        asset="drift://flight_delay",
        data_time=datetime(2013, 4, day, tzinfo=UTC),
        extra={},
    )


def test_deleting_the_state_folders_cache_loses_no_registry_deployment_or_gate_state(state_dir: Path) -> None:
    from airflow_mlops.operators.serving import LocalDeploymentTarget

    hook = BentoMLHook()
    with hook.locked("flight_delay") as index:
        index["versions"]["v1"] = {"version": "v1", "stage": "production"}
        index["production"] = "v1"
    with LocalDeploymentTarget(hook).locked("flight_delay") as deployment:
        deployment["active"] = {"version": "v1", "url": "http://127.0.0.1:1"}
    gate_folder = state_dir / "retraining"
    first = gate(
        RetrainingState(gate_folder, "flight_delay"), [_event(1, "d1")], cooldown=_days(7), run_id="r1"
    )
    assert first.proceed

    # a worker rebuilt: everything in its state folder but the database is gone
    for path in state_dir.iterdir():
        if not path.name.startswith("mlops-state.db"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    assert BentoMLHook().production_version("flight_delay") == "v1"
    assert BentoMLHook().model_names() == ["flight_delay"]
    assert BentoMLHook().read_index("flight_delay")["versions"]["v1"]["stage"] == "production"
    assert LocalDeploymentTarget(BentoMLHook()).read_state("flight_delay")["active"]["version"] == "v1"
    again = gate(
        RetrainingState(gate_folder, "flight_delay"), [_event(3, "d3")], cooldown=_days(7), run_id="r2"
    )
    assert not again.proceed and "cooldown" in again.reason, "the cooldown survived"


def _days(n: int):
    from datetime import timedelta

    return timedelta(days=n)


def test_a_former_releases_json_files_are_imported_once_and_never_written_again(state_dir: Path) -> None:
    legacy_index = state_dir / "artifacts" / "registry" / "flight_delay" / "index.json"
    legacy_index.parent.mkdir(parents=True)
    old = {
        "model": "flight_delay",
        "production": "v0",
        "versions": {"v0": {"stage": "production"}},
        "history": [],
    }
    legacy_index.write_text(json.dumps(old))
    legacy_gate = state_dir / "retraining" / "flight_delay.json"
    legacy_gate.parent.mkdir()
    legacy_gate.write_text(
        json.dumps(
            {
                "model": "flight_delay",
                "seen": ["d1"],
                "retrainings": [{"data_time": "2013-04-01T00:00:00+00:00", "event_id": "d1", "run_id": "r1"}],
            }
        )
    )

    hook = BentoMLHook()
    assert hook.production_version("flight_delay") == "v0"
    with hook.locked("flight_delay") as index:
        index["versions"]["v1"] = {"stage": "candidate"}
    decision = gate(
        RetrainingState(state_dir / "retraining", "flight_delay"),
        [_event(3, "d3")],
        cooldown=_days(7),
        run_id="r2",
    )
    assert not decision.proceed, "the imported cooldown holds"

    assert json.loads(legacy_index.read_text()) == old, "the former file is never written"
    legacy_index.unlink()
    legacy_gate.unlink()
    assert set(BentoMLHook().read_index("flight_delay")["versions"]) == {"v0", "v1"}
    assert RetrainingState(state_dir / "retraining", "flight_delay").read()["seen"] == ["d1", "d3"]


def test_a_gate_given_its_own_folder_keeps_its_own_state(state_dir: Path, tmp_path_factory) -> None:
    mine, theirs = tmp_path_factory.mktemp("gate-a"), tmp_path_factory.mktemp("gate-b")
    assert gate(RetrainingState(mine, "m"), [_event(1, "d1")], cooldown=_days(7), run_id="r1").proceed
    assert gate(RetrainingState(theirs, "m"), [_event(2, "d2")], cooldown=_days(7), run_id="r1").proceed


def test_an_unreachable_database_is_named_with_its_connection(state_dir: Path, monkeypatch) -> None:
    from airflow_mlops.net import free_port

    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_STATE", f"postgresql://u:secret@127.0.0.1:{free_port()}/mlops")
    with pytest.raises(StateStoreError) as refused:
        BentoMLHook().read_index("flight_delay")
    message = str(refused.value)
    assert "'mlops_state'" in message and "cannot be reached" in message
    assert "secret" not in message, "the password is never shown"
    assert "retried" in refused.value.fix
    ok, why = MLOpsStateHook().test_connection()
    assert not ok and "not usable" in why


def test_a_connection_of_another_type_is_refused_with_what_to_set(state_dir: Path, monkeypatch) -> None:
    from airflow_mlops.exceptions import MLOpsConfigError

    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_STATE", json.dumps({"conn_type": "http", "host": "x"}))
    with pytest.raises(MLOpsConfigError, match="PostgreSQL or SQLite") as refused:
        MLOpsStateHook().get("a", "b")
    assert "AIRFLOW_CONN_MLOPS_STATE='postgresql://" in refused.value.fix


def test_the_model_server_gets_the_state_connection(state_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_STATE", "postgresql://u:pw@db.example:5432/mlops")
    env = BentoMLHook().server_environment()
    conn = json.loads(env["AIRFLOW_CONN_MLOPS_STATE"])
    assert conn["extra"]["sqlalchemy_url"] == "postgresql+psycopg2://u:pw@db.example:5432/mlops"
    monkeypatch.delenv("AIRFLOW_CONN_MLOPS_STATE")
    assert "AIRFLOW_CONN_MLOPS_STATE" not in BentoMLHook().server_environment()


def test_reading_inside_a_write_of_a_former_index_does_not_wait_for_itself(
    state_dir: Path, monkeypatch
) -> None:
    # the first promotion after an upgrade reads the index (to score) inside its own read-modify-write
    monkeypatch.setattr("airflow_mlops.hooks.state.SQLITE_BUSY_TIMEOUT", 2.0)
    legacy_index = state_dir / "artifacts" / "registry" / "flight_delay" / "index.json"
    legacy_index.parent.mkdir(parents=True)
    old = {
        "model": "flight_delay",
        "production": "v0",
        "versions": {"v0": {"stage": "production"}},
        "history": [],
    }
    legacy_index.write_text(json.dumps(old))
    hook = BentoMLHook()
    with hook.locked("flight_delay") as index:
        assert hook.production_version("flight_delay") == "v0"
        index["history"].append({"action": "promote"})
    assert BentoMLHook().read_index("flight_delay")["history"] == [{"action": "promote"}]


def test_a_process_reads_while_another_holds_a_write(state_dir: Path) -> None:
    # a deploy holds its deployment's write while the model server it starts reads the registry
    from mlops_testing import run_python

    from airflow_mlops.operators.serving import LocalDeploymentTarget

    hook = BentoMLHook()
    with hook.locked("flight_delay") as index:
        index["production"] = "v1"
    with LocalDeploymentTarget(hook).locked("flight_delay"):
        result = run_python(
            "from airflow_mlops.hooks.bentoml import BentoMLHook\n"
            "print('@@', BentoMLHook().production_version('flight_delay'))",
            timeout=60,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "@@ v1" in result.stdout


def test_a_shared_artifact_store_without_the_state_connection_is_refused(
    state_dir: Path, monkeypatch
) -> None:
    # each worker would otherwise keep a registry of its own next to one shared artifact store
    from airflow_mlops.exceptions import MLOpsConfigError

    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "s3://bucket/mlops")
    with pytest.raises(MLOpsConfigError, match="shared by several machines") as refused:
        RetrainingState(state_dir / "retraining", "flight_delay").read()
    assert "AIRFLOW_CONN_MLOPS_STATE='postgresql://" in refused.value.fix
    assert not (state_dir / "mlops-state.db").exists()
