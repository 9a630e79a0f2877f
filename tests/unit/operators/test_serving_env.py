"""The bentoml subprocesses a task starts (build, serve) must not inherit the blocked metadata-DB URL
that Airflow gives task processes: they import Airflow's configuration and would fail to start."""

from __future__ import annotations

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.operators.serving import serving_env


def test_a_task_process_blocked_db_url_is_not_passed_to_bentoml(monkeypatch):
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")
    monkeypatch.setenv("AIRFLOW__CORE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")
    env = serving_env(BentoMLHook(), api_key="k")
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env
    assert "AIRFLOW__CORE__SQL_ALCHEMY_CONN" not in env
    assert env["MLOPS_SERVE_API_KEY"] == "k"


def test_a_real_db_url_is_kept(monkeypatch):
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow@db/airflow")
    assert (
        serving_env(BentoMLHook())["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql://airflow@db/airflow"
    )
