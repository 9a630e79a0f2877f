"""The model registry on BentoML's model store.

Models are imported into a BentoML model store kept in the state folder (``<state_dir>/bentoml``) as
``<name>:<version>``, where the version is derived from the model file's sha256 (registering the same
model twice gives the same version). Each version is also exported to the artifact store
(``<artifact_root>/registry/<name>/<version>.bentomodel``) so other machines can import it.

Stages (``candidate``, ``production``, ``archived``, ``rejected``) and every promotion decision live in
the registry index of the model, a document in the shared state database (:mod:`airflow_mlops.hooks.state`,
namespace ``registry``), changed only in transactions (:meth:`BentoMLHook.locked`), so workers on several
hosts see one registry. This hook is its only owner: nothing else reads the index's storage or decides
what ``production`` is. An ``index.json`` a former release left in the artifact store is imported once.

Each version's record carries ``record_hmac``: an HMAC-SHA256, under the registry signing key
(:func:`registry_signing_key`), of what decides which code and data get loaded (file hashes, export,
the skops types trusted for it, the signature). Loading a model verifies that HMAC, then the files'
sha256, then loads the skops file trusting exactly the recorded types; any mismatch is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_mlops.artifacts import ArtifactStore, as_path, reaching, sha256_of, staged
from airflow_mlops.exceptions import MLOpsConfigError, MLOpsError, MLOpsInputError

if TYPE_CHECKING:
    from airflow_mlops.config import MLOpsSettings
    from airflow_mlops.hooks.state import MLOpsStateHook
    from airflow_mlops.ml.model_io import Predictor
    from airflow_mlops.ml.signature import ModelSignature

#: namespace of the registry indexes in the state database (one document per model name)
REGISTRY_NAMESPACE = "registry"
STAGES = ("candidate", "production", "archived", "rejected")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: Airflow connection holding the registry signing key (its password, or ``signing_key`` in its extra)
REGISTRY_CONN_ID = "mlops_registry"
#: the embedded default's key file in the state folder, created at first use (mode 0600)
KEY_FILE = "registry-signing.key"
#: fields of a version record covered by ``record_hmac`` (``stage`` and ``decisions`` change later)
SIGNED_FIELDS = (
    "tag",
    "version",
    "registered_at",
    "model_format",
    "files_sha256",
    "export_uri",
    "export_sha256",
    "trusted_types",
    "signature",
)


class ModelRegistryError(MLOpsError):
    """The registry refused an operation (unknown model or version, tampered file, bad stage)."""


class ModelIntegrityError(ModelRegistryError, MLOpsInputError):
    """A model file does not match the sha256 recorded when it was registered, or the record's HMAC
    does not verify; it is never loaded."""


def registry_signing_key(settings: MLOpsSettings | None = None, conn_id: str = REGISTRY_CONN_ID) -> bytes:
    """The key that signs registry records (and, derived from it, Ray Tune's saved state).

    From the Airflow connection ``conn_id`` (password, or ``signing_key`` in its extra). Without that
    connection, and only when the artifact store is local (``file://``, the embedded default), from
    ``<state_dir>/registry-signing.key``, created at first use with mode 0600. A remote artifact store
    (several machines) requires the connection: a key per machine could not verify the others' records.

    :raises MLOpsConfigError: the connection has no key, or is missing with a remote artifact store.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    from airflow_mlops.config import load_settings

    settings = settings or load_settings()
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        conn = None
    if conn is not None:
        key = conn.password or (conn.extra_dejson or {}).get("signing_key")
        if not key:
            raise MLOpsConfigError(
                f"Airflow connection {conn_id!r} has no registry signing key.",
                fix='set its password (or extra {"signing_key": ...}) to a long random secret, e.g. '
                "`python -c 'import secrets; print(secrets.token_hex(32))'`.",
            )
        return str(key).encode()
    if settings.artifact_scheme != "file":
        raise MLOpsConfigError(
            f"the registry signing key connection {conn_id!r} does not exist, and the artifact store "
            f"{settings.artifact_root!r} is shared by several machines.",
            fix=f"create connection {conn_id!r} (type generic) with a long random secret as its password "
            f"on every worker and model server, e.g. AIRFLOW_CONN_{conn_id.upper()}="
            '\'{"conn_type": "generic", "password": "<secret>"}\'.',
        )
    return _local_key(settings.state_dir / KEY_FILE)


def registry_key_env(conn_id: str = REGISTRY_CONN_ID) -> dict[str, str]:
    """What a process started from a task (the model server) needs in its environment to verify registry
    records: ``AIRFLOW_CONN_<CONN_ID>`` holding the signing key when connection ``conn_id`` exists,
    nothing otherwise (the embedded default's key file is found through ``AIRFLOW__MLOPS__STATE_DIR``)."""
    import json

    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return {}
    key = conn.password or (conn.extra_dejson or {}).get("signing_key")
    if not key:
        return {}
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps({"conn_type": "generic", "password": key})}


def _local_key(path: Path) -> bytes:
    """The key in ``path``, created (random, mode 0600) when missing; refused when others may read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise MLOpsConfigError(
            f"the registry signing key {str(path)!r} can be read by other users (mode {mode:o}).",
            fix=f"chmod 600 {path}, or configure the key in Airflow connection {REGISTRY_CONN_ID!r}.",
        )
    key = path.read_text().strip()
    if len(key) < 32:
        raise MLOpsConfigError(
            f"the registry signing key {str(path)!r} is empty or too short.",
            fix="delete it so a new one is generated (records signed with the old key must then be "
            f"registered again), or configure the key in Airflow connection {REGISTRY_CONN_ID!r}.",
        )
    return key.encode()


def signed_payload(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """What ``record_hmac`` covers: the model name and the record's :data:`SIGNED_FIELDS`."""
    return {"model": name, **{k: record.get(k) for k in SIGNED_FIELDS}}


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
    :param registry_conn_id: connection holding the key that signs registry records (password, or
        ``signing_key`` in its extra); see :func:`registry_signing_key` for the embedded default.
    """

    conn_name_attr = "bentoml_conn_id"
    default_conn_name = "bentoml_default"
    conn_type = "bentoml"
    hook_name = "BentoML"

    def __init__(
        self, bentoml_conn_id: str | None = None, registry_conn_id: str = REGISTRY_CONN_ID, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.bentoml_conn_id = bentoml_conn_id
        self.registry_conn_id = registry_conn_id

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

    @cached_property
    def signing_key(self) -> bytes:
        """The registry signing key (see :func:`registry_signing_key`)."""
        return registry_signing_key(self.store.settings, self.registry_conn_id)

    def sign_record(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with its ``record_hmac`` set."""
        from airflow_mlops.ml.signing import sign

        record["record_hmac"] = sign(self.signing_key, signed_payload(name, record))
        return record

    def verify_record(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` when its ``record_hmac`` verifies under the signing key.

        :raises ModelIntegrityError: naming the version; the record was written without the key (edited
            in the index, or registered before records were signed) or under another key.
        """
        from airflow_mlops.ml.signing import verify

        if verify(self.signing_key, signed_payload(name, record), record.get("record_hmac")):
            return record
        tag = record.get("tag") or f"{name}:{record.get('version')}"
        why = "is not signed" if not record.get("record_hmac") else "has a signature that does not verify"
        raise ModelIntegrityError(
            f"the registry record of {tag} {why}: it was written without the registry signing key "
            "(edited in the index, or by an older release) or under another key; refusing to load it.",
            fix=f"register the version again from its training run (RegisterModelOperator); if the key "
            f"changed, give every worker and model server the same key in connection {self.registry_conn_id!r}.",
        )

    @property
    def api_key(self) -> str | None:
        return self.connection.password if self.connection else None

    def server_environment(self) -> dict[str, str]:
        """Variables the model server needs for the registry beyond what
        :func:`~airflow_mlops.operators.serving.serving_env` gives it: the connection of the key that
        verifies signed registry records, as ``AIRFLOW_CONN_<ID>`` (:func:`registry_key_env`), when it
        exists; the embedded default's key file is found through ``AIRFLOW__MLOPS__STATE_DIR``; and the
        connection of the state database holding the registry index (:meth:`MLOpsStateHook.environment`).
        The worker's other variables never reach the server."""
        return {**registry_key_env(self.registry_conn_id), **self.state.environment()}

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.model_store.list()
        except Exception as err:  # reported to the UI, not raised
            return False, f"BentoML model store at {self.home} is not usable: {err}"
        return True, f"BentoML model store at {self.home} is usable"

    # ------------------------------------------------------------------ registry index
    def registry_path(self, name: str, *parts: str) -> Any:
        return self.store.path("registry", check_model_name(name), *parts)

    @cached_property
    def state(self) -> MLOpsStateHook:
        """The shared state database holding the registry index (see :mod:`airflow_mlops.hooks.state`)."""
        from airflow_mlops.hooks.state import MLOpsStateHook

        return MLOpsStateHook()

    def _legacy_index(self, name: str) -> Any:
        """Reader of the ``index.json`` a former release kept in the artifact store (imported once)."""
        from airflow_mlops.hooks.state import read_legacy_json

        return read_legacy_json(self.registry_path(name, "index.json"))

    @staticmethod
    def _empty_index(name: str) -> dict[str, Any]:
        return {"model": name, "production": None, "versions": {}, "history": []}

    def read_index(self, name: str) -> dict[str, Any]:
        """The registry index of ``name`` (versions, stages, history) as committed in the state database."""
        check_model_name(name)
        return self.state.get(REGISTRY_NAMESPACE, name, legacy=self._legacy_index(name)) or self._empty_index(
            name
        )

    def write_index(self, name: str, index: dict[str, Any]) -> None:
        """Replace the registry index of ``name`` (prefer :meth:`locked` for a read-modify-write)."""
        self.state.put(REGISTRY_NAMESPACE, check_model_name(name), index)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[dict[str, Any]]:
        """Read-modify-write of a model's index in one transaction of the state database; written when the
        block succeeds, left as it was when it raises. Concurrent writers, on any host, run one after the
        other."""
        with self.state.locked(
            REGISTRY_NAMESPACE,
            check_model_name(name),
            default=lambda: self._empty_index(name),
            legacy=self._legacy_index(name),
        ) as index:
            yield index

    def model_names(self) -> list[str]:
        """The names of the models in the registry, sorted."""
        return self.state.keys(REGISTRY_NAMESPACE)

    def production_version(self, name: str, index: dict[str, Any] | None = None) -> str | None:
        """The version of ``name`` in production, None when none is.

        :param index: the index already read (e.g. inside :meth:`locked`); read when not given.
        """
        return (index if index is not None else self.read_index(name)).get("production")

    def put_in_production(self, index: dict[str, Any], version: str) -> str | None:
        """In ``index`` (inside :meth:`locked`): make ``version`` the production version and archive the
        one it replaces; returns the replaced version (None when there was none)."""
        previous = index.get("production")
        record = self.version_record(index, version)
        if previous and previous != version and previous in index["versions"]:
            index["versions"][previous]["stage"] = "archived"
        record["stage"] = "production"
        index["production"] = version
        return previous

    def served_record(self, name: str, version: str | None = None) -> tuple[str, dict[str, Any]]:
        """``(version, record)`` of the version to serve: ``version``, or the production version.

        :raises ModelRegistryError: no version given and none in production, or an unknown version.
        """
        index = self.read_index(name)
        version = version or self.production_version(name, index)
        if not version:
            raise ModelRegistryError(
                f"model {name!r} has no production version, and no version was named.",
                fix="promote a version first, or name the version to serve.",
            )
        return version, self.verify_record(name, self.version_record(index, version))

    def signature(self, name: str, version: str) -> ModelSignature:
        """The signature recorded when ``name:version`` was registered.

        :raises ModelRegistryError: an unknown model or version.
        :raises SignatureError: the version was registered without a signature.
        """
        from airflow_mlops.ml.signature import signature_of

        record = self.verify_record(name, self.version_record(self.read_index(name), version))
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

        from airflow_mlops.ml.model_io import model_trusted_types, read_description

        description = read_description(model_dir)
        trusted_types: list[str] = []
        if description.get("format") == "skops":  # refuse a file that could run code before storing it
            trusted_types = model_trusted_types(Path(model_dir) / str(description.get("model_file", "")))
        files = sorted(p.name for p in Path(model_dir).iterdir() if p.is_file())
        digests = {f: sha256_of(Path(model_dir) / f) for f in files}
        content = hashlib.sha256("".join(f"{f}:{digests[f]};" for f in files).encode()).hexdigest()
        version = "v" + content[:16]
        tag = f"{check_model_name(name)}:{version}"
        with self.locked(name) as index:
            existing = index["versions"].get(version)
            if existing is not None:
                try:
                    self.verify_record(name, existing)
                except ModelIntegrityError as err:
                    # registering the content again replaces a record nobody can trust (edited, or from
                    # before records were signed), and the model store's copy that came with it
                    self.log.warning("Replacing the registry record of %s: %s", tag, err.problem)
                    with contextlib.suppress(bentoml.exceptions.NotFound):
                        self.model_store.delete(tag)
                else:
                    self.log.info(
                        "Model %s is already registered (same content); stage %s", tag, existing["stage"]
                    )
                    return existing
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
                "trusted_types": trusted_types,
                **_json_safe(metadata),
            }
            index["versions"][version] = self.sign_record(name, record)
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

        :raises ModelIntegrityError: the record's HMAC does not verify, or a file differs from the sha256
            recorded at registration.
        """
        import bentoml

        record = self.verify_record(name, record or self.version_record(self.read_index(name), version))
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
                with reaching(export), export.open("rb") as src, local.open("wb") as dst:
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
        """Load a registered version after verifying its record's HMAC and its files' sha256, trusting
        exactly the skops types recorded at registration.

        :raises ModelIntegrityError: a record or file changed since registration.
        :raises UntrustedModelError: the file needs a type that was not recorded or is not allowed.
        """
        from airflow_mlops.ml.model_io import load_model_dir

        record = self.verify_record(name, self.version_record(self.read_index(name), version))
        folder = self.model_dir(name, version, record)
        trusted = record.get("trusted_types") if record.get("model_format") == "skops" else None
        return load_model_dir(folder, trusted_types=trusted if trusted is not None else [])


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
