"""The artifact store: run-scoped URIs and atomic writes on ``ObjectStoragePath``.

Every task writes what it produces (reports, models, data sets) under
``<artifact_root>/<dag_id>/<run_id>/<task_id>/<name>``; only the URI and a little metadata travel
through XCom. A write is atomic: the bytes go to a hidden temporary file (``.<name>.tmp-<id>``) in the
same folder, which is renamed over the target when complete (on object stores, S3 and GCS, the rename is
a server-side copy, which publishes the object whole). No reader ever sees a half-written file, and a failed write
leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_mlops.config import MLOpsSettings, check_settings, load_settings
from airflow_mlops.exceptions import ArtifactStoreError, MLOpsError, MLOpsInputError

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_CHUNK = 1 << 20


def safe_segment(value: str) -> str:
    """Turn a DAG id, run id or task id into one path segment (``manual__2013-01-01T00:00:00+00:00``
    becomes ``manual__2013-01-01T00-00-00+00-00``)."""
    cleaned = _UNSAFE.sub("-", value.replace(":", "-")).strip("-.")
    if not cleaned:
        raise ArtifactStoreError(
            f"{value!r} cannot be used as an artifact path segment.",
            fix="use ids made of letters, digits, '.', '_' or '-'.",
        )
    return cleaned


@dataclass(frozen=True)
class Artifact:
    """What was written: where, its sha256 and its size in bytes. ``to_dict()`` is XCom-safe."""

    uri: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: ObjectStoragePath | Path) -> str:
    """sha256 of a file on any file system, streamed."""
    digest = hashlib.sha256()
    with reaching(path), path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def as_path(uri: str | os.PathLike[str], conn_id: str | None = None) -> ObjectStoragePath:
    """An ``ObjectStoragePath`` for a URI or a local path (plain paths become ``file://``)."""
    from airflow.sdk import ObjectStoragePath

    text = os.fspath(uri)
    if "://" not in text:
        text = "file://" + os.path.abspath(text)
    return ObjectStoragePath(text, conn_id=conn_id)


def is_local(path: ObjectStoragePath) -> bool:
    return path.protocol in ("file", "local", "")


class ArtifactStore:
    """Run-scoped artifact locations under ``[mlops] artifact_root`` and atomic writes to them.

    :param settings: settings to use; read from the ``[mlops]`` section when omitted.
    """

    def __init__(self, settings: MLOpsSettings | None = None) -> None:
        self._given_settings = settings

    @cached_property
    def settings(self) -> MLOpsSettings:
        settings = self._given_settings or load_settings()
        check_settings(settings)
        return settings

    @cached_property
    def root(self) -> ObjectStoragePath:
        return as_path(self.settings.artifact_root, conn_id=self.settings.artifact_conn_id)

    def path(self, *parts: str) -> ObjectStoragePath:
        """A location under the artifact root; each part is made path-safe."""
        return self.root.joinpath(*(safe_segment(p) for p in parts))

    def run_path(self, dag_id: str, run_id: str, task_id: str, name: str) -> ObjectStoragePath:
        """``<artifact_root>/<dag_id>/<run_id>/<task_id>/<name>``."""
        return self.path(dag_id, run_id, task_id, name)

    def for_task(self, context: Context, name: str) -> ObjectStoragePath:
        """The run-scoped location of artifact ``name`` for the running task."""
        ti = context["ti"]
        return self.run_path(ti.dag_id, ti.run_id, ti.task_id, name)

    def write_bytes(self, target: ObjectStoragePath, data: bytes) -> Artifact:
        with staged(target) as local:
            local.write_bytes(data)
        return Artifact(uri=str(target), sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def write_json(self, target: ObjectStoragePath, obj: Any) -> Artifact:
        return self.write_bytes(target, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, uri: str) -> Any:
        path = as_path(uri, conn_id=self.settings.artifact_conn_id)
        with reaching(path):
            return json.loads(path.read_bytes())


# ------------------------------------------------------------------ an object store that cannot be reached
def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` says a remote store could not be reached (refused, timed out, connection cut), as
    opposed to a missing object or refused credentials: botocore's connection errors (S3, through s3fs)
    and aiohttp's (GCS, through gcsfs). A library that was never imported raised none of its errors."""
    kinds: list[type] = []
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        kinds += [botocore.ConnectionError, botocore.HTTPClientError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        kinds.append(aiohttp.ClientConnectionError)
    return bool(kinds) and isinstance(err, tuple(kinds))


def _endpoint(path: ObjectStoragePath, err: BaseException) -> str:
    """``scheme://host[:port]`` of the store that was tried, from the error or the filesystem."""
    from urllib.parse import urlsplit

    url = (getattr(err, "kwargs", None) or {}).get("endpoint_url")
    if not url:
        with contextlib.suppress(Exception):
            fs = path.fs
            url = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get(
                "endpoint_url"
            )
    if not url:
        return "the provider's default endpoint"
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def unreachable_error(path: ObjectStoragePath | Path | str, err: BaseException) -> ArtifactStoreError:
    """The error a task shows when the object store holding ``path`` cannot be reached: the location, the
    endpoint, the connection (or where the credentials come from without one) and what to check."""
    if not hasattr(path, "protocol"):
        path = as_path(path)
    conn_id = getattr(path, "conn_id", None)
    location = f"{path.protocol}://{path.path}"
    endpoint = _endpoint(path, err)
    if conn_id:
        via = f"connection {conn_id!r}"
        check = f"connection {conn_id!r} (its extra endpoint_url and region_name, its login and password)"
    elif path.protocol in ("s3", "s3a"):
        via = "no connection: the AWS_* variables / boto's default chain"
        check = "this worker's AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), AWS_DEFAULT_REGION and AWS keys"
    else:
        via = "no connection: the library's default credentials"
        check = "this worker's settings for that store"
    return ArtifactStoreError(
        f"the object store holding {location!r} cannot be reached at {endpoint} ({via}): "
        f"{type(err).__name__}: {err}",
        fix=f"check that the store at {endpoint} runs and that this worker reaches it, and {check}; then "
        "retry the task (nothing was half-written: an interrupted write leaves the previous version).",
    )


@contextmanager
def reaching(path: ObjectStoragePath | Path | str) -> Iterator[None]:
    """Run a block that reads or writes ``path``: a store that cannot be reached fails it with
    :func:`unreachable_error` (an :class:`ArtifactStoreError`, so Airflow retries the task) instead of the
    library's bare connection error; every other error passes unchanged."""
    try:
        yield
    except MLOpsError:
        raise
    except Exception as err:
        if is_unreachable(err):
            raise unreachable_error(path, err) from err
        raise


@contextmanager
def staged(target: ObjectStoragePath) -> Iterator[Path]:
    """Write ``target`` atomically: yields a local temporary path; when the block ends without an
    error the file is published at ``target``, otherwise it is discarded and ``target`` is untouched.

    On a local file system the temporary file is hidden (``.<name>.tmp-<id>``) in the target's folder,
    so the publish is one ``os.replace``; for object stores it is uploaded to a hidden key beside the
    target and moved over it once whole (see :func:`_publish_remote`).
    """
    local_target = is_local(target)
    if local_target:
        folder = Path(target.path)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ArtifactStoreError(
                f"cannot create folder {str(folder.parent)!r}: {err.strerror}.",
                fix="check that the artifact root is writable by the worker.",
            ) from err
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
        cleanup: Path | None = None
    else:
        cleanup = Path(tempfile.mkdtemp(prefix="mlops-stage-"))
        tmp = cleanup / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise ArtifactStoreError(
                f"nothing was written for {str(target)!r}.",
                fix="this is a bug in the writer; report it with the task log.",
            )
        if local_target:
            os.replace(tmp, target.path)
        else:
            _publish_remote(tmp, target)
    finally:
        if local_target:
            tmp.unlink(missing_ok=True)
        elif cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


def _publish_remote(local: Path, target: ObjectStoragePath) -> None:
    """Upload ``local`` to a hidden key beside ``target`` (``.<name>.tmp-<id>``), then move it over
    ``target`` (a server-side copy: the object appears whole or not at all).

    Uploading to ``target`` itself is not atomic: fsspec closes a file whose ``with`` block raised, and
    closing commits what was sent, so an upload cut by an error (credentials that expired, a refused part)
    published the first parts as ``target``, a truncated artifact. Now such an upload leaves ``target`` as
    it was and the hidden key is removed.

    :raises ArtifactStoreError: the upload or the move failed; ``target`` is unchanged.
    """
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with local.open("rb") as src, staging.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        target.fs.mv(staging.path, target.path)
    except Exception as err:
        with contextlib.suppress(Exception):
            target.fs.rm(staging.path)
        if is_unreachable(err):
            raise unreachable_error(target, err) from err
        raise ArtifactStoreError(
            f"writing {str(target)!r} failed ({type(err).__name__}: {err}); its previous version, if any, "
            "is unchanged.",
            fix="check the artifact store connection's credentials and that the store is reachable, then "
            "rerun the task.",
        ) from err


# ------------------------------------------------------------------ tables read by several stages
def resolve_uri(value: str, root: str) -> str:
    """A full URI for ``value``: URIs and absolute paths as they are, relative paths under ``root``."""
    if "://" in value:
        return value
    if value.startswith("/"):
        return "file://" + value
    return f"{root.rstrip('/')}/{value.lstrip('/')}"


def read_parquet_batch(source: ObjectStoragePath):
    """Read a parquet batch (one file, or a folder of ``*.parquet`` files) as a pyarrow Table.

    :raises MLOpsInputError: the batch is missing, empty or not readable parquet, naming the file.
    :raises ArtifactStoreError: the store holding it cannot be reached (see :func:`unreachable_error`).
    """
    with reaching(source):
        return _read_parquet_batch(source)


def _read_parquet_batch(source: ObjectStoragePath):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not source.exists():
        raise MLOpsInputError(
            f"landed batch {str(source)!r} does not exist.",
            fix="check that the batch for this data interval has landed (for the demo run "
            "`python -m airflow_mlops.demo prepare`), then clear the task to rerun it.",
        )
    files = (
        sorted(p for p in source.iterdir() if p.name.endswith(".parquet")) if source.is_dir() else [source]
    )
    if not files:
        raise MLOpsInputError(
            f"landed batch folder {str(source)!r} holds no .parquet file.",
            fix="land the batch as parquet files in that folder.",
        )
    tables = []
    for path in files:
        try:
            with path.open("rb") as handle:
                tables.append(pq.read_table(handle))
        except (pa.ArrowException, OSError) as err:
            if is_unreachable(err):  # aiohttp's connection errors are OSErrors: not a bad file
                raise
            raise MLOpsInputError(
                f"landed file {str(path)!r} is not readable parquet ({err}).",
                fix="re-land the file from its source; a truncated upload is the usual cause.",
            ) from err
    try:
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as err:
        raise MLOpsInputError(
            f"the files of batch {str(source)!r} have different schemas ({err}).",
            fix="land every file of a batch with the same columns and types.",
        ) from err
