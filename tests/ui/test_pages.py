"""The lifecycle's pages in Airflow's UI, in headless Chromium, for an admin and a viewer (issue 15)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ui, pytest.mark.system]


@pytest.mark.parametrize("user", ["admin", "viewer"])
def test_a_user_logs_in_through_airflows_login_page(login, ui_airflow, shot, user):
    page = login(user)
    assert "/auth/login" not in page.url
    # the session's token lets the browser read Airflow's REST API as that user
    answer = page.request.get(f"{ui_airflow.url}/api/v2/dags/{ui_airflow.dag('train')}")
    assert answer.status == 200, answer.text()
    shot(page, "home")
