"""The model server reads the Feast registry and online store the workers' Feast tasks use: without a
``feast_conn_id`` on the deploy, the Feast operators' default connection ``feast_default`` (when it exists)
and the SQL registry connection its extra names reach the server. Found by the scaled topology: the
server opened a file registry of its own state folder and served nothing (``unknown feature service
'delay_model' ... registered: none``)."""

from __future__ import annotations

import json

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.operators.serving import serving_env

FEAST = {
    "conn_type": "feast",
    "host": "10.0.0.1",
    "port": 6379,
    "extra": {"registry_conn_id": "feast_registry"},
}
REGISTRY = {
    "conn_type": "postgres",
    "host": "10.0.0.1",
    "schema": "feast_registry",
    "login": "u",
    "password": "p",
}


def test_the_default_feast_connection_and_its_registry_reach_the_server(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_DEFAULT", json.dumps(FEAST))
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_REGISTRY", json.dumps(REGISTRY))
    env = serving_env(BentoMLHook(), model="m", feast_repo=str(tmp_path))
    assert env["MLOPS_SERVE_FEAST_CONN_ID"] == "feast_default"
    assert json.loads(env["AIRFLOW_CONN_FEAST_REGISTRY"])["schema"] == "feast_registry"
    assert json.loads(env["AIRFLOW_CONN_FEAST_DEFAULT"])["host"] == "10.0.0.1"
    # the router gets no connection
    assert not [k for k in serving_env(BentoMLHook(), store_access=False) if k.startswith("AIRFLOW_CONN_")]


def test_without_the_default_connection_the_server_uses_the_repository_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_FEAST_DEFAULT", raising=False)
    env = serving_env(BentoMLHook(), model="m", feast_repo=str(tmp_path))
    assert "MLOPS_SERVE_FEAST_CONN_ID" not in env
    assert not [k for k in env if k.startswith("AIRFLOW_CONN_FEAST")]


def test_the_ray_connection_the_feast_connection_names_reaches_the_server(monkeypatch, tmp_path):
    """``feast_default`` materializing on a Ray cluster (extra ``ray_conn_id``, docs/features.md): the server
    builds its Feast configuration from that connection, Ray engine included, so it needs the Ray
    connection too. Found by the scaled topology: the server refused to serve (``Not serving model
    flight_delay: Ray connection 'ray_default' does not exist``) and the deploy waited for a readiness that
    never came."""
    from pathlib import Path

    from airflow_mlops.hooks.feast import FeastHook

    repo = Path(__file__).resolve().parents[3] / "feature_repo"
    feast = {**FEAST, "extra": {**FEAST["extra"], "repo_path": str(repo), "ray_conn_id": "ray_cluster"}}
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_DEFAULT", json.dumps(feast))
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_REGISTRY", json.dumps(REGISTRY))
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_CLUSTER", json.dumps({"conn_type": "ray", "host": "10.0.0.2", "port": 8265})
    )
    env = serving_env(BentoMLHook(), model="m", feast_repo=str(repo))

    # the server's Feast hook, with the connections the server gets and no other
    for name in [k for k in list(__import__("os").environ) if k.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("AIRFLOW_CONN_"):
            monkeypatch.setenv(name, value)
    config = FeastHook(feast_conn_id=env["MLOPS_SERVE_FEAST_CONN_ID"], repo_path=str(repo)).repo_config
    assert config.batch_engine.ray_address == "ray://10.0.0.2:10001"
