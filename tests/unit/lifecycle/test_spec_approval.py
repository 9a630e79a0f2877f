"""``promotion.approval`` and the operate DAG: what the spec builds.

Automatic approval keeps today's train DAG (the gate's verdict goes straight to the serving tasks);
manual approval puts an Airflow human-in-the-loop ``approval`` task between the gate and everything that
serves production. Every model gets a ``<prefix>_operate`` DAG, run by hand only, that changes production
and serves it as the train DAG does.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_spec import write_spec

from airflow_mlops.lifecycle import LifecycleSpecError, lifecycle_dags


def _manual(content: dict, **extra) -> None:
    content["promotion"].update(approval="manual", **extra)


def test_automatic_approval_keeps_the_gate_before_the_serving_tasks(tmp_path):
    train = lifecycle_dags(write_spec(tmp_path, lambda c: None))["flights_train"]
    assert "approval" not in train.task_dict
    assert train.task_dict["promote"].approval == "automatic"
    assert train.task_dict["drift_baseline"].upstream_task_ids == {"promote"}


def test_manual_approval_waits_between_the_gate_and_the_serving_tasks(tmp_path):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    path = write_spec(tmp_path, lambda c: _manual(c, approval_timeout_hours=48))
    train = lifecycle_dags(path)["flights_train"]
    approval = train.task_dict["approval"]
    assert isinstance(approval, ApprovalOperator)
    assert train.task_dict["promote"].approval == "manual"
    assert approval.upstream_task_ids == {"promote"}
    assert approval.downstream_task_ids == {"drift_baseline"}
    # everything that serves the new version comes after the answer (a Reject skips it all)
    assert {"build", "deploy", "sample_predictions"} <= {t.task_id for t in approval.get_flat_relatives()}
    assert approval.response_timeout == timedelta(hours=48) and approval.defaults == ["Reject"]
    assert approval.promotion.operator.task_id == "promote"  # the gate's verdict, at run time
    assert "pending_approval" in train.doc_md and "48 h it is rejected" in train.doc_md


def test_manual_approval_without_timeout_waits_for_an_answer(tmp_path):
    path = write_spec(tmp_path, lambda c: _manual(c, on_timeout="approve"))
    approval = lifecycle_dags(path)["flights_train"].task_dict["approval"]
    assert approval.response_timeout is None and approval.defaults is None
    path = write_spec(tmp_path, lambda c: _manual(c, approval_timeout_hours=2, on_timeout="approve"))
    train = lifecycle_dags(path)["flights_train"]
    assert train.task_dict["approval"].defaults == ["Approve"]
    assert "without an answer within 2 h it is approved" in train.doc_md


def test_a_timeout_without_manual_approval_is_a_spec_error(tmp_path):
    path = write_spec(tmp_path, lambda c: c["promotion"].update(approval_timeout_hours=4))
    with pytest.raises(LifecycleSpecError, match="approval_timeout_hours is set but approval is automatic"):
        lifecycle_dags(path)
    path = write_spec(tmp_path, lambda c: c["promotion"].update(approval="by_committee"))
    with pytest.raises(LifecycleSpecError, match="promotion.approval"):
        lifecycle_dags(path)


def test_the_operate_dag_changes_production_then_serves_it(tmp_path):
    operate = lifecycle_dags(write_spec(tmp_path, lambda c: None))["flights_operate"]
    assert type(operate.timetable).__name__ == "NullTimetable" and operate.max_active_runs == 1
    action = operate.task_dict["operate"]
    assert action.model_name == "flight_delay"
    # the action and version come from the run's conf (its params), the user from the run
    assert (action.action, action.version) == ("{{ params.action or '' }}", "{{ params.version or '' }}")
    assert action.user == "{{ dag_run.triggering_user_name or '' }}"
    assert set(operate.params) == {"action", "version"}
    assert operate.task_dict["drift_baseline"].upstream_task_ids == {"operate"}
    assert operate.task_dict["build"].upstream_task_ids == {"drift_baseline"}
    assert operate.task_dict["deploy"].upstream_task_ids == {"build"}
    # deployed as the train DAG deploys (no shadow period: a person chose the version)
    train = lifecycle_dags(write_spec(tmp_path, lambda c: None))["flights_train"]
    for field in ("port", "strategy", "canary_steps", "feast_repo_path"):
        assert getattr(operate.task_dict["deploy"], field) == getattr(train.task_dict["deploy"], field)
