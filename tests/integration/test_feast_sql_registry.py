"""Feast's registry shared by workers through the ``feast`` connection: apply on one worker (its own
``state_dir``), materialize and read on another, with the SQL registry on the suite's real PostgreSQL and
the online store on the session's Redis. With the repository's file registry the second worker sees no
feature views (what the scaled topology found, docs/scaling.md)."""

from __future__ import annotations

import json

import pytest

from airflow_mlops.exceptions import FeatureRepoError
from airflow_mlops.hooks.feast import FeastHook

pytestmark = pytest.mark.integration

VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
ROWS = [{"origin": "JFK", "carrier": "B6", "tailnum": "N594JB"}]


@pytest.fixture
def shared_feast(feast_env, postgres_url, redis_server, monkeypatch) -> str:
    """Connections ``feast_shared`` (Redis online store, SQL registry) and ``feast_registry_pg``."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_REGISTRY_PG",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": url.host,
                "port": url.port,
                "schema": url.database,
                "login": url.username,
                "password": url.password,
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_SHARED",
        json.dumps(
            {
                "conn_type": "feast",
                "host": redis_server["host"],
                "port": redis_server["port"],
                "password": redis_server["password"],
                "extra": {
                    "repo_path": str(feast_env.repo),
                    "online_store_type": "redis",
                    "registry_conn_id": "feast_registry_pg",
                },
            }
        ),
    )
    return "feast_shared"


def _on_worker(monkeypatch, folder) -> None:
    """A worker of its own: the Feast folder (file registry, SQLite online store) is in its state_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("MLOPS_FEAST_DIR", str(folder))


def test_views_applied_on_one_worker_are_materialized_and_read_on_another(
    shared_feast, feast_env, postgres_server, redis_server, tmp_path, monkeypatch, caplog
):
    from airflow_mlops.operators.features import parse_timestamp

    start = parse_timestamp("2013-01-01T00:00:00+00:00", "test")
    end = parse_timestamp("2013-02-01T00:00:00+00:00", "test")

    # the repository's own file registry: worker B does not see what worker A applied
    _on_worker(monkeypatch, tmp_path / "a-file")
    assert FeastHook(repo_path=str(feast_env.repo)).apply()["feature_views"] == VIEWS
    _on_worker(monkeypatch, tmp_path / "b-file")
    with pytest.raises(FeatureRepoError, match="registered: none"):
        FeastHook(repo_path=str(feast_env.repo)).feature_views(VIEWS)

    # the connection's SQL registry: one registry for both
    redis_server["client"].flushall()
    with caplog.at_level("DEBUG"):
        _on_worker(monkeypatch, tmp_path / "a")
        applied = FeastHook(feast_conn_id=shared_feast).apply()
        assert applied["feature_views"] == VIEWS and applied["changes"] > 0

        _on_worker(monkeypatch, tmp_path / "b")
        worker_b = FeastHook(feast_conn_id=shared_feast)
        assert [v.name for v in worker_b.feature_views()] == VIEWS
        assert worker_b.apply()["changes"] == 0, "worker B saw a different registry than A wrote"
        rows = worker_b.materialize(start, end, VIEWS)
        assert rows["carrier_daily"] > 0 and rows["weather_hourly"] == 3

        _on_worker(monkeypatch, tmp_path / "a")
        values = FeastHook(feast_conn_id=shared_feast).online_features("delay_model", ROWS)
    assert values["weather_hourly__temp"][0] is not None and values["plane__seats"][0] is not None
    for worker in ("a", "b"):
        assert not (tmp_path / worker / "registry.db").exists(), "a file registry was written"
    assert postgres_server.password not in caplog.text


def _open_registry(conn_id: str, start, errors) -> None:
    start.wait()
    try:
        FeastHook(feast_conn_id=conn_id).store  # noqa: B018 - opens the SQL registry, creating its tables
    except BaseException as err:
        errors.put(f"{type(err).__name__}: {err}"[:2000])


def test_workers_opening_a_new_registry_at_the_same_time_all_open_it(shared_feast, feast_env, tmp_path):
    """Feast's SQL registry creates its tables at first use; several workers opening a new one at once (the
    scaled topology's hosts did) raced on ``CREATE TABLE`` and one failed with PostgreSQL's
    ``UniqueViolation``. Six processes (forked: Feast already imported) open it at once: each opens it."""
    import multiprocessing

    import feast  # noqa: F401 - imported before the fork, so the processes start at once

    context = multiprocessing.get_context("fork")
    start, errors = context.Barrier(6), context.Queue()
    processes = [context.Process(target=_open_registry, args=(shared_feast, start, errors)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == [] and [p.exitcode for p in processes] == [0] * 6, found
    assert FeastHook(feast_conn_id=shared_feast).store.list_feature_views() == []
