"""Decisions people take on the registry: approving or rejecting a candidate that waits for approval
(``ModelApprovalOperator``), promoting a named version or rolling back by hand (``ModelActionOperator``).

The registry (state database) is real; only ``BentoMLHook.model_dir`` (which would import the model files
into BentoML's store) is replaced. What a user sees afterwards is the registry: stages, production and the
history, each decision with who took it and the scores.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError
from airflow_mlops.operators.registry import (
    ModelActionOperator,
    ModelApprovalOperator,
    RollbackModelOperator,
    model_page_url,
)

_names = itertools.count()


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh model name in a registry with v1 (archived, production before v2), v2 (production) and v3
    (passed the gate, pending approval)."""
    monkeypatch.setattr(BentoMLHook, "model_dir", lambda self, name, version, record=None: tmp_path)
    name = f"approve_{next(_names)}_{datetime.now(UTC):%H%M%S%f}"

    def record(version: str, stage: str, auc: float) -> dict[str, Any]:
        return {
            "tag": f"{name}:{version}",
            "version": version,
            "stage": stage,
            "metric": "auc",
            "metrics": {"auc": auc},
        }

    BentoMLHook().write_index(
        name,
        {
            "model": name,
            "production": "v2",
            "versions": {
                "v1": record("v1", "archived", 0.70),
                "v2": record("v2", "production", 0.72),
                "v3": record("v3", "pending_approval", 0.75),
            },
            "history": [
                {"action": "promote", "version": "v1", "previous_production": None},
                {"action": "promote", "version": "v2", "previous_production": "v1"},
                {"action": "pending_approval", "version": "v3", "dag_id": "m_train", "dag_run_id": "r3"},
            ],
        },
    )
    return name


def _context(dag_id: str, task_id: str, run_id: str = "run-1") -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id=dag_id, task_id=task_id), "run_id": run_id}


def _promotion(version: str = "v3", pending: bool = True) -> dict[str, Any]:
    return {
        "promoted": False,
        "pending_approval": pending,
        "reason": "candidate beats production by 0.03 (>= 0.002)",
        "version": version,
        "production_version": "v2",
        "candidate_score": 0.751,
        "production_score": 0.721,
        "metric": "auc",
        "mode": "max",
    }


def _answer(option: str, user: str | None, *, timedout: bool = False) -> dict[str, Any]:
    return {
        "chosen_options": [option],
        "params_input": {},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "7", "name": user} if user else None,
        "timedout": timedout,
    }


def _approval(name: str, **kwargs: Any) -> ModelApprovalOperator:
    return ModelApprovalOperator(task_id="approval", model_name=name, promotion=_promotion(), **kwargs)


def _index(name: str) -> dict[str, Any]:
    return BentoMLHook().read_index(name)


def test_approving_puts_the_candidate_in_production_recorded_with_the_user_and_both_scores(
    model: str,
) -> None:
    result = _approval(model).execute_complete(_context("m_train", "approval"), _answer("Approve", "alice"))

    index = _index(model)
    assert index["production"] == "v3"
    assert {v: r["stage"] for v, r in index["versions"].items()} == {
        "v1": "archived",
        "v2": "archived",
        "v3": "production",
    }
    decision = index["history"][-1]
    assert decision["action"] == "approve" and decision["user"] == "alice"
    assert (decision["candidate_score"], decision["production_score"]) == (0.751, 0.721)
    assert decision["previous_production"] == "v2" and decision["reason"] == "approved by alice"
    assert (decision["dag_id"], decision["dag_run_id"], decision["task_id"]) == (
        "m_train",
        "run-1",
        "approval",
    )
    assert index["versions"]["v3"]["decisions"][-1] == decision
    assert result["approved"] is True and result["decision"]["user"] == "alice"
    # the approved version is a promotion: rolling back goes to the one it replaced
    RollbackModelOperator(task_id="rollback", model_name=model, user="carol").execute(
        _context("m_operate", "operate")
    )
    assert _index(model)["production"] == "v2"
    assert _index(model)["history"][-1]["user"] == "carol"


def test_rejecting_keeps_production_and_marks_the_candidate_rejected(model: str) -> None:
    result = _approval(model).execute_complete(_context("m_train", "approval"), _answer("Reject", "bob"))

    index = _index(model)
    assert index["production"] == "v2" and index["versions"]["v3"]["stage"] == "rejected"
    decision = index["history"][-1]
    assert (decision["action"], decision["user"], decision["reason"]) == ("reject", "bob", "rejected by bob")
    assert (decision["candidate_score"], decision["production_score"]) == (0.751, 0.721)
    assert result["approved"] is False
    # nobody puts a rejected version in production by hand, and the error says who rejected it
    before = _index(model)
    with pytest.raises(MLOpsArgumentError, match="was rejected \\(by bob: rejected by bob\\)"):
        _action(model, "promote", "v3").execute(_context("m_operate", "operate"))
    assert _index(model) == before


def test_no_answer_before_the_timeout_takes_the_default_and_says_so(model: str) -> None:
    op = _approval(model, response_timeout=timedelta(hours=2))
    assert op.defaults == ["Reject"]  # what Airflow's scheduler answers when the timeout passes
    op.execute_complete(_context("m_train", "approval"), _answer("Reject", None, timedout=True))

    decision = _index(model)["history"][-1]
    assert decision["action"] == "reject" and decision["user"] is None and decision["timed_out"] is True
    assert decision["reason"] == "no answer within 2:00:00: rejected by default"
    assert _index(model)["versions"]["v3"]["stage"] == "rejected"
    assert _approval(model, response_timeout=timedelta(hours=1), on_timeout="approve").defaults == ["Approve"]
    assert _approval(model).defaults is None  # no timeout: it waits for an answer


def test_a_candidate_the_gate_refused_is_not_asked_about(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.providers.standard.operators.hitl as hitl

    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: pytest.fail("asked a person"))
    op = ModelApprovalOperator(task_id="approval", model_name=model, promotion=_promotion(pending=False))
    result = op.execute(_context("m_train", "approval"))
    assert result["approved"] is None and _index(model)["production"] == "v2"


def test_a_pending_candidate_is_asked_about_with_its_scores(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import airflow.providers.standard.operators.hitl as hitl
    from airflow.sdk.exceptions import TaskAwaitingInput

    asked: dict[str, Any] = {}
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: asked.update(kw))
    context = {**_context("m_train", "approval"), "task_instance": SimpleNamespace(id="ti-1")}
    with pytest.raises(TaskAwaitingInput) as parked:
        _approval(model, response_timeout=timedelta(hours=3)).execute(context)
    assert parked.value.method_name == "execute_complete" and parked.value.timeout == timedelta(hours=3)
    assert asked["options"] == ["Approve", "Reject"] and asked["subject"] == f"Put {model} v3 in production?"
    assert "0.751" in asked["body"] and "0.721" in asked["body"] and model_page_url(model) in asked["body"]
    assert "rejected" in asked["body"]  # what the timeout does
    # the registry says where the question waits (the model page answers it there)
    assert _index(model)["versions"]["v3"]["approval_request"] == {
        "dag_id": "m_train",
        "run_id": "run-1",
        "task_id": "approval",
        "map_index": -1,
    }
    _approval(model).execute_complete(_context("m_train", "approval"), _answer("Approve", "alice"))
    assert "approval_request" not in _index(model)["versions"]["v3"]


def test_an_answer_for_a_version_no_longer_pending_changes_nothing(model: str) -> None:
    op = _approval(model)
    op.execute_complete(_context("m_train", "approval"), _answer("Reject", "bob"))
    before = _index(model)
    with pytest.raises(ModelRegistryError, match="no longer awaits approval"):
        op.execute_complete(_context("m_train", "approval"), _answer("Approve", "alice"))
    assert _index(model) == before


def _action(name: str, action: str, version: str | None = None, user: str = "carol") -> ModelActionOperator:
    return ModelActionOperator(
        task_id="operate", model_name=name, action=action, version=version or "", user=user
    )


def test_promote_by_hand_then_roll_back_each_recorded_with_the_user(model: str) -> None:
    result = _action(model, "promote", "v1", user="carol").execute(
        _context("m_operate", "operate", "manual-1")
    )
    assert result == {
        "action": "promote",
        "production_version": "v1",
        "previous_production": "v2",
        "changed": True,
    }
    index = _index(model)
    assert index["production"] == "v1" and index["versions"]["v2"]["stage"] == "archived"
    decision = index["history"][-1]
    assert (decision["action"], decision["version"], decision["user"]) == ("promote", "v1", "carol")
    assert (decision["candidate_score"], decision["production_score"]) == (0.70, 0.72)
    assert (decision["dag_id"], decision["dag_run_id"]) == ("m_operate", "manual-1")

    result = _action(model, "rollback", user="dave").execute(_context("m_operate", "operate", "manual-2"))
    assert result["production_version"] == "v2" and _index(model)["production"] == "v2"
    decision = _index(model)["history"][-1]
    assert (decision["action"], decision["version"], decision["user"]) == ("rollback", "v2", "dave")
    assert decision["previous_production"] == "v1"


def test_promoting_the_production_version_changes_nothing(model: str) -> None:
    before = _index(model)
    result = _action(model, "promote", "v2").execute(_context("m_operate", "operate"))
    assert result["changed"] is False and _index(model) == before


@pytest.mark.parametrize(
    ("action", "version", "message"),
    [
        ("demote", "v1", "action 'demote' is not one this DAG knows"),
        ("promote", None, "names no version"),
        ("promote", "v9", "has no version 'v9' \\(known: v1, v2, v3\\)"),
        ("promote", "v3", "awaits approval in its train run \\(m_train / r3\\)"),
        ("rollback", "v1", "names version 'v1', which is not the production version \\(v2\\)"),
    ],
)
def test_a_bad_request_fails_naming_the_problem_before_anything_changes(
    model: str, action: str, version: str | None, message: str
) -> None:
    before = _index(model)
    with pytest.raises(MLOpsArgumentError, match=message):
        _action(model, action, version).execute(_context("m_operate", "operate"))
    assert _index(model) == before


def test_rolling_back_without_a_previous_version_fails(model: str) -> None:
    _action(model, "rollback").execute(_context("m_operate", "operate"))  # v2 -> v1
    before = _index(model)
    with pytest.raises(ModelRegistryError, match="no previous production version to roll back to"):
        _action(model, "rollback").execute(_context("m_operate", "operate"))  # v1 had none before it
    assert _index(model) == before


def test_the_model_page_url_follows_the_api_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert (
        model_page_url("flight_delay")
        == "https://airflow.example.com/team-a/plugin/mlops-models/flight_delay"
    )
