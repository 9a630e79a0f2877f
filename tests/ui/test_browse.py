"""The lifecycle's pages in Airflow's UI, read in headless Chromium by an admin and a viewer (issue 15).

The state was produced by the real operators through the running Airflow (``conftest.py``): one version
registered (waiting for approval when the spec's ``promotion.approval`` is ``manual``), two drift checks,
eight validated weeks and one quarantined. Every number a page shows is compared with what the project's
own hooks read from the registry and the state database, through the exact values the pages carry in
``data-value`` attributes (they show scores with 3 decimals).
"""

from __future__ import annotations

import pytest

from .conftest import BAD_WEEK, GOOD_WEEKS, MODEL, UIAirflow

pytestmark = [pytest.mark.ui, pytest.mark.system]


def values(page, selector: str) -> list[str]:
    return page.locator(selector).evaluate_all("nodes => nodes.map(n => n.getAttribute('data-value') ?? '')")


def number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def gate_entry(index: dict, version: str) -> dict:
    """The gate's decision on ``version`` (its holdout score against production's), from the registry."""
    [entry] = [
        e
        for e in index["history"]
        if e["version"] == version and e["action"] in ("promote", "reject", "pending_approval")
    ]
    return entry


def open_models(page, ui: UIAirflow):
    page.goto(f"{ui.url}/plugin/mlops-models")
    row = page.locator(f"[data-testid=models-row][data-key={MODEL}]")
    row.wait_for()
    return row


def open_model(page, ui: UIAirflow, query: str = ""):
    page.goto(f"{ui.url}/plugin/mlops-models/{MODEL}{query}")
    page.locator("[data-testid=versions-row]").first.wait_for()
    page.locator(
        "[data-testid=drift-column], [data-testid=drift-empty], [data-testid=drift-error]"
    ).first.wait_for()
    page.locator(
        "[data-testid=validation-row], [data-testid=validation-empty], [data-testid=validation-error]"
    ).first.wait_for()
    page.locator(
        "[data-testid=trials-row], [data-testid=trials-empty], [data-testid=trials-error]"
    ).first.wait_for()


@pytest.mark.parametrize("user", ["admin", "viewer"])
def test_a_user_logs_in_through_airflows_login_page(login, ui_airflow, shot, user):
    page = login(user)
    assert "/auth/login" not in page.url
    # the session cookie lets the browser read Airflow's REST API as that user
    answer = page.request.get(f"{ui_airflow.url}/api/v2/dags/{ui_airflow.dag('train')}")
    assert answer.status == 200, answer.text()
    shot(page, "home")


@pytest.mark.parametrize("user", ["admin", "viewer"])
def test_the_models_page_shows_the_registrys_production_drift_and_retraining(login, ui_airflow, shot, user):
    from airflow_mlops.hooks.history import drift_checks

    page = login(user)
    row = open_models(page, ui_airflow)
    shot(page, "models")
    index = ui_airflow.index()
    production = index.get("production") or ""
    assert values(row, "[data-testid=model-production-version]") == [production]
    if production:  # the holdout score the gate measured when it let the version through
        [shown] = values(row, "[data-testid=model-production-score]")
        assert float(shown) == pytest.approx(gate_entry(index, production)["candidate_score"], abs=0)

    checks = sorted(drift_checks(MODEL), key=lambda c: c["at"])
    assert len(checks) == 2, [c["run_id"] for c in checks]
    last = checks[-1]
    assert values(row, "[data-testid=model-drift-drifted]") == [str(last["drift_detected"]).lower()]
    assert number(values(row, "[data-testid=model-drift-share]")[0]) == pytest.approx(
        last["drift_share"], abs=0
    )

    [decision] = values(row, "[data-testid=model-retraining-decision]")
    last_gate = [e for e in index["history"] if e["action"] in ("promote", "reject", "pending_approval")][-1]
    expected = {"pending_approval": "pending"}.get(last_gate["action"], last_gate["action"])
    assert decision in (expected, last_gate["action"]), (decision, last_gate)


@pytest.mark.parametrize("user", ["admin", "viewer"])
def test_the_model_page_shows_versions_decisions_trials_drift_and_validation(login, ui_airflow, shot, user):
    from airflow_mlops.hooks.history import drift_checks

    page = login(user)
    open_model(page, ui_airflow)
    shot(page, "model")
    index = ui_airflow.index()

    # versions: each registered version with its stage and holdout metrics, the run that produced it
    rows = page.locator("[data-testid=versions-row]")
    shown = {rows.nth(i).get_attribute("data-key"): rows.nth(i) for i in range(rows.count())}
    assert set(shown) == set(index["versions"])
    for version, record in index["versions"].items():
        row = shown[version]
        assert row.get_attribute("data-stage") == record["stage"]
        metrics = row.locator("[data-testid=version-metric]")
        exact = {
            metrics.nth(i).get_attribute("data-metric"): metrics.nth(i)
            .locator("[data-value]")
            .get_attribute("data-value")
            for i in range(metrics.count())
        }
        assert {k: float(v) for k, v in exact.items()} == pytest.approx(record["metrics"], abs=0)
        assert values(row, "[data-testid=version-run-link]") == [record["dag_run_id"]]

    # decisions (newest first): one row per decision of the registry's history, with both scores, the
    # reason and the user
    history = [e for e in index["history"] if e["action"] != "register"][::-1]
    decisions = page.locator("[data-testid=decisions-row]")
    assert decisions.count() == len(history)
    for i, entry in enumerate(history):
        row = decisions.nth(i)
        assert values(row, "[data-testid=decision-version]") == [entry["version"]]
        candidate = number(values(row, "[data-testid=decision-candidate-score]")[0])
        assert candidate == (
            pytest.approx(entry["candidate_score"], abs=0)
            if entry.get("candidate_score") is not None
            else None
        )
        assert row.locator("[data-testid=decision-reason]").inner_text() == (entry.get("reason") or "—")

    # pending approvals: the candidate waiting in the train run (manual approval)
    pending = [v for v, r in index["versions"].items() if r["stage"] == "pending_approval"]
    assert sorted(page.locator("[data-testid=pending-version]").all_inner_texts()) == sorted(pending)

    # trials of the tuning run (the spec asks for 2)
    assert page.locator("[data-testid=trials-row]").count() == 2

    # drift per monitored column: one point per recorded check, the threshold of the spec
    checks = drift_checks(MODEL)
    columns = page.locator("[data-testid=drift-column]")
    recorded = checks[-1]["columns"]
    assert sorted(columns.evaluate_all("ns => ns.map(n => n.dataset.column)")) == sorted(recorded)
    for i in range(columns.count()):
        column = columns.nth(i)
        name = column.get_attribute("data-column")
        assert column.locator("[data-testid=chart-point]").count() == len(checks)
        threshold = float(values(column, "[data-testid=drift-column-threshold]")[0])
        assert threshold == recorded[name]["threshold"]
        drifted = sum(bool(c["columns"][name]["drifted"]) for c in checks)
        assert values(column, "[data-testid=drift-column-drifted-count]") == [str(drifted)]
    assert any(c["drift_detected"] for c in checks), "the drift checks found no drift: no drift event to show"

    # validation per batch: eight passed, the bad week failed and quarantined, its failed expectation named
    batches = page.locator("[data-testid=validation-row]")
    assert batches.count() == GOOD_WEEKS + 1
    assert sorted(values(page, "[data-testid=validation-passed]")) == ["false"] + ["true"] * GOOD_WEEKS
    assert values(page, "[data-testid=validation-quarantined-count]") == ["1"]
    bad = page.locator(
        "[data-testid=validation-row]", has=page.locator("[data-testid=validation-passed][data-value=false]")
    )
    assert BAD_WEEK.isoformat() in bad.locator("[data-testid=validation-batch]").inner_text()
    assert "expect_column_pair_values_a_to_be_greater_than_b" in bad.inner_text()
    assert values(bad, "[data-testid=validation-quarantined]")[0].endswith("weather.parquet")


def test_the_train_runs_tab_shows_the_version_it_produced_and_the_gates_verdict(login, ui_airflow, shot):
    page = login("admin")
    page.goto(f"{ui_airflow.url}/dags/{ui_airflow.dag('train')}/runs/train-1/plugin/mlops-run")
    page.locator("[data-testid=mlops-run-tab] [data-testid=run-version]").wait_for()
    shot(page, "train-run-tab")
    index = ui_airflow.index()
    [version] = [v for v, r in index["versions"].items() if r["dag_run_id"] == "train-1"]
    assert values(page, "[data-testid=run-version]") == [version]
    entry = gate_entry(index, version)
    [candidate] = values(page, "[data-testid=run-candidate-score]")
    assert float(candidate) == pytest.approx(entry["candidate_score"], abs=0)
    assert page.locator("[data-testid=run-reason]").inner_text() == entry["reason"]


def test_the_monitor_task_tab_shows_its_drift_report(login, ui_airflow, shot):
    from airflow_mlops.hooks.history import drift_checks

    run_id = ui_airflow.runs["monitor-2"]
    page = login("admin")
    page.goto(
        f"{ui_airflow.url}/dags/{ui_airflow.dag('monitor')}/runs/{run_id}/tasks/drift/plugin/mlops-task"
    )
    tab = page.locator("[data-testid=mlops-task-tab][data-kind=drift]")
    tab.wait_for()
    frame = page.locator("[data-testid=task-report-frame]")
    frame.wait_for()
    # the report is Evidently's HTML, shown in a sandboxed frame
    assert "allow-same-origin" not in (frame.get_attribute("sandbox") or "allow-same-origin")
    page.frame_locator("[data-testid=task-report-frame]").locator("body").wait_for()
    page.wait_for_timeout(1500)  # Evidently draws its plots with its own scripts
    shot(page, "monitor-task-tab")
    [check] = [c for c in drift_checks(MODEL) if c["run_id"] == run_id]
    [shown] = values(page, "[data-testid=task-drift-share]")
    assert float(shown) == check["drift_share"]
    assert values(page, "[data-testid=task-drifted]") == [str(check["drift_detected"]).lower()]


def test_the_validate_task_tab_of_the_quarantined_week_names_the_failed_expectation(login, ui_airflow, shot):
    page = login("viewer")
    run_id = ui_airflow.runs["quarantined"]
    page.goto(
        f"{ui_airflow.url}/dags/{ui_airflow.dag('ingest')}/runs/{run_id}/tasks/validate_batch/plugin/mlops-task"
    )
    page.locator("[data-testid=mlops-task-tab][data-kind=validation]").wait_for()
    page.locator("[data-testid=task-summary]").wait_for()
    shot(page, "validate-task-tab")
    failed = page.locator("[data-testid=task-failed-expectation]").all_inner_texts()
    assert len(failed) == 1 and "expect_column_pair_values_a_to_be_greater_than_b" in failed[0], failed
    assert values(page, "[data-testid=task-passed]") == ["false"]
    assert values(page, "[data-testid=task-quarantined]")[0].endswith("weather.parquet")
