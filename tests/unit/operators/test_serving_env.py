"""What the bentoml subprocesses (build, serve) and the router get from the worker's environment: the
allow-list, the connections they use, and nothing else (Airflow's secrets, the metadata-DB URL, other
connections and cloud keys stay with the worker). The live test (tests/integration/test_serving_live.py)
reads the environment of the running server and its workers."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from airflow.sdk import Connection

from airflow_mlops.config import load_serving_settings
from airflow_mlops.exceptions import MLOpsConfigError
from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.operators.serving import (
    BentoDeployOperator,
    LocalDeploymentTarget,
    ServingAuthError,
    serving_env,
)

SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-value",
    "AIRFLOW__CORE__FERNET_KEY": "fernet-key-value",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:db-password@db/airflow",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AIRFLOW_CONN_WAREHOUSE": "postgresql://u:warehouse-password@h/db",
    "GITHUB_TOKEN": "ghp_example",
}


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("MLOPS_FEAST_DIR", "/srv/feast")
    return tmp_path


def test_the_workers_secrets_do_not_reach_the_server(worker_env):
    env = serving_env(BentoMLHook(), model="m", api_key="k")
    leaked = {k for k, v in env.items() if any(s in v for s in SECRETS.values())}
    assert leaked == set() and not set(SECRETS) & set(env)
    assert env["PATH"] and env["LC_ALL"] == "C.UTF-8" and env["MLOPS_FEAST_DIR"] == "/srv/feast"
    assert env["MLOPS_SERVE_MODEL"] == "m" and env["MLOPS_SERVE_API_KEY"] == "k"
    assert env["AIRFLOW__MLOPS__STATE_DIR"] == str(worker_env)
    assert env["MLOPS_SERVE_MAX_ROWS"] == "5000"


def test_the_connections_the_server_uses_are_passed_and_no_other(worker_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SERVE_KEY", json.dumps({"conn_type": "bentoml", "password": "s3cret"}))
    env = serving_env(BentoMLHook(), model="m", bentoml_conn_id="serve_key")
    assert Connection.from_json(env["AIRFLOW_CONN_SERVE_KEY"]).password == "s3cret"
    assert [k for k in env if k.startswith("AIRFLOW_CONN_")] == ["AIRFLOW_CONN_SERVE_KEY"]


def test_cloud_variables_only_for_an_artifact_store_on_that_cloud(worker_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "s3://bucket/mlops")
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_CONN_ID", "store")
    monkeypatch.setenv("AIRFLOW_CONN_STORE", json.dumps({"conn_type": "aws"}))
    env = serving_env(BentoMLHook(), model="m")
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret-value" and "AIRFLOW_CONN_STORE" in env
    assert "AIRFLOW__CORE__FERNET_KEY" not in env and "GITHUB_TOKEN" not in env
    router = serving_env(BentoMLHook(), store_access=False)  # it only forwards requests
    assert not [k for k in router if k.startswith(("AWS_", "AIRFLOW_CONN_"))]


def test_the_setting_extends_the_allow_list_by_name_and_prefix(worker_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__SERVING_ENV_ALLOW", "GITHUB_TOKEN, CORP_*")
    monkeypatch.setenv("CORP_CA", "/etc/corp.pem")
    env = serving_env(BentoMLHook(), model="m")
    assert env["GITHUB_TOKEN"] == "ghp_example" and env["CORP_CA"] == "/etc/corp.pem"
    assert "AIRFLOW__API_AUTH__JWT_SECRET" not in env


def test_the_variables_the_served_feast_repository_names_are_passed(worker_env, monkeypatch, tmp_path):
    (tmp_path / "feature_store.yaml").write_text("online_store:\n  connection_string: ${REDIS_URL}\n")
    monkeypatch.setenv("REDIS_URL", "redis:6379")
    assert serving_env(BentoMLHook(), model="m", feast_repo=str(tmp_path))["REDIS_URL"] == "redis:6379"
    assert "REDIS_URL" not in serving_env(BentoMLHook(), model="m")


def test_request_limits_are_settings_with_clear_errors(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__SERVING_MAX_ROWS", "200")
    assert load_serving_settings().max_rows == 200
    monkeypatch.setenv("AIRFLOW__MLOPS__SERVING_MAX_BODY_BYTES", "lots")
    with pytest.raises(MLOpsConfigError, match="serving_max_body_bytes must be a whole number"):
        load_serving_settings()


def test_an_empty_api_key_refuses_the_deploy_before_anything_starts(worker_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SERVE_KEY", json.dumps({"conn_type": "bentoml", "password": ""}))
    started = mock.Mock()
    op = BentoDeployOperator(task_id="d", model_name="m", bentoml_conn_id="serve_key", deferrable=False)
    with (
        mock.patch.object(LocalDeploymentTarget, "start", started),
        mock.patch.object(LocalDeploymentTarget, "ensure_router", started),
        mock.patch.object(BentoDeployOperator, "resolve", return_value={"version": "v1", "bento": None}),
        pytest.raises(ServingAuthError, match="'serve_key' sets the served endpoint's API key, but its pass"),
    ):
        op.execute({"run_id": "r", "ti": mock.Mock(dag_id="d", task_id="d")})
    started.assert_not_called()


def test_the_registry_signing_key_reaches_the_server_and_not_the_router(worker_env, monkeypatch):
    # without the connection (embedded default) the server finds the key file through the state folder
    assert not [k for k in serving_env(BentoMLHook(), model="m") if k.startswith("AIRFLOW_CONN_")]
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLOPS_REGISTRY", json.dumps({"conn_type": "generic", "password": "registry-key"})
    )
    env = serving_env(BentoMLHook(), model="m")
    assert Connection.from_json(env["AIRFLOW_CONN_MLOPS_REGISTRY"]).password == "registry-key"
    assert "AIRFLOW_CONN_MLOPS_REGISTRY" not in serving_env(BentoMLHook(), store_access=False)


@pytest.mark.parametrize("setting, passed", [(None, "idle"), ("shared", "shared"), (" Shared ", "shared")])
def test_the_shadow_cpu_setting_reaches_the_server_and_the_router(worker_env, monkeypatch, setting, passed):
    if setting is not None:
        monkeypatch.setenv("AIRFLOW__MLOPS__SHADOW_CPU", setting)
    assert serving_env(BentoMLHook(), model="m")["MLOPS_SHADOW_CPU"] == passed
    assert serving_env(BentoMLHook(), store_access=False)["MLOPS_SHADOW_CPU"] == passed


def test_a_shadow_cpu_setting_that_is_neither_idle_nor_shared_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__SHADOW_CPU", "low")
    with pytest.raises(MLOpsConfigError, match="shadow_cpu must be 'idle' or 'shared', got 'low'"):
        load_serving_settings()
