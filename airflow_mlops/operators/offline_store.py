"""Publish a landed batch into the offline store, merged into day partitions.

The offline store holds the validated tables the feature store and training read. A partition is one
parquet file, written atomically. Several batches may carry rows of the same day (late rows, batches
cut at other hours than the partition's day): each batch's rows of a day are kept as that batch's
*contribution* (``<offline_root>/_batches/<table>/<partition>/<batch>.parquet``, beside the tables),
and the partition is rebuilt from all of them. A rerun of a batch replaces its own contribution
(never duplicates, and rows a corrected batch no longer has go), rows of the other batches stay, and
a failed run leaves the previous content in place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_mlops.artifacts import (  # noqa: F401  (read_parquet_batch, resolve_uri: re-exported)
    ArtifactStore,
    as_path,
    reaching,
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
#: folder under the offline root holding each batch's rows of each partition,
#: ``_batches/<table>/<partition>/<batch>.parquet``: beside the tables, not in them, so whoever lists or
#: reads a table sees its partitions only
CONTRIBUTIONS = "_batches"
#: the name of the rows a partition held before its batches were recorded (sorts before any batch)
EARLIER = "!earlier"


def batch_id(source: str, landing_root: str) -> str:
    """A stable file name for a landed batch: its path under the landing root (the whole URI when it
    lies elsewhere), made safe. The same batch gets the same id on every rerun."""
    import hashlib

    root = landing_root.rstrip("/") + "/"
    relative = source[len(root) :] if source.startswith(root) else source
    readable = re.sub(r"[^A-Za-z0-9._=-]+", "_", relative.strip("/"))[-80:].strip("._") or "batch"
    return f"{readable}-{hashlib.sha256(relative.encode()).hexdigest()[:12]}"


def merge_contributions(tables: list[tuple[str, Any]], key_columns: Sequence[str] | None, where: str) -> Any:
    """The rows of a partition from each batch's contribution, in batch-id order.

    A row of a later batch (by id) replaces the rows of earlier batches with the same key (``key_columns``;
    the whole row when ``None``), so two batches carrying the same row keep it once and the result
    does not depend on the order the batches were published in.

    :raises MLOpsInputError: the batches' columns differ or a key column is missing (nothing is written).
    """
    import pandas as pd
    import pyarrow as pa

    tables = sorted(tables, key=lambda item: item[0])
    first_name, merged = tables[0]
    keys = list(key_columns) if key_columns else list(merged.column_names)
    for name, table in tables:
        if not table.schema.equals(merged.schema):
            raise MLOpsInputError(
                f"batch {name!r} of {where} has columns {table.schema.names} of other types than batch "
                f"{first_name!r} ({merged.schema.names}); the day's rows cannot be merged into one partition.",
                fix="land every batch with the same schema (or re-land the older batches), then rerun.",
            )
        missing = [k for k in keys if k not in table.column_names]
        if missing:
            raise MLOpsInputError(
                f"batch {name!r} of {where} has no key column(s) {', '.join(missing)}.",
                fix="land the key columns or correct key_columns=.",
            )
    merged = tables[0][1]
    for _name, table in tables[1:]:
        if merged.num_rows and table.num_rows:
            old = pd.MultiIndex.from_frame(merged.select(keys).to_pandas())
            new = pd.MultiIndex.from_frame(table.select(keys).to_pandas())
            merged = merged.filter(pa.array(~old.isin(new)))
        merged = pa.concat_tables([merged, table])
    return merged


class OfflinePartitionWriteOperator(BaseOperator):
    """Publish one landed batch as a partition of an offline-store table.

    The partition ``<offline_root>/<table>/<partition>/part-0.parquet`` is written atomically. It holds
    the rows of every batch that carried rows of it: a later batch with rows of the same day adds them
    (a row with the key of an earlier batch's row replaces it, the batch whose path sorts last winning),
    and a rerun of a batch replaces that batch's rows, never duplicating them. Batches whose columns
    differ are refused, naming both. Each Asset in ``outlets`` receives an event whose ``extra`` carries the table,
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
    :param key_columns: columns identifying a row (with ``partition_column``, its event time) when
        batches overlap; default the whole row (identical rows of two batches are kept once).
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
        key_columns: Sequence[str] | None = None,
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
        self.key_columns = list(key_columns) if key_columns else None

    def execute(self, context: Context) -> dict[str, Any]:
        import pyarrow.parquet as pq

        settings = ArtifactStore().settings
        source = as_path(resolve_uri(self.source_uri, settings.landing_root))
        root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        table_root = as_path(root).joinpath(safe_segment(self.table))
        batches_root = as_path(root).joinpath(CONTRIBUTIONS, safe_segment(self.table))

        table = read_parquet_batch(source)
        parts = self._split(table, source) if self.partition_column else {self.partition: table}
        batch = batch_id(str(source), str(settings.landing_root))
        keys = self.key_columns
        if keys and self.partition_column and self.partition_column not in keys:
            keys = [*keys, self.partition_column]
        merged = {}
        # every partition merged before anything is written: a batch refused for one day changes no day
        for name, part in parts.items():
            contributions = batches_root.joinpath(safe_segment(name))
            published = table_root.joinpath(safe_segment(name), PARTITION_FILE)
            with reaching(published):
                merged[name] = (contributions, self._merge(contributions, published, batch, part, keys))
        written = []
        for name, part in parts.items():
            contributions, rows = merged[name]
            with staged(contributions.joinpath(f"{batch}.parquet")) as tmp:
                pq.write_table(part, tmp)
            # staged, then renamed: readers see the old partition or the new one, never a part of it
            target = table_root.joinpath(safe_segment(name), PARTITION_FILE)
            with staged(target) as tmp:
                pq.write_table(rows, tmp)
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

    def _merge(
        self,
        contributions: ObjectStoragePath,
        published: ObjectStoragePath,
        batch: str,
        part: Any,
        keys: Sequence[str] | None,
    ) -> Any:
        """The partition's rows with ``part`` as this batch's contribution: every batch's contribution
        merged (see :func:`merge_contributions`); the caller writes ``part`` and the result."""
        import pyarrow.parquet as pq

        own = contributions.joinpath(f"{batch}.parquet")
        others = []
        if not contributions.exists() and published.exists():
            # a partition written before batches were recorded: its rows are kept as the first batch's
            with published.open("rb") as handle:
                earlier = pq.read_table(handle)
            with staged(contributions.joinpath(f"{EARLIER}.parquet")) as tmp:
                pq.write_table(earlier, tmp)
        if contributions.exists():
            for path in sorted(contributions.iterdir(), key=lambda p: p.name):
                if path.name.endswith(".parquet") and not path.name.startswith(".") and path.name != own.name:
                    with path.open("rb") as handle:
                        others.append((path.name.removesuffix(".parquet"), pq.read_table(handle)))
        return merge_contributions([*others, (batch, part)], keys, f"partition {str(published.parent)!r}")

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
