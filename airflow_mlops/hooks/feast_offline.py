"""Feast's DuckDB offline store, reading sources on object stores (``s3://``, ``gs://``, ...) through fsspec.

Feast's ``duckdb`` offline store reads a ``FileSource`` with ``ibis.read_parquet``, which for an
``s3://`` path first runs DuckDB's ``INSTALL httpfs``: a download from extensions.duckdb.org at first
use, which fails on a worker without internet access (and the extension is not in the ``duckdb`` wheel).
This store is the same offline store with one difference: a parquet source on an object store is read
by DuckDB through the Python filesystem that the rest of the project uses for that store
(``ObjectStoragePath(...).fs``: for ``s3://`` the Amazon provider's ``s3fs``, configured by the AWS SDK's
variables such as ``AWS_ENDPOINT_URL_S3`` or its files, like ``[mlops] offline_root`` everywhere else),
registered on DuckDB's connection with ``register_filesystem``. Local sources are read exactly as Feast
reads them.

It is a custom offline store in Feast's documented sense (``offline_store: type:
airflow_mlops.hooks.feast_offline.FsspecDuckDBOfflineStore``); :class:`~airflow_mlops.hooks.feast.FeastHook`
selects it in place of ``duckdb``, so ``feature_store.yaml`` keeps ``type: duckdb``. Only Feast imports this
module (it imports Feast, DuckDB and ibis at the top).
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

import ibis
from feast.data_format import ParquetFormat
from feast.data_source import DataSource
from feast.infra.offline_stores import duckdb as feast_duckdb
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.repo_config import RepoConfig
from pydantic import StrictStr

#: URL schemes read through fsspec rather than DuckDB's own (httpfs) file systems
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
TYPE = "airflow_mlops.hooks.feast_offline.FsspecDuckDBOfflineStore"
_LOCK = threading.Lock()
_REGISTERED: dict[tuple[int, str], Any] = {}


def remote_scheme(path: str) -> str | None:
    """The object-store scheme of ``path`` (``"s3"``), or None for a local path."""
    scheme, sep, _ = path.partition("://")
    return scheme.lower() if sep and scheme.lower() in REMOTE_SCHEMES else None


def _filesystem(path: str) -> Any:
    """The fsspec filesystem the project opens ``path`` with (no connection id: like ``offline_root``)."""
    from airflow.sdk import ObjectStoragePath

    scheme, _, rest = path.partition("://")
    return ObjectStoragePath(f"{scheme}://{rest.split('/', 1)[0]}").fs


def register_filesystem(con: Any, path: str) -> None:
    """Let the DuckDB connection ``con`` read ``path``'s object store through Python (fsspec), not httpfs.

    The filesystem is registered once per connection and re-registered when the project's filesystem for
    that scheme is another object (other credentials or endpoint); its listing cache is dropped so files
    published since the last read are seen.
    """
    fs = _filesystem(path)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    key = (id(con), str(protocols[0]))
    with _LOCK:
        current = _REGISTERED.get(key)
        if current is not fs:
            if current is not None or protocols[0] in con.list_filesystems():
                con.unregister_filesystem(str(protocols[0]))
            con.register_filesystem(fs)
            _REGISTERED[key] = fs
    fs.invalidate_cache()


def read_data_source(data_source: DataSource, repo_path: str) -> Any:
    """Feast's DuckDB source reader, with parquet files on an object store read through fsspec."""
    path = getattr(data_source, "path", None) or ""
    parquet = isinstance(data_source, FileSource) and (
        isinstance(data_source.file_format, ParquetFormat)
        or (data_source.file_format is None and path.endswith(".parquet"))
    )
    if not (parquet and remote_scheme(path)):
        return feast_duckdb._read_data_source(data_source, repo_path)
    backend = ibis.get_backend()
    register_filesystem(backend.con, path)
    # what ibis.read_parquet does, less its INSTALL httpfs: a temporary view over read_parquet, as a table
    # (not backend.sql(), whose schema query uses a DuckDB cursor method DuckDB 2 removed)
    name = f"mlops_fsspec_{uuid.uuid4().hex}"
    literal = "'" + path.replace("'", "''") + "'"
    try:
        backend.con.execute(
            f'CREATE OR REPLACE TEMPORARY VIEW "{name}" AS SELECT * FROM read_parquet({literal})'
        )
    except Exception:
        _raise_if_unreachable(path)
        raise
    return backend.table(name)


def _raise_if_unreachable(path: str) -> None:
    """DuckDB reports a failure of the Python filesystem as an error of its own (the Python traceback as
    text): ask the store once more from Python, so that a store that cannot be reached fails the task with
    the project's error for it (:func:`airflow_mlops.artifacts.unreachable_error`: the location, the
    endpoint, where the settings come from, what to check) rather than with DuckDB's."""
    from airflow_mlops.artifacts import as_path, reaching

    folder = as_path(path.split("*", 1)[0].rsplit("/", 1)[0])
    with reaching(folder):
        folder.exists()


class FsspecDuckDBOfflineStoreConfig(feast_duckdb.DuckDBOfflineStoreConfig):
    """Settings of :class:`FsspecDuckDBOfflineStore`: those of Feast's ``duckdb`` offline store."""

    type: StrictStr = TYPE


class FsspecDuckDBOfflineStore(feast_duckdb.DuckDBOfflineStore):
    """Feast's DuckDB offline store whose object-store sources are read through fsspec (module docstring)."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        return pull_latest_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            data_source_reader=read_data_source,
            data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        )

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[Any],
        feature_refs: list[str],
        entity_df: Any,
        registry: Any,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        feast_duckdb._validate_lance_feature_views(feature_views)
        return get_historical_features_ibis(
            config=config,
            feature_views=feature_views,
            feature_refs=feature_refs,
            entity_df=entity_df,
            registry=registry,
            project=project,
            full_feature_names=full_feature_names,
            data_source_reader=read_data_source,
            data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        return pull_all_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            data_source_reader=read_data_source,
            data_source_writer=feast_duckdb._write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        )
