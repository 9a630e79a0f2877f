"""The same operators against a real Redis server (password protected), chosen by the Airflow
connection only: materialize, read back, rerun without duplicates, and test_connection."""

from __future__ import annotations

import json

import pytest

from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.operators.features import FeastMaterializeOperator

pytestmark = pytest.mark.integration

START, END = "2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00"
VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
ROWS = [
    {"origin": o, "carrier": c, "tailnum": t}
    for o, c, t in [("JFK", "B6", "N594JB"), ("EWR", "UA", "N14228")]
]


@pytest.fixture
def redis_conn(feast_env, redis_server, monkeypatch):
    """A ``feast`` connection (from the environment, as a secrets backend would give it) that switches
    the repository's online store to the session's Redis."""
    conn = {
        "conn_type": "feast",
        "host": redis_server["host"],
        "port": redis_server["port"],
        "password": redis_server["password"],
        "extra": {"repo_path": str(feast_env.repo), "online_store_type": "redis"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_REDIS", json.dumps(conn))
    return "feast_redis"


def _materialize(conn_id: str, task_context) -> dict:
    context = task_context("materialize")
    context["outlet_events"] = {}
    operator = FeastMaterializeOperator(
        task_id="materialize", feast_conn_id=conn_id, start=START, end=END, feature_views=VIEWS, outlets=[]
    )
    operator.outlets = []  # the Asset events are checked with SQLite; here only the store matters
    return operator.execute(context)


def test_materialize_and_read_through_redis_gives_the_values_sqlite_gives(
    redis_conn, redis_server, task_context, feast_env
):
    client = redis_server["client"]
    client.flushall()
    result = _materialize(redis_conn, task_context)
    assert result["online_store"] == "redis"
    keys = client.dbsize()
    # one Redis hash per entity key, holding the fields of every view keyed by it: weather_hourly and
    # origin_daily share the three origins
    rows = result["rows"]
    assert rows["weather_hourly"] == rows["origin_daily"] == 3
    assert keys == rows["carrier_daily"] + rows["plane"] + 3

    via_redis = FeastHook(feast_conn_id=redis_conn).online_features("delay_model", ROWS)
    sqlite = FeastHook(repo_path=str(feast_env.repo))
    sqlite.materialize(*(sqlite_dt(v) for v in (START, END)), VIEWS)
    via_sqlite = sqlite.online_features("delay_model", ROWS)
    assert via_redis == via_sqlite
    assert via_redis["weather_hourly__temp"][0] is not None and via_redis["plane__seats"][1] == 149

    again = _materialize(redis_conn, task_context)
    assert again["rows"] == result["rows"]
    assert client.dbsize() == keys, "a rerun added keys"
    assert FeastHook(feast_conn_id=redis_conn).online_features("delay_model", ROWS) == via_redis


def sqlite_dt(value: str):
    from airflow_mlops.operators.features import parse_timestamp

    return parse_timestamp(value, "test")


def test_test_connection_reaches_redis_and_never_shows_the_password(
    redis_conn, redis_server, monkeypatch, feast_env
):
    ok, message = FeastHook(feast_conn_id=redis_conn).test_connection()
    assert ok, message
    assert "redis online store reachable" in message and "4 feature views" in message

    wrong = {
        "conn_type": "feast",
        "host": redis_server["host"],
        "port": redis_server["port"],
        "password": "not-the-password-123",
        "extra": {"repo_path": str(feast_env.repo), "online_store_type": "redis"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_WRONG", json.dumps(wrong))
    ok, message = FeastHook(feast_conn_id="feast_wrong").test_connection()
    assert not ok
    assert "not-the-password-123" not in message
    assert "invalid" in message.lower() or "auth" in message.lower() or "password" in message.lower()
