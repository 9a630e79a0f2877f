"""Settings from the [mlops] section, and the errors users get for bad configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_mlops.artifacts import ArtifactStore
from airflow_mlops.config import check_settings, load_settings
from airflow_mlops.exceptions import MLOpsConfigError


def test_defaults_live_under_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.state_dir == tmp_path
    assert settings.artifact_root == f"file://{tmp_path}/artifacts"
    assert settings.offline_root == f"file://{tmp_path}/offline"
    assert settings.landing_root == f"file://{tmp_path}/landing"
    assert settings.artifact_conn_id is None


@pytest.mark.parametrize(
    ("landing", "quarantine"),
    [
        (None, "file://{tmp}/quarantine"),  # the embedded default: beside the landing zone
        ("s3://lake/landing/", "s3://lake/quarantine"),  # on the store the batches landed on
        ("gs://lake", "gs://lake/quarantine"),
        ("file:///srv/in/landing", "file:///srv/in/quarantine"),
    ],
)
def test_failed_batches_are_kept_beside_the_landing_zone(monkeypatch, tmp_path, landing, quarantine):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    if landing:
        monkeypatch.setenv("AIRFLOW__MLOPS__LANDING_ROOT", landing)
    assert load_settings().quarantine == quarantine.format(tmp=tmp_path)
    monkeypatch.setenv("AIRFLOW__MLOPS__QUARANTINE_ROOT", "s3://vault/held/")
    assert load_settings().quarantine == "s3://vault/held"


def test_state_dir_defaults_to_airflow_home(monkeypatch):
    monkeypatch.delenv("AIRFLOW__MLOPS__STATE_DIR")
    assert load_settings().state_dir == Path(os.environ["AIRFLOW_HOME"]) / "mlops"


def test_env_overrides_every_option(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "s3://bucket/prefix/")
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_CONN_ID", "aws_mlops")
    monkeypatch.setenv("AIRFLOW__MLOPS__OFFLINE_ROOT", "gs://warehouse/offline")
    settings = load_settings()
    assert settings.artifact_root == "s3://bucket/prefix"
    assert settings.artifact_scheme == "s3"
    assert settings.artifact_conn_id == "aws_mlops"
    assert settings.offline_root == "gs://warehouse/offline"


@pytest.mark.parametrize("root", ["ftp://host/path", "/no/scheme", "hdfs://cluster/x"])
def test_unknown_artifact_scheme_names_the_setting_and_the_fix(monkeypatch, root):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", root)
    with pytest.raises(MLOpsConfigError) as err:
        load_settings()
    message = str(err.value)
    assert "[mlops] artifact_root" in message
    assert root in message
    assert "AIRFLOW__MLOPS__ARTIFACT_ROOT" in message


def test_relative_state_dir_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", "relative/state")
    with pytest.raises(MLOpsConfigError, match=r"\[mlops\] state_dir must be an absolute path"):
        load_settings()


def test_remote_root_without_connection_id_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "s3://bucket/mlops")
    with pytest.raises(MLOpsConfigError) as err:
        _ = ArtifactStore().settings
    assert "[mlops] artifact_conn_id is not set" in str(err.value)
    assert "'aws'" in str(err.value)


def test_remote_root_with_a_missing_connection_is_refused(monkeypatch, airflow_db):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "gs://bucket/mlops")
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_CONN_ID", "no_such_connection")
    with pytest.raises(MLOpsConfigError) as err:
        check_settings(load_settings())
    assert "'no_such_connection' names no Airflow connection" in str(err.value)
    assert "google_cloud_platform" in str(err.value)


def test_remote_root_with_its_connection_passes(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", "s3://bucket/mlops")
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_CONN_ID", "aws_mlops")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MLOPS", '{"conn_type": "aws"}')
    check_settings(load_settings())


def test_unwritable_state_dir_is_refused(monkeypatch):
    # /proc refuses new folders even to root, as a read-only mount or a foreign volume would.
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", "/proc/airflow-mlops-state")
    with pytest.raises(MLOpsConfigError) as err:
        check_settings(load_settings())
    assert "state_dir '/proc/airflow-mlops-state' is not writable" in str(err.value)
    assert "AIRFLOW__MLOPS__STATE_DIR" in str(err.value)


def test_state_dir_that_cannot_be_created_is_refused(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(blocker / "state"))
    with pytest.raises(MLOpsConfigError) as err:
        check_settings(load_settings())
    assert "[mlops] state_dir" in str(err.value)
    assert "AIRFLOW__MLOPS__STATE_DIR" in str(err.value)


@pytest.mark.parametrize(("raw", "budget"), [("", 1024.0), ("512", 512.0), ("0.5", 0.5)])
def test_the_multi_model_memory_budget_setting(monkeypatch, raw, budget):
    from airflow_mlops.config import load_serving_settings

    monkeypatch.setenv("AIRFLOW__MLOPS__MULTI_MODEL_MEMORY_BUDGET_MB", raw)
    assert load_serving_settings().multi_model_memory_budget_mb == budget


@pytest.mark.parametrize("raw", ["0", "-3", "lots"])
def test_a_bad_multi_model_memory_budget_names_the_setting(monkeypatch, raw):
    from airflow_mlops.config import load_serving_settings

    monkeypatch.setenv("AIRFLOW__MLOPS__MULTI_MODEL_MEMORY_BUDGET_MB", raw)
    with pytest.raises(MLOpsConfigError, match="multi_model_memory_budget_mb") as err:
        load_serving_settings()
    assert "AIRFLOW__MLOPS__MULTI_MODEL_MEMORY_BUDGET_MB" in (err.value.fix or "")
