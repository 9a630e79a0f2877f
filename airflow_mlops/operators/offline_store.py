"""Publish a landed batch into the offline store, one partition per batch.

The offline store holds the validated tables the feature store and training read. A partition is one
parquet file, replaced atomically: a rerun of the same data interval replaces it (never duplicates),
and a failed run leaves the previous content in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_mlops.artifacts import (  # noqa: F401  (read_parquet_batch, resolve_uri: re-exported)
    ArtifactStore,
    as_path,
    read_parquet_batch,
    resolve_uri,
    safe_segment,
    sha256_of,
    staged,
)
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

PARTITION_FILE = "part-0.parquet"


class OfflinePartitionWriteOperator(BaseOperator):
    """Publish one landed batch as a partition of an offline-store table.

    The partition ``<offline_root>/<table>/<partition>/part-0.parquet`` is written atomically and
    replaced on rerun. Each Asset in ``outlets`` receives an event whose ``extra`` carries the table,
    partition, row count and sha256.

    :param source_uri: the landed batch: a parquet file or a folder of them; a relative path is taken
        under ``[mlops] landing_root`` (templated).
    :param table: offline-store table name, e.g. ``orders`` (templated).
    :param partition: partition folder, e.g. ``date={{ ds }}`` (templated).
    :param offline_root: root URI of the offline store; default ``[mlops] offline_root`` (templated).
    :param partition_column: split the batch by the local day of this timestamp column (a weekly batch
        becomes seven daily partitions): ``partition`` must then hold ``{date}``, e.g. ``date={date}``,
        which is filled with each day (``YYYY-MM-DD``). The event's ``extra.partitions`` lists them all.
    :param partition_timezone: IANA time zone of those local days (default UTC).
    """

    template_fields: Sequence[str] = ("source_uri", "table", "partition", "offline_root")
    ui_color = "#d8f0e4"

    def __init__(
        self,
        *,
        source_uri: str,
        table: str,
        partition: str,
        offline_root: str | None = None,
        partition_column: str | None = None,
        partition_timezone: str = "UTC",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if partition_column and "{date}" not in partition:
            raise MLOpsArgumentError(
                f"partition {partition!r} of task {self.task_id!r} has no '{{date}}' placeholder, but "
                f"partition_column={partition_column!r} splits the batch by day.",
                fix="pass e.g. partition='date={date}'.",
            )
        self.source_uri = source_uri
        self.table = table
        self.partition = partition
        self.offline_root = offline_root
        self.partition_column = partition_column
        self.partition_timezone = partition_timezone

    def execute(self, context: Context) -> dict[str, Any]:
        import pyarrow.parquet as pq

        settings = ArtifactStore().settings
        source = as_path(resolve_uri(self.source_uri, settings.landing_root))
        root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        table_root = as_path(root).joinpath(safe_segment(self.table))

        table = read_parquet_batch(source)
        parts = self._split(table, source) if self.partition_column else {self.partition: table}
        written = []
        # each partition is replaced atomically (staged, then renamed); a rerun rewrites every one
        for name, part in parts.items():
            target = table_root.joinpath(safe_segment(name), PARTITION_FILE)
            with staged(target) as tmp:
                pq.write_table(part, tmp)
            written.append({"partition": name, "uri": str(target), "rows": part.num_rows})
        first = written[0]
        result = {
            "table": self.table,
            "partition": first["partition"],
            "partitions": [w["partition"] for w in written],
            "uri": first["uri"],
            "uris": [w["uri"] for w in written],
            "rows": table.num_rows,
            "sha256": sha256_of(as_path(first["uri"])) if len(written) == 1 else None,
            "source_uri": str(source),
        }
        self.log.info(
            "Published %d rows of %s to %d partition(s) of %s",
            table.num_rows,
            source,
            len(written),
            table_root,
        )
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                k: result[k] for k in ("table", "partition", "partitions", "rows", "sha256")
            }
        return result

    def _split(self, table: Any, source: ObjectStoragePath) -> dict[str, Any]:
        """One sub-table per local day of ``partition_column``, in day order."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.partition_column
        if column not in table.column_names:
            raise MLOpsInputError(
                f"batch {str(source)!r} has no column {column!r} to split it into daily partitions.",
                fix="land the column or correct partition_column=.",
            )
        values = table[column]
        if not pa.types.is_timestamp(values.type):
            raise MLOpsInputError(
                f"column {column!r} of batch {str(source)!r} is {values.type}, not a timestamp.",
                fix="land it as a timestamp with time zone, or split on another column.",
            )
        if values.null_count:
            raise MLOpsInputError(
                f"column {column!r} of batch {str(source)!r} has {values.null_count} empty value(s); "
                "those rows belong to no day.",
                fix="fill the timestamps at the source, then re-land the batch.",
            )
        if values.type.tz is None:
            values = pc.assume_timezone(values, "UTC")
        local = pc.strftime(values.cast(pa.timestamp("us", tz=self.partition_timezone)), format="%Y-%m-%d")
        days = sorted(set(local.to_pylist()))
        if not days:
            raise MLOpsInputError(
                f"batch {str(source)!r} has no rows.", fix="land a batch with rows, or skip the interval."
            )
        return {self.partition.replace("{date}", day): table.filter(pc.equal(local, day)) for day in days}
