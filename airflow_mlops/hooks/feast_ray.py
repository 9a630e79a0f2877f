"""Feast's Ray compute engine, with the local engine's materialization semantics.

Feast 0.67's ``ray.engine`` filters the rows it materializes by the feature view's ttl counted back from
*now* (``RayFilterNode``: ``event_timestamp >= now - ttl``), while the local engine writes the latest row
of each entity in the requested interval whatever its age. Materializing an interval older than the ttl
(a backfill, a replay, data of a past year) therefore writes nothing with the Ray engine, and it
says nothing either: its write step logs and drops errors. This engine keeps Feast's Ray engine (its
configuration, its Ray initialization from ``ray_address``) and replaces the materialization of a
feature view by:

1. the offline store's ``pull_latest_from_table_or_query`` over [start, end] (the query the local engine
   runs: the latest row per entity key), on the task's worker;
2. the rows cut into slices that Ray tasks on the cluster convert to Feast's online format and write
   with the online store's ``online_write_batch``: ``write_concurrency`` slices (default 1 for SQLite,
   whose single file takes one writer at a time, else the cluster's CPUs). A failing slice fails the
   materialization with its error.

It is a custom batch engine in Feast's documented sense (``batch_engine: type:
airflow_mlops.hooks.feast_ray.MLOpsRayComputeEngine``), which :class:`~airflow_mlops.hooks.feast.FeastHook`
selects for the ``feast`` connection's ``batch_engine: "ray"``. Only Feast imports this module. The Ray
workers need ``feast`` and this package importable (the project's image on the Ray nodes), and must reach
the online store; they never read the offline store.
"""

from __future__ import annotations

import logging
from typing import Any

from feast.infra.common.materialization_job import MaterializationJobStatus
from feast.infra.common.serde import SerializedArtifacts
from feast.infra.compute_engines.ray.compute import RayComputeEngine
from feast.infra.compute_engines.ray.config import RayComputeEngineConfig
from feast.infra.compute_engines.ray.job import RayMaterializationJob
from pydantic import StrictStr

log = logging.getLogger(__name__)

TYPE = "airflow_mlops.hooks.feast_ray.MLOpsRayComputeEngine"


def _write_slice(artifacts: SerializedArtifacts, table: Any) -> int:
    """Runs on a Ray worker: write ``table``'s rows into the online store; the number of rows written."""
    from feast.utils import _convert_arrow_to_proto

    feature_view, online_store, _, repo_config = artifacts.unserialize()
    join_keys = {e.name: e.dtype.to_value_type() for e in feature_view.entity_columns}
    size = repo_config.materialization_config.online_write_batch_size or table.num_rows or 1
    written = 0
    for batch in table.to_batches(max_chunksize=size):
        rows = _convert_arrow_to_proto(batch, feature_view, join_keys)
        if rows:
            online_store.online_write_batch(
                config=repo_config, table=feature_view, data=rows, progress=lambda _: None
            )
            written += len(rows)
    return written


class MLOpsRayComputeEngineConfig(RayComputeEngineConfig):
    """Settings of :class:`MLOpsRayComputeEngine`: those of Feast's ``ray.engine`` (``ray_address``,
    ``write_concurrency``, ``worker_task_options``, ...)."""

    type: StrictStr = TYPE  # type: ignore[assignment]


class MLOpsRayComputeEngine(RayComputeEngine):
    """Feast's Ray engine materializing like the local engine, with the writes on the cluster (module
    docstring)."""

    def _slices(self, rows: int) -> int:
        import ray

        if self.config.write_concurrency is not None:
            wanted = self.config.write_concurrency
        elif self.config.max_workers is not None:
            wanted = self.config.max_workers
        elif self.repo_config.online_store.type == "sqlite":
            wanted = 1
        else:
            wanted = int(ray.cluster_resources().get("CPU", 1))
        return max(1, min(wanted, rows))

    def _materialize_one(
        self, registry: Any, task: Any, from_offline_store: bool = False, **kwargs: Any
    ) -> RayMaterializationJob:
        import ray
        from feast.utils import _get_column_names

        view = task.feature_view
        job_id = f"{view.name}-{task.start_time}-{task.end_time}"
        try:
            entities = [registry.get_entity(name, task.project) for name in view.entities]
            join_keys, features, timestamp, created = _get_column_names(view, entities)
            table = self.offline_store.pull_latest_from_table_or_query(
                config=self.repo_config,
                data_source=view.batch_source,
                join_key_columns=join_keys,
                feature_name_columns=features,
                timestamp_field=timestamp,
                created_timestamp_column=created,
                start_date=task.start_time,
                end_date=task.end_time,
            ).to_arrow()
            if table.num_rows and getattr(view, "online", False):
                artifacts = ray.put(
                    SerializedArtifacts.serialize(feature_view=view, repo_config=self.repo_config)
                )
                slices = self._slices(table.num_rows)
                step = -(-table.num_rows // slices)
                options = {"num_cpus": 1, **(self.config.worker_task_options or {})}
                write = ray.remote(_write_slice).options(**options)
                refs = [write.remote(artifacts, table.slice(i, step)) for i in range(0, table.num_rows, step)]
                written = sum(ray.get(refs))
                log.info(
                    "Wrote %d rows of %s into the %s online store in %d Ray task(s)",
                    written,
                    view.name,
                    self.repo_config.online_store.type,
                    len(refs),
                )
            return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
        except Exception as err:
            return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=err)
