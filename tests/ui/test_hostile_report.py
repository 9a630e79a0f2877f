"""A report whose content breaks out of its own script (``</script><script>``) runs no script against
Airflow (issue 15, "Safe pages").

The drift report a monitor task wrote is given a payload, as a data value that reached Evidently's
embedded JSON would: ``"</script><script>...``. The payload marks its own document (so the test sees it
ran), then tries what a hostile report would: write into the page around it, read Airflow's storage, and
pause a DAG through Airflow's REST API with the user's cookie. The report is opened where users open it:
in the monitor task's "MLOps Report" tab (a frame) and on its own in a tab. Nothing of it may reach Airflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import MODEL

pytestmark = [pytest.mark.ui, pytest.mark.system]

PAYLOAD = """<script>var injected = "</script><script>
document.documentElement.setAttribute("data-injected-ran", "1");
try { window.parent.document.body.setAttribute("data-pwned", "parent"); } catch (e) {}
try { window.top.document.title = "pwned"; } catch (e) {}
try { window.parent.localStorage.setItem("pwned", "1"); } catch (e) {}
try { localStorage.setItem("pwned", "1"); } catch (e) {}
fetch("/api/v2/dags/{dag}", {method: "PATCH", credentials: "include",
  headers: {"Content-Type": "application/json"}, body: JSON.stringify({is_paused: true})}).catch(() => {});
</script>"""


@pytest.fixture
def hostile_report(ui_airflow):
    """The drift report of the last monitor run with the payload in it (restored afterwards)."""
    from airflow_mlops.hooks.history import drift_checks

    run_id = ui_airflow.runs["monitor-2"]
    [check] = [c for c in drift_checks(MODEL) if c["run_id"] == run_id]
    path = Path(check["report_uri"].removeprefix("file://"))
    original = path.read_bytes()
    text = original.decode()
    at = text.rfind("</body>")
    payload = PAYLOAD.replace("{dag}", ui_airflow.dag("ingest"))
    path.write_text(text[:at] + payload + text[at:] if at >= 0 else text + payload)
    try:
        yield run_id, path
    finally:
        path.write_bytes(original)


def assert_nothing_reached_airflow(page, ui_airflow) -> None:
    page.wait_for_timeout(2000)  # the payload's fetch, had it been sent
    assert page.evaluate("document.body.getAttribute('data-pwned')") is None
    assert page.title() != "pwned"
    assert page.evaluate("localStorage.getItem('pwned')") is None
    assert ui_airflow.client.dag(ui_airflow.dag("ingest"))["is_paused"] is False


def test_a_report_breaking_out_of_its_script_runs_nothing_against_airflow(
    login, ui_airflow, shot, hostile_report
):
    run_id, path = hostile_report
    page = login("admin")

    # in the task's tab: the report's scripts run only inside the sandboxed frame
    page.goto(
        f"{ui_airflow.url}/dags/{ui_airflow.dag('monitor')}/runs/{run_id}/tasks/drift/plugin/mlops-task"
    )
    frame = page.frame_locator("[data-testid=task-report-frame]")
    frame.locator("html[data-injected-ran='1']").wait_for()  # the payload did run, in its own document
    shot(page, "hostile-report-in-tab")
    assert_nothing_reached_airflow(page, ui_airflow)

    # on its own, at the URL the tab's link opens: served sandboxed, as an opaque origin
    report_url = page.locator("[data-testid=task-report-link]").get_attribute("href")
    answer = page.goto(
        report_url if report_url.startswith("http") else f"{ui_airflow.url}/{report_url.lstrip('/')}"
    )
    headers = answer.headers
    assert "sandbox" in headers["content-security-policy"]
    assert "allow-same-origin" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    page.locator("html[data-injected-ran='1']").wait_for()
    shot(page, "hostile-report-alone")
    page.wait_for_timeout(2000)
    assert page.evaluate("window.origin") == "null"  # an opaque origin: no cookie, no storage of Airflow's
    assert ui_airflow.client.dag(ui_airflow.dag("ingest"))["is_paused"] is False
    page.goto(f"{ui_airflow.url}/")
    assert page.evaluate("localStorage.getItem('pwned')") is None
