"""Tune's experiment storage on an object store: ``airflow_mlops.ml.search`` reaches the artifact store
through its Airflow connection (``s3://<conn_id>@bucket/...``, as ``ObjectStoragePath`` writes the URI), as
every other reader of the artifact store does, not through pyarrow's own S3 client, which took the
connection id for an access key and knew no endpoint (found by the scaled topology's tuning on moto:
``AWS Error ACCESS_DENIED during PutObject``)."""

from __future__ import annotations

import hashlib
import json

import pytest

BUCKET = "mlops"


@pytest.fixture
def s3_conn(monkeypatch):
    """A moto S3 server known only through the connection ``mlops_s3`` (no AWS SDK variables)."""
    from s3_server import ACCESS_KEY, SECRET_KEY, moto_s3

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with moto_s3([BUCKET]) as url:
        monkeypatch.setenv(
            "AIRFLOW_CONN_MLOPS_S3",
            json.dumps(
                {
                    "conn_type": "aws",
                    "login": ACCESS_KEY,
                    "password": SECRET_KEY,
                    "extra": {"endpoint_url": url, "region_name": "us-east-1"},
                }
            ),
        )
        yield url


def test_the_experiment_storage_goes_through_the_artifact_stores_connection(s3_conn):
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.ml import search

    experiment = str(as_path(f"s3://{BUCKET}/artifacts/tune/experiment", conn_id="mlops_s3"))
    assert experiment.startswith("s3://mlops_s3@")
    fs, root = search._fs(experiment)
    fs.create_dir(root)
    with fs.open_output_stream(f"{root}/tuner.pkl") as out:
        out.write(b"state")
    # Tune's files are where the artifact store (the same connection) reads them, and _stored_files sees them
    assert as_path(f"{experiment}/tuner.pkl").read_bytes() == b"state"
    assert search._stored_files(experiment) == {"tuner.pkl": hashlib.sha256(b"state").hexdigest()}


def test_a_local_experiment_stays_on_pyarrows_local_filesystem(tmp_path):
    import pyarrow.fs as pafs

    from airflow_mlops.ml import search

    fs, root = search._fs(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and root == str(tmp_path)
