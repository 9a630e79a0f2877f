"""The model registry on BentoML's model store.

Models are imported into a BentoML model store kept in the state folder (``<state_dir>/bentoml``) as
``<name>:<version>``, where the version is derived from the model file's sha256 (registering the same
model twice gives the same version). Each version is also exported to the artifact store
(``<artifact_root>/registry/<name>/<version>.bentomodel``) so other machines can import it.

Stages (``candidate``, ``production``, ``archived``, ``rejected``) and every promotion decision live in
the registry index ``<artifact_root>/registry/<name>/index.json``, written atomically under a lock.
Loading a model checks the sha256 recorded at registration first and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_mlops.artifacts import ArtifactStore, as_path, sha256_of, staged
from airflow_mlops.exceptions import MLOpsError, MLOpsInputError

if TYPE_CHECKING:
    from airflow_mlops.ml.model_io import Predictor
    from airflow_mlops.ml.signature import ModelSignature

STAGES = ("candidate", "production", "archived", "rejected")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class ModelRegistryError(MLOpsError):
    """The registry refused an operation (unknown model or version, tampered file, bad stage)."""


class ModelIntegrityError(ModelRegistryError, MLOpsInputError):
    """A model file does not match the sha256 recorded when it was registered; it is never loaded."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def check_model_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ModelRegistryError(
            f"model name {name!r} is not a valid registry name.",
            fix="use lower-case letters, digits, '_', '-' or '.', starting with a letter or digit.",
        )
    return name


class BentoMLHook(BaseHook):
    """BentoML model store, registry index and (optionally) the API key of served endpoints.

    :param bentoml_conn_id: optional connection of type ``bentoml``; its password is the API key the
        Bento service requires from clients, its ``extra`` may set ``{"home": "/path"}`` for the
        BentoML home (default ``<state_dir>/bentoml``).
    """

    conn_name_attr = "bentoml_conn_id"
    default_conn_name = "bentoml_default"
    conn_type = "bentoml"
    hook_name = "BentoML"

    def __init__(self, bentoml_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bentoml_conn_id = bentoml_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "port"],
            "relabeling": {"host": "Endpoint URL (optional)", "password": "API key"},
            "placeholders": {"extra": '{"home": "/srv/mlops/bentoml"}'},
        }

    @cached_property
    def connection(self) -> Any | None:
        return self.get_connection(self.bentoml_conn_id) if self.bentoml_conn_id else None

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore()

    @cached_property
    def home(self) -> Path:
        extra = self.connection.extra_dejson if self.connection else {}
        return Path(extra.get("home") or self.store.settings.state_dir / "bentoml")

    @cached_property
    def model_store(self) -> Any:
        from bentoml._internal.models.model import ModelStore

        path = self.home / "models"
        path.mkdir(parents=True, exist_ok=True)
        return ModelStore(path)

    @property
    def api_key(self) -> str | None:
        return self.connection.password if self.connection else None

    def server_environment(self) -> dict[str, str]:
        """Extension point: variables the model server needs for the registry beyond what
        :func:`~airflow_mlops.operators.serving.serving_env` gives it (e.g. the connection of the key that
        verifies signed registry records, as ``AIRFLOW_CONN_<ID>``). The worker's other variables never reach
        the server; whatever the registry needs there is returned here. None today."""
        return {}

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.model_store.list()
        except Exception as err:  # reported to the UI, not raised
            return False, f"BentoML model store at {self.home} is not usable: {err}"
        return True, f"BentoML model store at {self.home} is usable"

    # ------------------------------------------------------------------ registry index
    def registry_path(self, name: str, *parts: str) -> Any:
        return self.store.path("registry", check_model_name(name), *parts)

    def read_index(self, name: str) -> dict[str, Any]:
        path = self.registry_path(name, "index.json")
        if not path.exists():
            return {"model": name, "production": None, "versions": {}, "history": []}
        return self.store.read_json(str(path))

    def write_index(self, name: str, index: dict[str, Any]) -> None:
        self.store.write_json(self.registry_path(name, "index.json"), index)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[dict[str, Any]]:
        """Read-modify-write of a model's index under an exclusive lock; written when the block succeeds."""
        lock_dir = self.store.settings.state_dir / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"registry-{check_model_name(name)}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            index = self.read_index(name)
            yield index
            self.write_index(name, index)

    def production_version(self, name: str) -> str | None:
        """The version of ``name`` in production, None when none is."""
        return self.read_index(name).get("production")

    def served_record(self, name: str, version: str | None = None) -> tuple[str, dict[str, Any]]:
        """``(version, record)`` of the version to serve: ``version``, or the production version.

        :raises ModelRegistryError: no version given and none in production, or an unknown version.
        """
        index = self.read_index(name)
        version = version or index.get("production")
        if not version:
            raise ModelRegistryError(
                f"model {name!r} has no production version, and no version was named.",
                fix="promote a version first, or name the version to serve.",
            )
        return version, self.version_record(index, version)

    def signature(self, name: str, version: str) -> ModelSignature:
        """The signature recorded when ``name:version`` was registered.

        :raises ModelRegistryError: an unknown model or version.
        :raises SignatureError: the version was registered without a signature.
        """
        from airflow_mlops.ml.signature import signature_of

        record = self.version_record(self.read_index(name), version)
        return signature_of(record, tag=record.get("tag"))

    def version_record(self, index: dict[str, Any], version: str) -> dict[str, Any]:
        try:
            return index["versions"][version]
        except KeyError:
            known = ", ".join(sorted(index["versions"])) or "none"
            raise ModelRegistryError(
                f"model {index['model']!r} has no version {version!r} (known: {known}).",
                fix="register it first with RegisterModelOperator.",
            ) from None

    # ------------------------------------------------------------------ models
    def register(self, name: str, model_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        """Import ``model_dir`` (model file + model.json) as a ``candidate``; idempotent per content."""
        import bentoml

        from airflow_mlops.ml.model_io import read_description

        description = read_description(model_dir)
        files = sorted(p.name for p in Path(model_dir).iterdir() if p.is_file())
        digests = {f: sha256_of(Path(model_dir) / f) for f in files}
        content = hashlib.sha256("".join(f"{f}:{digests[f]};" for f in files).encode()).hexdigest()
        version = "v" + content[:16]
        tag = f"{check_model_name(name)}:{version}"
        with self.locked(name) as index:
            if version in index["versions"]:
                self.log.info(
                    "Model %s is already registered (same content); stage %s",
                    tag,
                    index["versions"][version]["stage"],
                )
                return index["versions"][version]
            try:
                self.model_store.get(tag)
            except bentoml.exceptions.NotFound:
                with bentoml.models.create(
                    tag,
                    labels={"registered-by": "airflow-mlops"},
                    metadata=_without_none({"files_sha256": digests, **_json_safe(metadata)}),
                    _model_store=self.model_store,
                ) as model:
                    for f in files:
                        shutil.copy2(Path(model_dir) / f, model.path_of(f))
            export = self._export(tag, name, version)
            record = {
                "tag": tag,
                "version": version,
                "stage": "candidate",
                "registered_at": _now(),
                "files_sha256": digests,
                "model_format": description.get("format"),
                "export_uri": export["uri"],
                "export_sha256": export["sha256"],
                **_json_safe(metadata),
            }
            index["versions"][version] = record
            index["history"].append({"at": _now(), "action": "register", "version": version})
        return record

    def _export(self, tag: str, name: str, version: str) -> dict[str, Any]:
        import bentoml

        target = self.registry_path(name, f"{version}.bentomodel")
        with tempfile.TemporaryDirectory(prefix="mlops-export-") as tmp:
            local = Path(
                bentoml.models.export_model(tag, f"{tmp}/{version}.bentomodel", _model_store=self.model_store)
            )
            with staged(target) as out:
                shutil.copyfile(local, out)
        return {"uri": str(target), "sha256": sha256_of(target)}

    def model_dir(self, name: str, version: str, record: dict[str, Any] | None = None) -> Path:
        """The local folder of a registered version, imported from its export when missing here.

        :raises ModelIntegrityError: a file differs from the sha256 recorded at registration.
        """
        import bentoml

        record = record or self.version_record(self.read_index(name), version)
        tag = record["tag"]
        try:
            model = self.model_store.get(tag)
        except bentoml.exceptions.NotFound:
            export = as_path(record["export_uri"], conn_id=self.store.settings.artifact_conn_id)
            if sha256_of(export) != record["export_sha256"]:
                raise ModelIntegrityError(
                    f"exported model {record['export_uri']!r} does not match its recorded "
                    "sha256; refusing to import it.",
                    fix="re-register the model from its training run.",
                ) from None
            with tempfile.TemporaryDirectory(prefix="mlops-import-") as tmp:
                local = Path(tmp) / export.name
                with export.open("rb") as src, local.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                model = bentoml.models.import_model(str(local), _model_store=self.model_store)
        folder = Path(model.path)
        for file_name, expected in record["files_sha256"].items():
            actual = sha256_of(folder / file_name) if (folder / file_name).exists() else "missing"
            if actual != expected:
                raise ModelIntegrityError(
                    f"model file {str(folder / file_name)!r} of {tag} has sha256 {actual[:12]}, but "
                    f"{expected[:12]} was recorded at registration: it was modified or corrupted.",
                    fix="do not edit the model store by hand; delete the damaged version with "
                    f"`bentoml models delete {tag}` so it is re-imported from its export, or re-register it.",
                )
        return folder

    def load(self, name: str, version: str) -> Predictor:
        """Load a registered version after checking its sha256."""
        from airflow_mlops.ml.model_io import load_model_dir

        return load_model_dir(self.model_dir(name, version))


def _json_safe(metadata: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(metadata, default=str))


def _without_none(value: Any) -> Any:
    """BentoML's model metadata refuses None; drop such entries (the registry index keeps them)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value
