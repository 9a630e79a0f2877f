"""S3 credentials that stop working in the middle of an artifact upload.

A real S3 API on this machine (moto's server, in a thread), reached the way a deployment reaches S3: an
``aws`` Airflow connection with an ``endpoint_url``, through the Amazon provider's s3fs file system and
:class:`~airflow_mlops.artifacts.ArtifactStore`. The server starts refusing the connection's credentials
(moto's ``/moto-api/reset-auth``: requests are then authenticated, and the key is unknown to its IAM) right
before the second part of a multipart upload, and accepts them again after that part was refused, as
credentials refreshed after they expired would be.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from s3_server import moto_s3

from airflow_mlops.artifacts import ArtifactStore
from airflow_mlops.config import MLOpsSettings
from airflow_mlops.exceptions import MLOpsError

pytestmark = [pytest.mark.faults, pytest.mark.integration]

BUCKET = "faults-artifacts"
CONN = "aws_faults"
PART = 5 * 2**20  # S3's smallest multipart part


@pytest.fixture(scope="module")
def s3():
    with moto_s3([BUCKET]) as url:
        try:
            yield url
        finally:
            httpx.post(f"{url}/moto-api/reset-auth", content=b"inf")


def test_s3_credentials_expire_mid_upload(s3, tmp_path, monkeypatch, fault):
    """S3 refuses the credentials in the middle of a multipart upload of an artifact, then accepts them again.

    The write fails with an error; the artifact's previous version stays in place, whole: no reader ever
    gets a truncated object, and no half-written object is left under the artifact root.
    """
    import s3fs

    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN.upper()}",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIAFAULTS",
                "password": "faults",
                "extra": {"endpoint_url": s3, "region_name": "us-east-1"},
            }
        ),
    )
    # parts of 5 MiB (s3fs' default is 50 MiB), so an artifact of 12 MiB is a multipart upload
    monkeypatch.setattr(s3fs.S3FileSystem, "default_block_size", PART)
    store = ArtifactStore(
        MLOpsSettings(
            state_dir=tmp_path,
            artifact_root=f"s3://{BUCKET}/artifacts",
            artifact_conn_id=CONN,
            offline_root=f"file://{tmp_path}/offline",
            landing_root=f"file://{tmp_path}/landing",
        )
    )
    target = store.run_path("faults", "run1", "train", "model.bin")
    old = bytes(range(256)) * (12 * 2**20 // 256)
    new = bytes(reversed(range(256))) * (12 * 2**20 // 256)
    store.write_bytes(target, old)

    real_upload = s3fs.core.S3File._upload_chunk
    calls: list[bool] = []

    def upload(self, final=False):
        calls.append(final)
        if len(calls) == 2:  # the first part went through: the credentials expire
            httpx.post(f"{s3}/moto-api/reset-auth", content=b"0").raise_for_status()
        try:
            return real_upload(self, final)
        finally:
            if len(calls) == 2:  # refused once; the refreshed credentials work again
                httpx.post(f"{s3}/moto-api/reset-auth", content=b"inf").raise_for_status()

    monkeypatch.setattr(s3fs.core.S3File, "_upload_chunk", upload)
    with pytest.raises(Exception) as failed:
        store.write_bytes(target, new)
    monkeypatch.setattr(s3fs.core.S3File, "_upload_chunk", real_upload)

    stored = target.read_bytes() if target.exists() else None
    digest = hashlib.sha256(stored).hexdigest() if stored is not None else None
    state = (
        "none"
        if stored is None
        else "old"
        if stored == old
        else "new"
        if stored == new
        else f"PARTIAL ({len(stored)} of {len(new)} bytes)"
    )
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    fault(
        lost=0 if state in ("old", "none") else 1,
        unit="objects corrupted",
        detail=f"write raised {type(failed.value).__name__}; the object after it: {state}; other keys {leftovers}",
        sha256=digest,
    )
    assert len(calls) >= 2, "the upload was not a multipart upload"
    assert state == "old", f"the artifact is {state} after the failed write"
    assert leftovers == []
    assert isinstance(failed.value, MLOpsError), f"{type(failed.value).__name__}: {failed.value}"
    # the retry of the task writes the new version whole, and only it
    store.write_bytes(target, new)
    assert target.read_bytes() == new
    assert [p.name for p in target.parent.iterdir()] == [target.name]
