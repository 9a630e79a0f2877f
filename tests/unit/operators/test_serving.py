"""Serving operators without servers: template fields, argument checks, deferral, idempotent no-op."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_mlops.exceptions import MLOpsArgumentError, ServingError
from airflow_mlops.operators.serving import (
    BentoBuildOperator,
    BentoDeployOperator,
    BentoRollbackOperator,
    LocalDeploymentTarget,
)
from airflow_mlops.sensors.serving import BentoEndpointSensor
from airflow_mlops.triggers.serving import BentoEndpointTrigger


def _context():
    return {"run_id": "r1", "ti": SimpleNamespace(dag_id="d", run_id="r1", task_id="t")}


def test_template_fields_are_assigned_as_given():
    op = BentoDeployOperator(task_id="d", model_name="{{ m }}", version="{{ v }}", bento_tag="{{ b }}")
    assert op.template_fields == ("model_name", "version", "bento_tag", "feast_repo_path")
    assert (op.model_name, op.version, op.bento_tag) == ("{{ m }}", "{{ v }}", "{{ b }}")
    build = BentoBuildOperator(task_id="b", model_name="{{ m }}", version="{{ v }}")
    assert (build.model_name, build.version) == ("{{ m }}", "{{ v }}")


def test_unknown_targets_are_refused_pointing_at_the_docs():
    with pytest.raises(MLOpsArgumentError, match="docs/serving.md"):
        BentoDeployOperator(task_id="d", model_name="m", target="kubernetes")


def test_a_bento_of_another_version_is_refused():
    op = BentoDeployOperator(task_id="d", model_name="m", bento_tag="m-service:v1")
    with pytest.raises(MLOpsArgumentError, match="does not serve version 'v2'"):
        op._bento_for("v2")


def test_deferrable_deploy_defers_to_the_endpoint_trigger(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    op = BentoDeployOperator(task_id="d", model_name="m", version="v1", deferrable=True, ready_timeout=42)
    backend = {
        "url": "http://127.0.0.1:4999",
        "pid": 1,
        "version": "v1",
        "port": 4999,
        "log": None,
        "action": "deploy",
    }
    with (
        mock.patch.object(
            LocalDeploymentTarget, "ensure_router", return_value={"url": "http://127.0.0.1:3000"}
        ),
        mock.patch.object(LocalDeploymentTarget, "start", return_value=backend),
        pytest.raises(TaskDeferred) as deferred,
    ):
        op.deploy({"version": "v1", "bento": None}, action="deploy", context=_context())
    trigger = deferred.value.trigger
    assert isinstance(trigger, BentoEndpointTrigger)
    assert (trigger.url, trigger.timeout) == ("http://127.0.0.1:4999", 42.0)
    assert deferred.value.method_name == "execute_complete"
    # the pending backend is in the state file, so the resumed task finds it there
    assert LocalDeploymentTarget(op.hook).read_state("m")["pending"]["url"] == "http://127.0.0.1:4999"


def test_a_failed_readiness_stops_the_new_version_and_keeps_the_old(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    op = BentoDeployOperator(task_id="d", model_name="m", version="v2")
    target = LocalDeploymentTarget(op.hook)
    with target.locked("m") as state:
        state["active"] = {"url": "http://127.0.0.1:1", "version": "v1", "pid": None}
        state["pending"] = {
            "url": "http://127.0.0.1:2",
            "version": "v2",
            "pid": None,
            "log": None,
            "action": "deploy",
        }
    with pytest.raises(ServingError, match="did not become ready.*keeps serving"):
        op.execute_complete(
            _context(), {"status": "timeout", "url": "http://127.0.0.1:2", "message": "HTTP 503"}
        )
    state = target.read_state("m")
    assert state["pending"] is None and state["active"]["version"] == "v1"
    assert state["history"][-1]["action"] == "deploy-failed"


def test_the_sensor_defers_when_not_ready_yet():
    sensor = BentoEndpointSensor(task_id="s", url="http://127.0.0.1:9", deferrable=True, timeout=30)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(_context())
    assert deferred.value.trigger.serialize()[1]["url"] == "http://127.0.0.1:9"
    with pytest.raises(ServingError, match="not ready"):
        sensor.execute_complete(_context(), {"status": "timeout", "url": "u", "message": "u was not ready"})


def test_a_version_without_a_signature_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.signature import SignatureError

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    hook = BentoMLHook()
    record = {"tag": "m:v1", "version": "v1", "stage": "production", "files_sha256": {}}
    hook.write_index("m", {"model": "m", "production": "v1", "versions": {"v1": record}, "history": []})
    started = mock.Mock()
    with (
        mock.patch.object(LocalDeploymentTarget, "start", started),
        mock.patch.object(LocalDeploymentTarget, "ensure_router", started),
        pytest.raises(
            SignatureError, match="version 'v1' cannot be served: m:v1 was registered without"
        ) as err,
    ):
        BentoDeployOperator(task_id="d", model_name="m", deferrable=False).execute(_context())
    assert "RegisterModelOperator" in str(err.value)
    started.assert_not_called()
    assert not (tmp_path / "deployments").exists() or not list((tmp_path / "deployments").glob("*.json"))
    with pytest.raises(SignatureError, match="version 'v1' cannot be served"):
        BentoBuildOperator(task_id="b", model_name="m").execute(_context())


def test_a_rerun_after_a_deferred_rollback_does_not_flip_back(tmp_path, monkeypatch):
    """The rollback defers while the previous version starts; the resumed task (a new instance) records
    its run key, so clearing and rerunning the same task run keeps the rolled-back version live."""
    from airflow_mlops.operators import serving

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    router = {"url": "http://127.0.0.1:3000", "pid": None, "port": 3000}
    live = {"active": None}

    def start(self, spec):
        url = f"http://127.0.0.1:{4000 + len(spec['version'])}{spec['version'][-1]}"
        return {**spec, "url": url, "pid": None, "port": 0, "log": None, "started_at": "now"}

    def switch(self, deployment, backend, router, standby=None):
        live["active"] = backend["url"]

    monkeypatch.setattr(serving, "check_signature", lambda record, version: None)
    monkeypatch.setattr(serving.BentoMLHook, "read_index", lambda self, name: {"model": name, "versions": {}})
    monkeypatch.setattr(serving.BentoMLHook, "version_record", lambda self, index, version: {})
    monkeypatch.setattr(serving.BentoMLHook, "model_dir", lambda self, name, version, record=None: tmp_path)
    monkeypatch.setattr(LocalDeploymentTarget, "ensure_router", lambda self, state, port: router)
    monkeypatch.setattr(LocalDeploymentTarget, "start", start)
    monkeypatch.setattr(LocalDeploymentTarget, "switch", switch)
    monkeypatch.setattr(LocalDeploymentTarget, "drain_and_stop", lambda self, backend, router: None)
    monkeypatch.setattr(LocalDeploymentTarget, "backend_ready", lambda self, backend: True)
    monkeypatch.setattr(
        LocalDeploymentTarget, "router_status", lambda self, router: {"active": live["active"]}
    )
    target = LocalDeploymentTarget(serving.BentoMLHook())
    with target.locked("m") as state:
        state["router"] = router
        state["previous"] = {"url": "http://127.0.0.1:1", "version": "v1", "pid": None, "bento": None}
        state["active"] = {"url": "http://127.0.0.1:2", "version": "v2", "pid": None, "bento": None}
        live["active"] = state["active"]["url"]

    def rollback():
        return BentoRollbackOperator(task_id="t", model_name="m", deferrable=True)

    with pytest.raises(TaskDeferred) as deferred:
        rollback().execute(_context())
    event = {"status": "ready", "url": target.read_state("m")["pending"]["url"]}
    done = rollback().execute_complete(_context(), event, **(deferred.value.kwargs or {}))
    assert done["version"] == "v1" and done["switched"]
    # the task is cleared and runs again (same run): nothing changes
    again = rollback().execute(_context())
    assert again["version"] == "v1" and again["switched"] is False
    assert target.read_state("m")["active"]["version"] == "v1"
