"""The ``scale`` extra installs what the scaled topology runs (docs/scaling.md)."""

from __future__ import annotations

import pytest

from airflow_mlops.demo.stack import AirflowStack


def test_the_celery_executor_loads():
    """celery 5.7 removed ``celery.backends.database.retry``, which the Celery provider imports: with it
    the scheduler exits at start ("could not load ... executor"). The lock pins celery below 5.7."""
    pytest.importorskip("airflow.providers.celery")
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor

    assert CeleryExecutor.__name__ == "CeleryExecutor"


def test_the_stack_on_postgresql_listens_where_told(tmp_path):
    """Another host's workers reach the API server at ``host``."""
    stack = AirflowStack(
        home=tmp_path,
        logs=tmp_path,
        host="10.213.9.1",
        port=8080,
        env={"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:p@10.213.9.1/airflow"},
    )
    env = stack.environment()
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in env
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://10.213.9.1:8080/execution/"
