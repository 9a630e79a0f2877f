"""Actions from the model page, in headless Chromium, through Airflow's own REST API (issue 15).

In this order, on the state of ``conftest.py`` (version 1 waiting for approval in run ``train-1``): a
viewer's approve and promote are refused by Airflow and change nothing; an admin approves version 1 (the
train run deploys it); a second training (of later days) registers version 2, which beats version 1 at the
gate and which the admin approves too; the admin rolls back (version 1 serves again), then promotes version 2. After each action
the registry (read with the project's hook) and the live endpoint (the version its ``/ready`` names) follow,
and the decision names the user who clicked.
"""

from __future__ import annotations

import pytest

from .conftest import MODEL, SECOND_TRAINING, WAITING, UIAirflow

pytestmark = [pytest.mark.ui, pytest.mark.system]

#: an action's run (a train run deploying, the operate DAG building and deploying a Bento) may take minutes
ACTION_TIMEOUT_MS = 600_000


def open_model(page, ui: UIAirflow, query: str = "") -> None:
    page.goto(f"{ui.url}/plugin/mlops-models/{MODEL}{query}")
    page.locator("[data-testid=versions-row]").first.wait_for()


def act(page, button: str, shot, name: str) -> str:
    """Click an action button, confirm, wait until the run it started has finished; its final state."""
    page.locator(button).click()
    page.locator("[data-testid=action-confirm]").click()
    page.locator("[data-testid=action-result], [data-testid=action-error]").first.wait_for()
    shot(page, f"{name}-accepted")
    error = page.locator("[data-testid=action-error]")
    assert error.count() == 0, error.inner_text()
    finished = page.locator("[data-testid=action-result][data-phase=done] [data-testid=action-run-state]")
    finished.wait_for(timeout=ACTION_TIMEOUT_MS)
    shot(page, f"{name}-done")
    return finished.get_attribute("data-value") or ""


def assert_models_page(page, ui: UIAirflow, version: str, shot, name: str) -> None:
    """The Models page names ``version`` in production, with the holdout score its gate measured, and the
    live endpoint answering with it."""
    page.goto(f"{ui.url}/plugin/mlops-models")
    row = page.locator(f"[data-testid=models-row][data-key={MODEL}]")
    row.locator(f"[data-testid=model-production-version][data-value={version}]").wait_for()
    row.locator(f"[data-testid=model-serving-version][data-value={version}]").wait_for()
    shot(page, name)
    [gate] = [
        e for e in ui.index()["history"] if e["version"] == version and e["action"] == "pending_approval"
    ]
    score = row.locator("[data-testid=model-production-score]").get_attribute("data-value")
    assert float(score) == gate["candidate_score"], (score, gate)


def last_decision(ui: UIAirflow) -> dict:
    return ui.index()["history"][-1]


def wait_serving(ui: UIAirflow, version: str, timeout: float = 120) -> None:
    """The live endpoint answers with ``version`` (the deploy task switched the router before it ended)."""
    ui.client.wait(f"the endpoint to serve {version}", lambda: ui.version_answering() == version, timeout)


def pending_version(ui: UIAirflow, run_id: str) -> str:
    index = ui.index()
    [version] = [v for v, r in index["versions"].items() if r["dag_run_id"] == run_id]
    assert index["versions"][version]["stage"] == "pending_approval", (
        f"{run_id} registered {version}, stage {index['versions'][version]['stage']}: the gate said "
        f"{[e.get('reason') for e in index['history'] if e['version'] == version]}"
    )
    return version


def test_a_viewers_actions_are_refused_by_airflow_and_change_nothing(login, ui_airflow, shot):
    before = ui_airflow.index()
    version = pending_version(ui_airflow, "train-1")
    page = login("viewer")
    open_model(page, ui_airflow)
    # a viewer sees no button: the page is read only for them
    page.locator("[data-testid=model-read-only]").wait_for()
    assert page.locator("[data-testid^=action-]").count() == 0
    shot(page, "viewer-read-only")

    # with the buttons forced on (?actions=show), Airflow refuses the approval itself (403)
    open_model(page, ui_airflow, "?actions=show")
    page.locator(f"[data-testid=action-approve][data-version={version}]").click()
    page.locator("[data-testid=action-confirm]").click()
    refused = page.locator("[data-testid=action-error]")
    refused.wait_for()
    shot(page, "viewer-approve-refused")
    assert refused.get_attribute("data-status") == "403", refused.inner_text()

    # and the operate DAG's trigger, sent with the viewer's session as the page would send it
    answer = page.request.post(
        f"{ui_airflow.url}/api/v2/dags/{ui_airflow.dag('operate')}/dagRuns",
        data={"logical_date": None, "conf": {"action": "promote", "version": version}},
    )
    assert answer.status == 403, answer.text()

    assert ui_airflow.index() == before
    assert ui_airflow.client.runs(ui_airflow.dag("operate")) == []
    states = ui_airflow.client.task_states(ui_airflow.dag("train"), "train-1")
    assert states["approval"] in WAITING, states


def test_an_admin_approves_the_waiting_candidate_and_the_endpoint_serves_it(login, ui_airflow, shot):
    version = pending_version(ui_airflow, "train-1")
    page = login("admin")
    open_model(page, ui_airflow)
    state = act(page, f"[data-testid=action-approve][data-version={version}]", shot, "approve-1")
    assert state == "success", ui_airflow.failure(ui_airflow.dag("train"), "train-1")

    index = ui_airflow.index()
    assert index["production"] == version
    decision = last_decision(ui_airflow)
    assert (decision["action"], decision["version"], decision["user"]) == ("approve", version, "admin")
    wait_serving(ui_airflow, version)
    open_model(page, ui_airflow)
    page.locator(f"[data-testid=model-production-version][data-value={version}]").wait_for()
    shot(page, "approved")


@pytest.fixture(scope="module")
def two_versions(ui_airflow) -> tuple[str, str]:
    """Version 1 in production and version 2, from a second training that beats it at the gate, waiting for
    approval (``SECOND_TRAINING``: why this pair of trainings)."""
    first = ui_airflow.index()["production"]
    assert first, "version 1 was not approved (test_an_admin_approves_... failed)"
    ui_airflow.train("train-2", SECOND_TRAINING)
    return first, pending_version(ui_airflow, "train-2")


def test_an_admin_approves_a_second_version_then_rolls_back_then_promotes_it(
    login, ui_airflow, shot, two_versions
):
    first, second = two_versions
    page = login("admin")

    open_model(page, ui_airflow)
    state = act(page, f"[data-testid=action-approve][data-version={second}]", shot, "approve-2")
    second_run = ui_airflow.index()["versions"][second]["dag_run_id"]
    assert state == "success", ui_airflow.failure(ui_airflow.dag("train"), second_run)
    assert ui_airflow.index()["production"] == second
    wait_serving(ui_airflow, second)

    # roll back: the version before comes back, in the registry and on the live endpoint
    open_model(page, ui_airflow)
    state = act(page, "[data-testid=action-rollback]", shot, "rollback")
    operate = ui_airflow.client.runs(ui_airflow.dag("operate"))
    assert state == "success", ui_airflow.failure(ui_airflow.dag("operate"), operate[-1]["dag_run_id"])
    index = ui_airflow.index()
    assert index["production"] == first
    assert index["versions"][second]["stage"] == "archived"
    decision = last_decision(ui_airflow)
    assert (decision["action"], decision["version"], decision["user"]) == ("rollback", first, "admin")
    assert operate[-1]["conf"] == {"action": "rollback", "version": None}
    wait_serving(ui_airflow, first)

    # promote the archived version 2 again
    open_model(page, ui_airflow)
    state = act(page, f"[data-testid=action-promote][data-version={second}]", shot, "promote")
    operate = ui_airflow.client.runs(ui_airflow.dag("operate"))
    assert state == "success", ui_airflow.failure(ui_airflow.dag("operate"), operate[-1]["dag_run_id"])
    assert ui_airflow.index()["production"] == second
    decision = last_decision(ui_airflow)
    assert (decision["action"], decision["version"], decision["user"]) == ("promote", second, "admin")
    wait_serving(ui_airflow, second)

    open_model(page, ui_airflow)
    page.locator(f"[data-testid=model-production-version][data-value={second}]").wait_for()
    users = page.locator("[data-testid=decision-user]").evaluate_all("ns => ns.map(n => n.dataset.value)")
    assert users[:3] == ["admin", "admin", "admin"]  # newest first: promote, rollback, approve
    # the hand decisions' scores are labelled as the versions' validation scores (a hand decision scores
    # nothing new), the approval's are the gate's
    rows = page.locator("[data-testid=decisions-row]")
    labels = [rows.nth(i).locator("[data-testid=decision-scores-from]").count() for i in range(3)]
    assert labels == [2, 2, 0], labels
    shot(page, "promoted")


def test_the_models_page_names_the_version_serving_and_its_holdout_score(
    login, ui_airflow, shot, two_versions
):
    """After the actions: the production version (promoted by hand) is the one the endpoint answers with,
    and its score is the holdout score its gate measured (a hand promotion scores nothing new)."""
    _, second = two_versions
    assert ui_airflow.index()["production"] == second
    assert_models_page(login("viewer"), ui_airflow, second, shot, "models-after-actions")
