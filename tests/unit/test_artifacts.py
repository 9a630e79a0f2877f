"""The artifact store: run-scoped URIs, atomic writes, sha256."""

from __future__ import annotations

import hashlib
import json

import pytest

from airflow_mlops.artifacts import ArtifactStore, as_path, safe_segment, sha256_of, staged
from airflow_mlops.config import load_settings
from airflow_mlops.exceptions import ArtifactStoreError


@pytest.fixture
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    return ArtifactStore(load_settings())


def test_run_path_is_scoped_by_dag_run_and_task(store, tmp_path):
    path = store.run_path("flights_train", "manual__2013-01-01T00:00:00+00:00", "tune", "trials.csv")
    assert (
        str(path)
        == f"file://{tmp_path}/artifacts/flights_train/manual__2013-01-01T00-00-00+00-00/tune/trials.csv"
    )


@pytest.mark.parametrize("bad", ["..", "/", "", "../.."])
def test_segments_cannot_escape_the_root(bad):
    with pytest.raises(ArtifactStoreError):
        safe_segment(bad)
    assert "/" not in safe_segment(f"a{bad}b")


def test_write_returns_uri_sha256_and_size(store):
    target = store.run_path("d", "r", "t", "result.json")
    written = store.write_json(target, {"rows": 842})
    data = as_path(written.uri).read_bytes()
    assert json.loads(data) == {"rows": 842}
    assert written.sha256 == hashlib.sha256(data).hexdigest() == sha256_of(as_path(written.uri))
    assert written.size == len(data)
    assert store.read_json(written.uri) == {"rows": 842}


def test_a_failed_write_leaves_the_previous_version_and_no_temp_file(store):
    target = store.run_path("d", "r", "t", "model.bin")
    store.write_bytes(target, b"version 1")
    with pytest.raises(RuntimeError), staged(target) as tmp:
        tmp.write_bytes(b"half of version")
        raise RuntimeError("worker killed mid-write")
    assert target.read_bytes() == b"version 1"
    assert [p.name for p in target.parent.iterdir()] == ["model.bin"]


def test_readers_never_see_a_partial_file(store):
    target = store.run_path("d", "r", "t", "big.bin")
    with staged(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
        assert not target.exists(), "the target must not appear before the write completes"
    assert target.read_bytes() == b"x" * 1000


def test_a_writer_that_writes_nothing_is_an_error(store):
    target = store.run_path("d", "r", "t", "empty")
    with pytest.raises(ArtifactStoreError, match="nothing was written"), staged(target):
        pass
    assert not target.exists()
