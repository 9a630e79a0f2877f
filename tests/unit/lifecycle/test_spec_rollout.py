"""``serving.rollout`` in the lifecycle spec: defaults keep the blue/green deploy, a canary and a shadow period
reach the train DAG's tasks, and bad rollout fields are named with the fix."""

from __future__ import annotations

import pytest
from test_spec import write_spec

from airflow_mlops.lifecycle import LifecycleSpecError, lifecycle_dags, load_spec


def test_without_a_rollout_the_deploy_stays_blue_green(tmp_path):
    train = lifecycle_dags(write_spec(tmp_path, lambda c: None))["flights_train"]
    deploy = train.task_dict["deploy"]
    assert deploy.strategy == "blue_green" and deploy.upstream_task_ids == {"build"}
    assert not {"deploy_shadow", "shadow_period", "shadow_gate"} & set(train.task_dict)


def test_a_canary_rollout_reaches_the_deploy_task(tmp_path):
    rollout = {
        "strategy": "canary",
        "steps": [5, 25, 100],
        "step_minutes": 2.5,
        "guardrails": {"max_p99_ratio": 1.5, "min_requests": 50},
    }
    path = write_spec(tmp_path, lambda c: c["serving"].update(rollout=rollout))
    deploy = lifecycle_dags(path)["flights_train"].task_dict["deploy"]
    assert (deploy.strategy, deploy.canary_steps, deploy.step_minutes) == ("canary", [5, 25, 100], 2.5)
    assert deploy.guardrails == {
        "max_error_rate_increase": 0.01,
        "max_p99_ratio": 1.5,
        "max_prediction_shift": 0.2,
        "min_requests": 50,
    }


def test_a_shadow_period_gates_the_rollout(tmp_path):
    rollout = {"strategy": "canary", "shadow_minutes": 30, "shadow_gate": {"min_label_agreement": 0.9}}
    path = write_spec(tmp_path, lambda c: c["serving"].update(rollout=rollout))
    train = lifecycle_dags(path)["flights_train"]
    shadow, wait, gate = (train.task_dict[t] for t in ("deploy_shadow", "shadow_period", "shadow_gate"))
    assert shadow.strategy == "shadow" and shadow.upstream_task_ids == {"build"}
    assert wait.upstream_task_ids == {"deploy_shadow"} and "minutes=30" in wait.target_time
    assert gate.upstream_task_ids == {"shadow_period"} and gate.min_label_agreement == 0.9
    assert train.task_dict["deploy"].upstream_task_ids == {"shadow_gate"}


@pytest.mark.parametrize(
    ("rollout", "named"),
    [
        (
            {"strategy": "linear"},
            r"serving\.rollout\.strategy: Input should be 'blue_green', 'canary' or 'shadow'",
        ),
        (
            {"steps": [50, 10]},
            r"serving\.rollout\.steps: \[50\.0, 10\.0\] are not increasing.*e\.g\. \[10, 50, 100\]",
        ),
        ({"steps": [100]}, r"serving\.rollout\.steps: .*starting below 100"),
        ({"step_minutes": 0}, r"serving\.rollout\.step_minutes: Input should be greater than 0"),
        ({"guardrails": {"max_p99": 2}}, r"serving\.rollout\.guardrails\.max_p99: unknown field"),
        ({"shadow_minutes": -5}, r"serving\.rollout\.shadow_minutes: Input should be greater than 0"),
    ],
)
def test_a_bad_rollout_field_is_named_with_the_fix(tmp_path, rollout, named):
    path = write_spec(tmp_path, lambda c: c["serving"].update(rollout=rollout))
    with pytest.raises(LifecycleSpecError, match=named) as err:
        load_spec(path)
    assert "fix:" in str(err.value)
