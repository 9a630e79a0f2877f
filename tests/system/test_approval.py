"""System test: a person approves or rejects a candidate through Airflow's REST API, and promotes or rolls
back a version by triggering the operate DAG, on real Airflow components (api-server, scheduler,
dag-processor, triggerer; LocalExecutor on PostgreSQL, :mod:`airflow_procs`).

The DAGs are ``tests/system/approval_dags/approval_flow.py``: the end of a manual-approval train DAG
(register -> holdout gate -> ``approval`` -> ``deploy`` stand-in) and an operate DAG, on three real
flight-delay models of increasing quality (scikit-learn, written as model folders; the gate scores them on
a later month). The requests are those the model page sends, as a named admin user (a token the API
server signed for ``alice``, role admin; the test stack otherwise runs with all-admins simple auth):

- ``PATCH /api/v2/dags/<dag>/dagRuns/<run>/taskInstances/approval/-1/hitlDetails``
  ``{"chosen_options": ["Approve"]}`` (or ``["Reject"]``);
- ``POST /api/v2/dags/approval_operate/dagRuns`` ``{"conf": {"action": "rollback", "version": null}}``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from airflow_procs import AirflowComponents, airflow_components
from mlops_testing import ROOT

from airflow_mlops.demo.stack import AirflowClient, AirflowStackError

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
MODEL = "approval_delay"
USER = "alice"


def _write_models(state: Path) -> dict[str, str]:
    """Four binary delay models trained on a sample of January-March 2013 (10, 60, 150 and 30 boosting
    rounds; the first is the weakest on April), their training manifest and an April holdout."""

    sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the serving tests' model writer
    from serving.models import training_frame, write_manifest, write_model

    flights = training_frame(months=(1, 2, 3, 4))
    train = flights[flights["month"] <= 3].sample(20_000, random_state=0)
    holdout = flights[flights["month"] == 4].sample(8_000, random_state=0)
    paths: dict[str, str] = {}
    for name, frame in (("train", train), ("holdout", holdout)):
        paths[name] = write_manifest(state, name, frame)
    for name, rounds in (("weak", 10), ("good", 60), ("best", 150), ("fair", 30)):
        paths[name] = str(write_model(state / "models" / name, train, max_iter=rounds))
    return paths


def _token(stack_env: dict[str, str], user: str) -> str:
    """A token for ``user`` (role admin) signed with the API server's key, as its login would issue."""
    code = (
        "from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager\n"
        "from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser\n"
        f"print(SimpleAuthManager().generate_jwt(SimpleAuthManagerUser(username={user!r}, role='ADMIN')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=stack_env, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Airflow(AirflowComponents):
    paths: dict[str, str]
    alice: AirflowClient

    def train(self, run_id: str, model: str, dag_id: str = "approval_train") -> None:
        conf = {
            "model_uri": self.paths[model],
            "train_manifest": self.paths["train"],
            "holdout": self.paths["holdout"],
        }
        self.alice.trigger(dag_id, run_id=run_id, conf=conf)

    def state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.task_states(dag_id, run_id).get(task_id)

    def awaiting(self, run_id: str, dag_id: str = "approval_train") -> dict:
        """The approval task once it waits for an answer, with its human-in-the-loop request."""

        def parked() -> bool:
            state = self.state(dag_id, run_id, "approval")
            if state in ("failed", "upstream_failed", "skipped", "success"):
                pytest.fail(
                    f"approval ended {state} before any answer\n{self.client.failure_report(dag_id, run_id)}"
                )
            return state == "awaiting_input"

        self.wait(f"{run_id}: the approval task to wait for an answer", parked, 300, self.log_tails)
        # A person reads the question first: answered before the parking process's end reached the
        # scheduler, Airflow 3.3.2 takes that late event for the resumed try and fails it (seen in CI with
        # an answer 5 s after the task showed awaiting_input: the parking process took 5 s to end)
        self.wait_parked(dag_id, run_id, "approval")
        return self.alice.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails")

    def answer(self, run_id: str, option: str) -> dict:
        return self.alice.request(
            "PATCH",
            f"/dags/approval_train/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails",
            json={"chosen_options": [option]},
        )

    def operate(self, run_id: str, action: str, version: str | None) -> dict:
        self.alice.trigger("approval_operate", run_id=run_id, conf={"action": action, "version": version})
        return self.finished_run("approval_operate", run_id, timeout=240)

    def index(self) -> dict[str, Any]:
        from airflow_mlops.hooks.bentoml import BentoMLHook

        return BentoMLHook().read_index(MODEL)


@pytest.fixture(scope="module")
def airflow(airflow_pg_db, tmp_path_factory) -> Iterator[Airflow]:
    state = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "approval-system"
    state.mkdir(parents=True, exist_ok=True)
    paths = _write_models(state)
    with (
        pytest.MonkeyPatch.context() as mp,
        airflow_components(
            airflow_pg_db,
            tmp_path_factory.mktemp("approval-airflow-logs"),
            ("approval_train", "approval_train_timeout", "approval_operate"),
            dags_folder=HERE / "approval_dags",
            AIRFLOW__MLOPS__STATE_DIR=str(state),
            AIRFLOW__MLOPS__ARTIFACT_ROOT=f"file://{state}/artifacts",
            # on a loaded machine a task's first Execution API call (marking it running) took 44 s: with
            # Airflow's 5 s timeout the task retried it, got 400 (already running) and died before its work
            AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="90",
        ) as components,
    ):
        mp.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))  # the test reads the registry the tasks write
        mp.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{state}/artifacts")
        alice = AirflowClient(f"{components.stack.url}/api/v2", token=_token(components.stack._env, USER))
        try:
            yield Airflow(stack=components.stack, db=components.db, paths=paths, alice=alice)
        finally:
            alice.close()


def test_approve_then_reject_then_roll_back_each_named_after_the_user(airflow: Airflow) -> None:
    # 1. the first candidate clears the floor: it waits for a person, holding no worker slot
    airflow.train("first", "weak")
    detail = airflow.awaiting("first")
    version = airflow.xcom("approval_train", "first", "register")["version"]
    assert detail["subject"] == f"Put {MODEL} {version} in production?"
    assert detail["options"] == ["Approve", "Reject"] and detail["response_received"] is False
    ti = airflow.query(
        "SELECT state, trigger_id FROM task_instance WHERE dag_id = 'approval_train' AND run_id = 'first' "
        "AND task_id = 'approval'"
    )[0]
    assert ti == {"state": "awaiting_input", "trigger_id": None}  # no trigger, no triggerer, no task process
    pool = airflow.get("/pools/default_pool")
    assert pool["running_slots"] == 0 and pool["queued_slots"] == 0
    index = airflow.index()
    assert index["versions"][version]["stage"] == "pending_approval" and index["production"] is None
    assert airflow.state("approval_train", "first", "deploy") in (None, "none")

    answer = airflow.answer("first", "Approve")
    assert answer["responded_by"]["name"] == USER
    run = airflow.finished_run("approval_train", "first", timeout=240)
    assert run["state"] == "success", airflow.client.failure_report("approval_train", "first")
    assert airflow.xcom("approval_train", "first", "deploy") == version  # what the deploy serves
    index = airflow.index()
    assert index["production"] == version
    decision = index["history"][-1]
    assert (decision["action"], decision["version"], decision["user"]) == ("approve", version, USER)
    assert decision["candidate_score"] > 0.55 and decision["production_score"] is None

    # 2. a better candidate passes the gate; Alice rejects it: nothing is deployed, production stays
    airflow.train("second", "good")
    airflow.awaiting("second")
    rejected = airflow.xcom("approval_train", "second", "register")["version"]
    airflow.answer("second", "Reject")
    run = airflow.finished_run("approval_train", "second", timeout=240)
    assert run["state"] == "success"
    assert airflow.state("approval_train", "second", "deploy") == "skipped"
    index = airflow.index()
    assert index["production"] == version and index["versions"][rejected]["stage"] == "rejected"
    decision = index["history"][-1]
    assert (decision["action"], decision["version"], decision["user"]) == ("reject", rejected, USER)
    assert decision["candidate_score"] > decision["production_score"]  # both scores, as the gate saw them

    # an answer given twice is refused by Airflow itself
    with pytest.raises(AirflowStackError, match="409"):
        airflow.answer("second", "Approve")

    # 3. the operate DAG: a rejected version is refused before anything changes...
    before = airflow.index()
    run = airflow.operate("promote-rejected", "promote", rejected)
    assert run["state"] == "failed"
    assert "was rejected" in airflow.client.task_log(
        "approval_operate", "promote-rejected", "operate", 1, lines=80
    )
    assert airflow.index() == before

    # ...the best model is approved, then Alice rolls back to the first: the registry names her
    airflow.train("third", "best")
    airflow.awaiting("third")
    best = airflow.xcom("approval_train", "third", "register")["version"]
    airflow.answer("third", "Approve")
    assert airflow.finished_run("approval_train", "third", timeout=240)["state"] == "success"
    assert airflow.index()["production"] == best
    run = airflow.operate("rollback-1", "rollback", None)
    assert run["state"] == "success", airflow.client.failure_report("approval_operate", "rollback-1")
    index = airflow.index()
    assert index["production"] == version and index["versions"][best]["stage"] == "archived"
    decision = index["history"][-1]
    assert (decision["action"], decision["version"], decision["user"]) == ("rollback", version, USER)
    assert (decision["dag_id"], decision["dag_run_id"]) == ("approval_operate", "rollback-1")


def test_no_answer_within_the_timeout_rejects_the_candidate_and_says_so(airflow: Airflow) -> None:
    before = airflow.index()["production"]
    airflow.train("unanswered", "fair", dag_id="approval_train_timeout")
    detail = airflow.awaiting("unanswered", dag_id="approval_train_timeout")
    assert detail["defaults"] == ["Reject"]  # shown in Required actions: what happens without an answer
    version = airflow.xcom("approval_train_timeout", "unanswered", "register")["version"]
    # Airflow's scheduler answers with the default once the 20 s have passed (it checks every 15 s)
    run = airflow.finished_run("approval_train_timeout", "unanswered", timeout=240)
    assert run["state"] == "success", airflow.client.failure_report("approval_train_timeout", "unanswered")
    assert airflow.state("approval_train_timeout", "unanswered", "deploy") == "skipped"
    index = airflow.index()
    assert index["production"] == before and index["versions"][version]["stage"] == "rejected"
    decision = index["history"][-1]
    assert (decision["action"], decision["version"], decision["user"], decision["timed_out"]) == (
        "reject",
        version,
        None,
        True,
    )
    assert decision["reason"] == "no answer within 0:00:20: rejected by default"
