"""Feast's offline store on S3 (a real moto server): the same feature data written by the project's own
writers under ``s3://`` and under a local folder give the same apply, the same online values after
materialization and the same point-in-time training set.

Feast's DuckDB offline store reads ``s3://`` through DuckDB's httpfs extension, which it downloads at
first use; there is no internet here, so this test also proves nothing is downloaded."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from airflow_mlops.config import MLOpsSettings

pytestmark = pytest.mark.integration

FIRST_DAY, LAST_STATS_DAY, LAST_FLIGHT_DAY = "2013-01-01", "2013-01-10", "2013-01-12"
START, END = "2013-01-01T00:00:00+00:00", "2013-01-11T00:00:00+00:00"
BUCKET = "mlops"
VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]


def _context(task_id: str) -> dict:
    return {
        "ti": SimpleNamespace(dag_id="feast_s3", run_id="s3", task_id=task_id),
        "outlet_events": _Events(),
    }


class _Events(dict):
    def __missing__(self, key):
        self[key] = event = SimpleNamespace(extra=None)
        return event


def _write_feature_data(root: str, state: Path) -> MLOpsSettings:
    """What the ingest and features DAGs write, by the project's writers: land the demo data, publish
    the flights days, snapshot weather and planes, compute the daily statistics and labelled flights."""
    from flights_features import FlightDailyStatsOperator  # dags/, on sys.path (tests/mlops_testing.py)

    from airflow_mlops.artifacts import as_path, staged
    from airflow_mlops.demo.data import land
    from airflow_mlops.operators.features import FeatureSourceSnapshotOperator

    settings = MLOpsSettings(
        state_dir=state,
        artifact_root=f"file://{state}/artifacts",
        artifact_conn_id=None,
        offline_root=f"{root}/offline",
        landing_root=f"{root}/landing",
    )
    land(settings, start=FIRST_DAY, end=LAST_FLIGHT_DAY)
    for day in sorted(as_path(f"{root}/landing/flights").iterdir(), key=str):
        with staged(as_path(f"{root}/offline/flights/{day.name}/part-0.parquet")) as part:
            part.write_bytes((day / "flights.parquet").read_bytes())
    offline = settings.offline_root
    FeatureSourceSnapshotOperator(
        task_id="weather",
        source_uri=f"{root}/landing/weather/weather.parquet",
        table="weather",
        timestamp_column="time_hour",
        columns=["origin", "temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
        + ["time_hour"],
        offline_root=offline,
    ).execute(_context("weather"))
    FeatureSourceSnapshotOperator(
        task_id="planes",
        source_uri=f"{root}/landing/planes/planes.parquet",
        table="planes",
        as_of="2013-01-01T00:00:00+00:00",
        rename={"year": "year_built"},
        columns=["tailnum", "year_built", "engines", "seats", "type"],
        offline_root=offline,
    ).execute(_context("planes"))
    FlightDailyStatsOperator(
        task_id="stats", start_day=FIRST_DAY, end_day=LAST_STATS_DAY, offline_root=offline
    ).execute(_context("stats"))
    return settings


def _online_rows(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        return {
            t.split("_", 1)[1]: sorted(
                con.execute(f'select entity_key, feature_name, value, event_ts from "{t}"')
            )
            for t in tables
        }


def _features_run(settings: MLOpsSettings, monkeypatch) -> SimpleNamespace:
    """apply, materialize and build the training set from ``settings``' offline store, as the DAGs do."""
    from mlops_testing import ROOT

    FEATURE_REPO = ROOT / "feature_repo"

    from airflow_mlops.operators.features import (
        FeastApplyOperator,
        FeastMaterializeOperator,
        FeastTrainingDatasetOperator,
    )

    feast_dir = settings.state_dir / "feast"
    monkeypatch.setenv("MLOPS_FEAST_DIR", str(feast_dir))
    monkeypatch.setenv("MLOPS_OFFLINE_ROOT", settings.offline_root)
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", settings.artifact_root)
    repo = str(FEATURE_REPO)
    applied = FeastApplyOperator(task_id="apply", repo_path=repo).execute(_context("apply"))
    materialized = FeastMaterializeOperator(
        task_id="materialize", repo_path=repo, start=START, end=END, feature_views=VIEWS
    ).execute(_context("materialize"))
    manifest = FeastTrainingDatasetOperator(
        task_id="training_set",
        repo_path=repo,
        entity_uri=f"{settings.offline_root}/flights_labelled",
        feature_service="delay_model",
        label_column="delayed",
        start=START,
        end=END,
    ).execute(_context("training_set"))
    frame = pd.read_parquet(manifest["data_uri"].removeprefix("file://"))
    return SimpleNamespace(
        applied=applied,
        rows=materialized["rows"],
        online=_online_rows(feast_dir / "online_store.db"),
        frame=frame,
        manifest=manifest,
    )


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server and the AWS SDK variables every Airflow component gets in the scaled topology."""
    from s3_server import ACCESS_KEY, SECRET_KEY, moto_s3

    with moto_s3([BUCKET]) as url, pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": url,
        }.items():
            env.setenv(key, value)
        yield url


def test_features_from_s3_equal_the_same_from_a_local_folder(s3_env, tmp_path, monkeypatch):
    local = _features_run(
        _write_feature_data(f"file://{tmp_path / 'local'}", tmp_path / "local"), monkeypatch
    )
    remote_settings = _write_feature_data(f"s3://{BUCKET}/scaled", tmp_path / "remote")
    assert not (tmp_path / "remote" / "offline").exists(), "the S3 run wrote its offline store locally"
    remote = _features_run(remote_settings, monkeypatch)

    assert remote.applied["feature_views"] == local.applied["feature_views"] == VIEWS
    assert remote.rows == local.rows
    assert remote.rows["weather_hourly"] == 3 and remote.rows["carrier_daily"] > 10
    assert remote.online == local.online
    assert {view: len({key for key, *_ in rows}) for view, rows in remote.online.items()} == remote.rows
    assert len(remote.frame) == local.manifest["rows"] > 1000
    pd.testing.assert_frame_equal(remote.frame, local.frame)
    # the joined features are there, not only the entity rows
    assert remote.frame["weather_hourly__temp"].notna().mean() > 0.9
    assert remote.frame["carrier_daily__flights_7d"].notna().mean() > 0.9


def _materialized(settings: MLOpsSettings, feast_dir: Path, extra: dict, monkeypatch) -> dict:
    """apply and materialize ``settings``' offline store through a ``feast`` connection with ``extra``."""
    import json

    from mlops_testing import ROOT

    FEATURE_REPO = ROOT / "feature_repo"

    from airflow_mlops.operators.features import FeastApplyOperator, FeastMaterializeOperator

    monkeypatch.setenv("MLOPS_FEAST_DIR", str(feast_dir))
    monkeypatch.setenv("MLOPS_OFFLINE_ROOT", settings.offline_root)
    conn = {"conn_type": "feast", "extra": {"repo_path": str(FEATURE_REPO), **extra}}
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_S3", json.dumps(conn))
    FeastApplyOperator(task_id="apply", feast_conn_id="feast_s3").execute(_context("apply"))
    FeastMaterializeOperator(
        task_id="materialize", feast_conn_id="feast_s3", start=START, end=END, feature_views=VIEWS
    ).execute(_context("materialize"))
    return _online_rows(feast_dir / "online_store.db")


def test_the_ray_engine_materializes_from_the_s3_offline_store(s3_env, ray_cluster, tmp_path, monkeypatch):
    # the task reads the source (through fsspec); the cluster's workers only write the online store
    settings = _write_feature_data(f"s3://{BUCKET}/ray", tmp_path / "remote")
    local = _materialized(settings, tmp_path / "local-engine", {}, monkeypatch)
    on_ray = _materialized(settings, tmp_path / "ray-engine", {"batch_engine": "ray"}, monkeypatch)
    assert sorted(on_ray) == VIEWS and all(on_ray.values())
    assert on_ray == local
