"""Test DAGs of ``tests/system/test_approval.py``: the end of a manual-approval train DAG and an operate DAG,
on real registry operators, without the training that precedes them in a lifecycle.

- ``approval_train``: ``register`` (a model folder the test wrote, named by the run's conf) ->
  ``promote`` (the holdout gate, ``approval="manual"``) -> ``approval`` (Airflow human-in-the-loop) ->
  ``deploy``, which stands for the lifecycle's serving tasks: it answers the version it would serve (the
  registry's production version). The factory wires the same tasks the same way
  (``tests/unit/lifecycle/test_spec_approval.py``); building and serving a Bento is covered elsewhere.
- ``approval_train_timeout``: the same with a 20-second answer timeout (``on_timeout="reject"``);
- ``approval_operate``: the lifecycle's operate task with the factory's request templates and params.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Param

from airflow_mlops.lifecycle.factory import OPERATE_REQUEST, operate_params
from airflow_mlops.operators.registry import (
    ModelActionOperator,
    ModelApprovalOperator,
    PromoteModelOperator,
    RegisterModelOperator,
)

MODEL = "approval_delay"
START = datetime(2024, 1, 1, tzinfo=UTC)


def production_version() -> str | None:
    from airflow_mlops.hooks.bentoml import BentoMLHook

    return BentoMLHook().production_version(MODEL)


for dag_id, timeout in (("approval_train", None), ("approval_train_timeout", timedelta(seconds=20))):
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=START,
        catchup=False,
        params={
            "model_uri": Param("", type="string"),
            "train_manifest": Param("", type="string"),
            "holdout": Param("", type="string"),
        },
    ):
        register = RegisterModelOperator(
            task_id="register",
            multiple_outputs=True,
            model_name=MODEL,
            model_uri="{{ params.model_uri }}",
            training_manifest_uri="{{ params.train_manifest }}",
        )
        promote = PromoteModelOperator(
            task_id="promote",
            model_name=MODEL,
            candidate_version=register.output["version"],
            holdout_uri="{{ params.holdout }}",
            min_improvement=0.0,
            floor=0.55,
            approval="manual",
        )
        approval = ModelApprovalOperator(
            task_id="approval", model_name=MODEL, promotion=promote.output, response_timeout=timeout
        )
        deploy = PythonOperator(task_id="deploy", python_callable=production_version)
        promote >> approval >> deploy

with DAG(
    dag_id="approval_operate",
    schedule=None,
    start_date=START,
    catchup=False,
    max_active_runs=1,
    params=operate_params(),
):
    ModelActionOperator(task_id="operate", model_name=MODEL, **OPERATE_REQUEST)
