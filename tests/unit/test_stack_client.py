"""The demo's REST client: an error answer is raised at once, with the answer and what the server logged."""

from __future__ import annotations

import httpx
import pytest

from airflow_mlops.demo.stack import AirflowClient, AirflowStack, AirflowStackError

# what Airflow 3's API server answers when SQLAlchemy raised
DATABASE_ERROR = {
    "detail": {
        "reason": "Database error",
        "statement": "hidden",
        "orig_error": "hidden",
        "message": "Serious error when handling your request. Check logs for more details",
    }
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


@pytest.mark.parametrize(
    "status, body",
    [
        (500, DATABASE_ERROR),
        (500, {"detail": "An error occurred while trying to deserialize Dag"}),
        (409, {"detail": {"reason": "Unique constraint violation"}}),
        (404, {"detail": "Asset with ID: `3` was not found"}),
    ],
)
def test_an_error_answer_is_raised_at_once_with_the_answer_and_never_sent_again(status, body):
    """On PostgreSQL nothing is refused for a lock: the client retries nothing (it did on SQLite)."""
    client, received = _client([(status, body), (200, {"id": 7})])
    with pytest.raises(AirflowStackError, match=f"answered {status}") as err:
        client.request("POST", "/assets/events", json={"asset_id": 3})
    assert len(received) == 1
    detail = body["detail"]
    assert (detail["reason"] if isinstance(detail, dict) else detail) in str(err.value)


def test_an_error_answer_comes_with_what_the_api_server_logged_about_it(tmp_path):
    answer = dict(DATABASE_ERROR)
    answer["detail"] = {**DATABASE_ERROR["detail"], "message": "... when you look for ID i402q4d5"}
    (tmp_path / "standalone.log").write_text(
        "api-server | INFO: 127.0.0.1 GET /api/v2/dags 200\n"
        "api-server | ERROR Error with id i402q4d5\n"
        "api-server | Traceback (most recent call last):\n"
        "api-server | psycopg2.errors.UniqueViolation: duplicate key value\n"
    )
    airflow = AirflowStack(home=tmp_path, logs=tmp_path, standalone=True)
    client, _ = _client([(409, answer)])
    client.explain_error = airflow.api_server_error
    with pytest.raises(AirflowStackError, match="(?s)answered 409.*i402q4d5.*UniqueViolation"):
        client.request("POST", "/assets/events", json={"asset_id": 3})
    assert airflow.api_server_error('{"detail": "no id here"}') == ""


def test_the_demo_runs_its_components_on_the_database_it_is_given_with_the_task_libraries_preloaded(tmp_path):
    url = "postgresql+psycopg2://airflow@/airflow?host=/x/socket&port=5432"
    env = AirflowStack(home=tmp_path, logs=tmp_path, port=8080, database=url, preload=True).environment()
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == url
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in env
    assert env["AIRFLOW__SCHEDULER__MP_START_METHOD"] == "forkserver"
    assert env["AIRFLOW__CORE__MP_FORKSERVER_PRELOAD"] == "airflow_mlops.preload"
