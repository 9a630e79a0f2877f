"""``serving.queue`` in the lifecycle spec: the train DAG's serving tasks (build, deploy, shadow period,
sample predictions; the deploy onto a shared endpoint) go to that Airflow queue, so only the Celery
workers listening on it (a serving host) run them; the other tasks, and every task by default, stay on
Airflow's default queue."""

from __future__ import annotations

import pytest
from test_spec import write_spec

from airflow_mlops.lifecycle import LifecycleSpecError, lifecycle_dags, load_spec

SERVING_TASKS = {"build", "deploy", "deploy_shadow", "shadow_period", "shadow_gate", "sample_predictions"}


def _queues(dag) -> dict[str, str]:
    return {task_id: task.queue for task_id, task in dag.task_dict.items()}


def test_by_default_every_task_takes_airflows_default_queue(tmp_path):
    from airflow.configuration import conf

    default = conf.get("operators", "default_queue")
    for dag in lifecycle_dags(write_spec(tmp_path, lambda c: None)).values():
        assert set(_queues(dag).values()) == {default}, dag.dag_id


def test_the_serving_tasks_and_only_they_go_to_the_serving_queue(tmp_path):
    from airflow.configuration import conf

    rollout = {"strategy": "blue_green", "shadow_minutes": 10}
    path = write_spec(tmp_path, lambda c: c["serving"].update(queue="serving", rollout=rollout))
    dags = lifecycle_dags(path)
    queues = _queues(dags["flights_train"])
    assert {t for t, q in queues.items() if q == "serving"} == SERVING_TASKS
    default = conf.get("operators", "default_queue")
    assert {q for t, q in queues.items() if t not in SERVING_TASKS} == {default}
    # the operate DAG deploys as the train DAG does (no shadow period: a person chose the version)
    operate = _queues(dags["flights_operate"])
    assert {t for t, q in operate.items() if q == "serving"} == {"build", "deploy"}
    for dag_id, dag in dags.items():
        if dag_id not in ("flights_train", "flights_operate"):
            assert set(_queues(dag).values()) == {default}, dag_id


def test_a_deploy_onto_a_shared_endpoint_takes_the_serving_queue(tmp_path):
    path = write_spec(tmp_path, lambda c: c["serving"].update(queue="serving", endpoint="shared"))
    queues = _queues(lifecycle_dags(path)["flights_train"])
    assert queues["deploy"] == queues["sample_predictions"] == "serving"


def test_an_empty_queue_is_named(tmp_path):
    with pytest.raises(LifecycleSpecError, match=r"serving\.queue"):
        load_spec(write_spec(tmp_path, lambda c: c["serving"].update(queue="")))
