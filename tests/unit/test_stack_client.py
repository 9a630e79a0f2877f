"""The demo's REST client sends again what the API server's database refused, and nothing else."""

from __future__ import annotations

import json

import httpx
import pytest

from airflow_mlops.demo import stack
from airflow_mlops.demo.stack import AirflowClient, AirflowStack, AirflowStackError

# what Airflow 3's API server answers when SQLAlchemy raised (e.g. SQLite's "database is locked")
DATABASE_ERROR = {
    "detail": {
        "reason": "Database error",
        "statement": "hidden",
        "orig_error": "hidden",
        "message": "Serious error when handling your request. Check logs for more details",
    }
}
BACKFILL_LOCKED = {
    "detail": "Database is locked. Backfill creation is not supported on SQLite under concurrent access."
}


def _client(answers: list[tuple[int, dict]]) -> tuple[AirflowClient, list[httpx.Request]]:
    """A client whose API server gives ``answers`` in turn; returns it with the requests it received."""
    received: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        received.append(request)
        status, body = answers[min(len(received), len(answers)) - 1]
        return httpx.Response(status, json=body)

    client = AirflowClient("http://airflow.test/api/v2")
    client.__dict__["_http"] = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(handle))
    return client, received


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(stack, "DATABASE_RETRY_INTERVAL", 0.0)


def test_an_asset_event_the_database_refused_is_posted_again_until_it_is_stored():
    client, received = _client([(500, DATABASE_ERROR), (500, DATABASE_ERROR), (200, {"id": 7})])
    event = client.request("POST", "/assets/events", json={"asset_id": 3, "extra": {"event_id": "e1"}})
    assert event == {"id": 7}
    assert len(received) == 3
    assert {json.loads(r.content)["extra"]["event_id"] for r in received} == {"e1"}


def test_a_backfill_refused_as_locked_is_created_on_a_later_attempt():
    client, received = _client([(503, BACKFILL_LOCKED), (200, {"id": 1, "dag_id": "d"})])
    assert client.backfill("d", "2013-01-01", "2013-01-31")["id"] == 1
    assert 2 <= len(received) <= 7


@pytest.mark.parametrize(
    "status, body",
    [
        (500, {"detail": "An error occurred while trying to deserialize Dag"}),
        (409, {"detail": {"reason": "Unique constraint violation"}}),
        (404, {"detail": "Asset with ID: `3` was not found"}),
    ],
)
def test_any_other_error_is_raised_at_once_with_the_answer(status, body):
    client, received = _client([(status, body), (200, {"id": 7})])
    with pytest.raises(AirflowStackError, match=f"answered {status}") as err:
        client.request("POST", "/assets/events", json={"asset_id": 3})
    assert len(received) == 1
    detail = body["detail"]
    assert (detail["reason"] if isinstance(detail, dict) else detail) in str(err.value)


def test_a_database_that_keeps_refusing_fails_after_the_retry_window(monkeypatch):
    monkeypatch.setattr(stack, "DATABASE_RETRY_SECONDS", 0.5)
    monkeypatch.setattr(stack, "DATABASE_RETRY_INTERVAL", 0.1)
    client, received = _client([(500, DATABASE_ERROR)])
    with pytest.raises(AirflowStackError, match="answered 500.*Database error"):
        client.request("POST", "/assets/events", json={"asset_id": 3})
    assert 2 <= len(received) <= 7


def test_an_error_answer_comes_with_what_the_api_server_logged_about_it(tmp_path):
    answer = dict(DATABASE_ERROR)
    answer["detail"] = {**DATABASE_ERROR["detail"], "message": "... when you look for ID i402q4d5"}
    (tmp_path / "api-server.log").write_text(
        "INFO: 127.0.0.1 GET /api/v2/dags 200\n"
        "ERROR Error with id i402q4d5\n"
        "Traceback (most recent call last):\n"
        "sqlite3.OperationalError: database is locked\n"
    )
    airflow = AirflowStack(home=tmp_path, logs=tmp_path)
    client, _ = _client([(409, answer)])
    client.explain_error = airflow.api_server_error
    with pytest.raises(AirflowStackError, match="(?s)answered 409.*i402q4d5.*database is locked"):
        client.request("POST", "/assets/events", json={"asset_id": 3})
    assert airflow.api_server_error('{"detail": "no id here"}') == ""


def test_tasks_wait_longer_for_the_api_server_than_it_may_wait_for_the_database_lock(tmp_path):
    env = AirflowStack(home=tmp_path, logs=tmp_path, port=8080).environment()
    assert float(env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"]) > stack.SQLITE_CONNECT_ARGS["timeout"]
