"""Feature-store operators: prepare feature source tables, apply a Feast repository, materialize
intervals into the online store and build point-in-time-correct training sets.

Every operator is thin over :class:`~airflow_mlops.hooks.feast.FeastHook` (or over pyarrow / pandas
for the source tables), returns a small JSON dict, and is idempotent for its interval: a rerun
replaces what it wrote. Feast and pandas are imported inside ``execute()`` only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator

from airflow_mlops.artifacts import ArtifactStore, as_path, safe_segment, sha256_of, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.ml.metrics import normalize_task
from airflow_mlops.operators.offline_store import PARTITION_FILE, read_parquet_batch, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from airflow.sdk import Context, ObjectStoragePath

#: Feature views get an Asset named ``<prefix><feature view>`` (see FeastMaterializeOperator).
ASSET_PREFIX = "feast_"


def feature_view_asset(feature_view: str, prefix: str = ASSET_PREFIX) -> Asset:
    """The name-only Asset that receives an event each time ``feature_view`` is materialized."""
    return Asset(name=f"{prefix}{feature_view}")


def parse_timestamp(value: Any, what: str) -> datetime:
    """A tz-aware UTC datetime from a datetime or an ISO-8601 string.

    :raises MLOpsArgumentError: the value has no time zone or is not a timestamp, naming ``what``.
    """
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise MLOpsArgumentError(
                f"{what} {value!r} is not an ISO-8601 timestamp.",
                fix="give e.g. '2013-01-02T00:00:00+00:00' or a template such as '{{ data_interval_start }}'.",
            ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise MLOpsArgumentError(
            f"{what} {value!r} has no time zone; feature timestamps are compared in UTC.",
            fix="add the offset, e.g. '+00:00'.",
        )
    return parsed.astimezone(UTC)


def _as_timedelta(value: timedelta | float | int | str | None, what: str) -> timedelta:
    if value is None or value == "":
        return timedelta(0)
    if isinstance(value, timedelta):
        return value
    try:
        return timedelta(seconds=float(value))
    except (TypeError, ValueError):
        raise MLOpsArgumentError(
            f"{what} {value!r} is neither a timedelta nor a number of seconds.",
            fix="pass timedelta(hours=...) or seconds.",
        ) from None


def _write_parquet(table: pa.Table, target: ObjectStoragePath) -> dict[str, Any]:
    import pyarrow.parquet as pq

    with staged(target) as tmp:
        pq.write_table(table, tmp)
    return {"uri": str(target), "rows": table.num_rows, "sha256": sha256_of(target)}


def _utc_column(frame: pd.DataFrame, column: str, where: str) -> pd.Series:
    """``frame[column]`` as tz-aware UTC timestamps; naive values are refused (they are ambiguous)."""
    import pandas as pd

    if column not in frame.columns:
        raise MLOpsInputError(
            f"{where} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}).",
            fix="name the event timestamp column with event_timestamp_column= / timestamp_column=.",
        )
    series = frame[column]
    if not isinstance(series.dtype, pd.DatetimeTZDtype):
        raise MLOpsInputError(
            f"column {column!r} of {where} is {series.dtype}, not a tz-aware timestamp.",
            fix="write the column as a UTC timestamp (pandas: pd.to_datetime(..., utc=True)).",
        )
    return series.dt.tz_convert("UTC")


class FeatureSourceSnapshotOperator(BaseOperator):
    """Publish a reference table (e.g. weather, planes) as a Feast source table in the offline store.

    Writes ``<offline_root>/<table>/part-0.parquet`` atomically with two added columns: ``event_timestamp``
    (tz-aware UTC: ``timestamp_column`` converted, or the fixed ``as_of`` for a snapshot without time)
    and ``as_of`` (the same instant, exposed as a feature so training rows show the age of each value).

    :param source_uri: the landed table (parquet file or folder); relative paths are under
        ``[mlops] landing_root`` (templated).
    :param table: offline-store table name (templated).
    :param timestamp_column: column holding each row's tz-aware event time.
    :param as_of: ISO timestamp stamped on every row when the table has no time column (templated).
    :param rename: columns to rename, ``{old: new}``.
    :param columns: columns to keep (after renaming); all when omitted.
    :param offline_root: offline-store root; default ``[mlops] offline_root`` (templated).
    """

    template_fields: Sequence[str] = ("source_uri", "table", "as_of", "offline_root")
    ui_color = "#e8e0f8"

    def __init__(
        self,
        *,
        source_uri: str,
        table: str,
        timestamp_column: str | None = None,
        as_of: str | None = None,
        rename: dict[str, str] | None = None,
        columns: Sequence[str] | None = None,
        offline_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (timestamp_column is None) == (as_of is None):
            raise MLOpsArgumentError(
                f"task {kwargs.get('task_id')!r}: give exactly one of timestamp_column and as_of.",
                fix="timestamp_column= for a table with an event time per row, as_of= for a snapshot.",
            )
        self.source_uri = source_uri
        self.table = table
        self.timestamp_column = timestamp_column
        self.as_of = as_of
        self.rename = rename or {}
        self.columns = list(columns) if columns else None
        self.offline_root = offline_root

    def execute(self, context: Context) -> dict[str, Any]:
        import pyarrow as pa

        settings = ArtifactStore().settings
        source = as_path(resolve_uri(self.source_uri, settings.landing_root))
        frame = read_parquet_batch(source).to_pandas().rename(columns=self.rename)
        if self.timestamp_column:
            stamps = _utc_column(frame, self.timestamp_column, f"table {str(source)!r}")
        else:
            stamps = parse_timestamp(self.as_of, "as_of")
        if self.columns:
            missing = [c for c in self.columns if c not in frame.columns]
            if missing:
                raise MLOpsInputError(
                    f"table {str(source)!r} lacks column(s) {', '.join(missing)}.",
                    fix="correct columns= (names after rename=) or re-land the table.",
                )
            frame = frame[self.columns].copy()
        frame["event_timestamp"] = stamps
        # Microseconds, as the landed data has: DuckDB hands nanosecond timestamps to Feast as text.
        frame["event_timestamp"] = frame["event_timestamp"].astype("datetime64[us, UTC]")
        frame["as_of"] = frame["event_timestamp"]
        root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        target = as_path(root).joinpath(safe_segment(self.table), PARTITION_FILE)
        result = _write_parquet(pa.Table.from_pandas(frame, preserve_index=False), target)
        self.log.info("Published %d rows of %s as feature source %s", result["rows"], source, target)
        return {"table": self.table, **result}


# ------------------------------------------------------------------------ days to materialize
#: task id of the features DAG's first task (FeaturePendingDaysOperator); its XCom is the run's window
PENDING_TASK = "feature_window"


def day_window(first: date, last: date, *, timezone: str, available_after_hours: float) -> dict[str, str]:
    """``first`` and ``last`` day, ``start`` (local midnight of the first day) and ``end`` (local
    midnight after the last day plus ``available_after_hours``), ISO in UTC."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(timezone)
    start = datetime.combine(first, time(), zone)
    end = datetime.combine(last + timedelta(days=1), time(), zone) + timedelta(hours=available_after_hours)
    return {
        "first": first.isoformat(),
        "last": last.isoformat(),
        "start": start.astimezone(UTC).isoformat(),
        "end": end.astimezone(UTC).isoformat(),
    }


def _stat_key(path: ObjectStoragePath) -> str:
    """A cheap fingerprint of a partition file that changes when the file is rewritten: the object
    store's ETag / generation where there is one, else size, modification time and inode."""
    info = dict(path.stat())
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return f"{key}:{info[key]}"
    return f"{info.get('size')}:{info.get('mtime')}:{info.get('ino')}"


class MaterializedDays:
    """Which days of an offline table a features DAG materialized, with the data version of each:
    ``{"YYYY-MM-DD": {"sha256": ..., "stat": ...}}`` in one JSON file under the artifact root
    (``_state/features/<key>.json``), written atomically. One features DAG writes it (its runs are
    serialized by ``max_active_runs=1``).

    :param key: the state's name, e.g. the features DAG id.
    :param table: the offline-store table whose ``date=YYYY-MM-DD`` partitions are the published days.
    :param offline_root: offline-store root; default ``[mlops] offline_root``.
    """

    def __init__(self, key: str, table: str, offline_root: str | None = None) -> None:
        self.key = key
        self.table = table
        self.offline_root = offline_root

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore()

    @cached_property
    def path(self) -> ObjectStoragePath:
        return self.store.path("_state", "features", f"{self.key}.json")

    @cached_property
    def table_root(self) -> ObjectStoragePath:
        settings = self.store.settings
        root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        return as_path(root).joinpath(safe_segment(self.table))

    def recorded(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        try:
            return dict(json.loads(self.path.read_bytes())["days"])
        except (ValueError, KeyError, TypeError) as err:
            raise MLOpsInputError(
                f"the record of materialized days {str(self.path)!r} is not readable ({err}).",
                fix="delete it: the next features run then materializes every published day again.",
            ) from err

    def record(self, versions: dict[str, dict[str, str]]) -> None:
        days = {**self.recorded(), **versions}
        self.store.write_json(self.path, {"table": self.table, "days": dict(sorted(days.items()))})

    def published(self) -> dict[str, ObjectStoragePath]:
        """``{day: partition file}`` of every published day of the table."""
        if not self.table_root.exists():
            return {}
        days = {}
        for folder in self.table_root.iterdir():
            name = folder.name
            if not name.startswith("date="):
                continue
            try:
                day = date.fromisoformat(name.removeprefix("date=")).isoformat()
            except ValueError:
                continue
            part = folder.joinpath(PARTITION_FILE)
            if part.exists():
                days[day] = part
        return dict(sorted(days.items()))

    def pending(self) -> tuple[list[str], dict[str, dict[str, str]]]:
        """The published days not materialized at their current version, and the current version of
        every published day (the sha256 is computed only for files whose fingerprint changed)."""
        recorded = self.recorded()
        pending, versions = [], {}
        for day, part in self.published().items():
            stat = _stat_key(part)
            known = recorded.get(day) or {}
            if known.get("stat") == stat:
                versions[day] = known
                continue
            sha = sha256_of(part)
            versions[day] = {"sha256": sha, "stat": stat}
            if known.get("sha256") != sha:
                pending.append(day)
        return pending, versions


def _days_named(context: Context) -> list[str]:
    """Days named by the triggering offline-store events (``extra.partitions`` / ``extra.partition``)."""
    events = context.get("triggering_asset_events") or {}
    return sorted(
        {
            str(partition).removeprefix("date=")
            for asset_events in events.values()
            for event in asset_events
            for partition in ((event.extra or {}).get("partitions") or [(event.extra or {}).get("partition")])
            if partition
        }
    )


class FeaturePendingDaysOperator(BaseOperator):
    """Decide which days a features run processes: every day published in the offline table and not
    yet materialized at its current data version (see :class:`MaterializedDays`), whatever the
    triggering Asset events name. An event that Airflow merged into another run or never queued
    therefore delays nothing past the next run, and a duplicate event does no work twice. A manual run's
    conf ``{"day": "YYYY-MM-DD", "last_day": "YYYY-MM-DD"}`` adds those days even if they were
    materialized (to rebuild them).

    Returns the window ``first``, ``last`` (days), ``start``, ``end`` (ISO instants, see
    :func:`day_window`), ``days`` (the days due) and ``versions`` (the data version of each published
    day in [first, last], which :class:`FeatureDaysRecordOperator` records once the run succeeded).
    With no day due, the task is skipped, and with it the run's other tasks.

    :param table: the offline-store table the features are computed from (templated).
    :param timezone: time zone of the days.
    :param available_after_hours: hours after the local midnight ending the last day until which
        its features are materialized (``end``).
    :param state_key: name of the record of materialized days; default the DAG id.
    :param offline_root: offline-store root; default ``[mlops] offline_root`` (templated).
    """

    template_fields: Sequence[str] = ("table", "offline_root")
    ui_color = "#e8e0f8"

    def __init__(
        self,
        *,
        table: str,
        timezone: str = "UTC",
        available_after_hours: float = 0.0,
        state_key: str | None = None,
        offline_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.table = table
        self.timezone = timezone
        self.available_after_hours = available_after_hours
        self.state_key = state_key
        self.offline_root = offline_root

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        state = MaterializedDays(self.state_key or self.dag_id, self.table, self.offline_root)
        pending, versions = state.pending()
        named = _days_named(context)
        dag_run = context.get("dag_run")
        conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
        forced: list[str] = []
        if conf.get("day"):
            try:
                first = date.fromisoformat(str(conf["day"]))
                last = date.fromisoformat(str(conf.get("last_day") or conf["day"]))
            except ValueError:
                raise MLOpsArgumentError(
                    f"the run's conf {conf!r} has a 'day' or 'last_day' that is not a YYYY-MM-DD date.",
                    fix='trigger it with conf {"day": "YYYY-MM-DD", "last_day": "YYYY-MM-DD"}.',
                ) from None
            if last < first:
                raise MLOpsArgumentError(
                    f"the run's conf has last_day {last} before day {first}.", fix="swap them."
                )
            forced = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
        days = sorted(set(pending) | set(forced))
        if not days:
            raise AirflowSkipException(
                f"nothing to materialize: every published day of {self.table!r} "
                f"({len(versions)}) is materialized at its current version (events named {named or 'none'})."
            )
        window = day_window(
            date.fromisoformat(days[0]),
            date.fromisoformat(days[-1]),
            timezone=self.timezone,
            available_after_hours=self.available_after_hours,
        )
        unnamed = sorted(set(pending) - set(named))
        self.log.info(
            "Days due: %s .. %s (%d): events named %s; published and not materialized without an event: %s",
            days[0],
            days[-1],
            len(days),
            named or "none",
            unnamed or "none",
        )
        in_window = {d: v for d, v in versions.items() if window["first"] <= d <= window["last"]}
        return {**window, "days": days, "named": named, "versions": in_window}


class FeatureDaysRecordOperator(BaseOperator):
    """Record the days a features run materialized, with their data version (the last task of the
    run: a failed run records nothing, so its days stay due). Returns ``recorded`` (days) and
    ``published_meanwhile``: days published or changed while the run ran (their events queue the next run,
    which takes them).

    :param window: the XCom of :class:`FeaturePendingDaysOperator` (templated / an XComArg).
    :param table: the offline-store table (templated).
    :param state_key: name of the record; default the DAG id.
    :param offline_root: offline-store root; default ``[mlops] offline_root`` (templated).
    """

    template_fields: Sequence[str] = ("window", "table", "offline_root")
    ui_color = "#e8e0f8"

    def __init__(
        self,
        *,
        window: Any,
        table: str,
        state_key: str | None = None,
        offline_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.window = window
        self.table = table
        self.state_key = state_key
        self.offline_root = offline_root

    def execute(self, context: Context) -> dict[str, Any]:
        window = self.window
        if isinstance(window, str):
            window = json.loads(window)
        if not isinstance(window, dict) or "versions" not in window:
            raise MLOpsArgumentError(
                f"task {self.task_id!r}: window {str(window)[:200]!r} is not the output of a "
                "FeaturePendingDaysOperator.",
                fix=f"pass window=<pending task>.output (the factory's task {PENDING_TASK!r}).",
            )
        state = MaterializedDays(self.state_key or self.dag_id, self.table, self.offline_root)
        state.record(window["versions"])
        meanwhile, _ = state.pending()
        self.log.info(
            "Recorded %d materialized day(s) %s .. %s; published meanwhile: %s",
            len(window["versions"]),
            window["first"],
            window["last"],
            meanwhile or "none",
        )
        return {"recorded": sorted(window["versions"]), "published_meanwhile": meanwhile}


def _label_balance(labels: pd.Series, task: str, classes: list[Any]) -> dict[str, Any]:
    """How the labels of a training set are spread: rows per class (binary also ``positive``,
    ``negative`` and ``positive_rate``, the positive class being the last of ``classes``), or the
    label's mean, standard deviation and range for regression."""
    if task == "regression":
        values = labels.astype("float64")
        return {
            "mean": round(float(values.mean()), 6),
            "std": round(float(values.std()), 6),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    counts = {str(c): int((labels == c).sum()) for c in classes}
    if task == "binary":
        positive, negative = counts[str(classes[-1])], counts[str(classes[0])]
        return {"positive": positive, "negative": negative, "positive_rate": round(positive / len(labels), 6)}
    return {"classes": counts}


class _FeastOperator(BaseOperator):
    """Shared arguments of the Feast operators and the hook built once per task instance.

    :param repo_path: the Feast repository folder; default the connection's extra ``repo_path``
        (templated).
    :param feast_conn_id: Airflow connection of type ``feast`` (optional for the default id).
    :param online_store: online-store settings merged over the repository's and the connection's.
    """

    template_fields: Sequence[str] = ("repo_path",)
    ui_color = "#f0e0d0"

    def __init__(
        self,
        *,
        repo_path: str | None = None,
        feast_conn_id: str | None = FeastHook.default_conn_name,
        online_store: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.repo_path = repo_path
        self.feast_conn_id = feast_conn_id
        self.online_store = online_store

    @cached_property
    def hook(self) -> FeastHook:
        return FeastHook(
            feast_conn_id=self.feast_conn_id, repo_path=self.repo_path, online_store=self.online_store
        )


class FeastApplyOperator(_FeastOperator):
    """Register the repository's entities, feature views and services (``feast apply``). Idempotent:
    when the registry already matches the definitions nothing is written; objects removed from the
    definitions are removed from the registry.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        result = self.hook.apply()
        self.log.info(
            "Feast apply of %s: %d change(s) %s", self.hook.repo_path, result["changes"], result["changed"]
        )
        return result


class FeastMaterializeOperator(_FeastOperator):
    """Materialize an interval of feature views into the online store.

    The interval is [``start`` - ``overlap``, ``end``]; without ``start``/``end`` it is the task's data
    interval. The overlap re-reads rows that arrived late for earlier intervals, so they reach the
    online store (the latest row per entity wins; rerunning an interval writes the same values again
    and never adds rows). Each Asset in ``outlets`` named ``feast_<feature view>`` receives an event
    whose ``extra`` holds the rows written; with an explicit ``feature_views`` list those Assets are
    added to ``outlets`` automatically.

    :param start: interval start, ISO timestamp with offset (templated).
    :param end: interval end (templated).
    :param overlap: how far before ``start`` to re-read for late rows (timedelta or seconds).
    :param feature_views: names to materialize; all registered when omitted (templated).
    """

    template_fields: Sequence[str] = (*_FeastOperator.template_fields, "start", "end", "feature_views")

    def __init__(
        self,
        *,
        start: str | None = None,
        end: str | None = None,
        overlap: timedelta | float | None = None,
        feature_views: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        outlets = list(kwargs.pop("outlets", None) or [])
        if isinstance(feature_views, list | tuple):
            named = {getattr(o, "name", None) for o in outlets}
            outlets += [feature_view_asset(v) for v in feature_views if f"{ASSET_PREFIX}{v}" not in named]
        super().__init__(outlets=outlets, **kwargs)
        self.start = start
        self.end = end
        self.overlap = overlap
        self.feature_views = feature_views

    def _interval(self, context: Context) -> tuple[datetime, datetime]:
        start = self.start or context.get("data_interval_start")
        end = self.end or context.get("data_interval_end")
        if not start or not end:
            raise MLOpsArgumentError(
                f"task {self.task_id!r} has no interval to materialize: start/end are not set and the run "
                "has no data interval.",
                fix="pass start= and end= (templated), e.g. from the triggering Asset events.",
            )
        first = parse_timestamp(start, "start") - _as_timedelta(self.overlap, "overlap")
        last = parse_timestamp(end, "end")
        if last <= first:
            raise MLOpsArgumentError(
                f"interval end {last.isoformat()} is not after start {first.isoformat()}.",
                fix="correct start/end.",
            )
        return first, last

    def execute(self, context: Context) -> dict[str, Any]:
        start, end = self._interval(context)
        views = self.feature_views
        if isinstance(views, str):
            views = [v.strip() for v in views.split(",") if v.strip()]
        written = self.hook.materialize(start, end, views or None)
        result = {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "online_store": self.hook.online_store_type,
            "rows": written,
        }
        for outlet in self.outlets:
            name = getattr(outlet, "name", "") or ""
            view = name.removeprefix(ASSET_PREFIX)
            if name.startswith(ASSET_PREFIX) and view in written:
                context["outlet_events"][outlet].extra = {
                    "feature_view": view,
                    "rows": written[view],
                    "start": result["start"],
                    "end": result["end"],
                }
        return result


class FeastTrainingDatasetOperator(_FeastOperator):
    """Build a point-in-time-correct training set: the rows of an entity dataframe joined with the
    feature values known at each row's event timestamp (never later), from a feature service.

    Rows without a label are dropped (counted in the manifest). The labels of the built set are checked
    against ``task`` before anything is written: a label that does not fit (one class for a binary model,
    text for a regression model, ...) fails the task naming the column, the values seen and the fix.
    Writes ``<name>.parquet`` and ``<name>.manifest.json`` to the run's artifact folder; the manifest
    holds the task, the classes, the feature refs, row count, time range, label balance (rows per class,
    or the label's mean and range for regression), sha256 and data URI, and is what the task returns.

    :param entity_uri: parquet file or folder (hive ``date=`` partitions allowed) of entity rows with
        join keys, ``event_timestamp_column`` (tz-aware) and ``label_column``; relative paths are under
        ``[mlops] offline_root`` (templated).
    :param feature_service: the Feast feature service to join (templated).
    :param label_column: the label column (templated).
    :param task: ``binary`` (two classes), ``multiclass`` (three or more, strings allowed) or
        ``regression`` (numbers): what the labels are checked against.
    :param event_timestamp_column: entity rows' event time column.
    :param start: keep entity rows from this time on, ISO with offset (templated).
    :param end: keep entity rows before this time (templated).
    :param name: artifact base name.
    """

    template_fields: Sequence[str] = (
        *_FeastOperator.template_fields,
        "entity_uri",
        "feature_service",
        "label_column",
        "start",
        "end",
    )

    def __init__(
        self,
        *,
        entity_uri: str,
        feature_service: str,
        label_column: str,
        task: str = "binary",
        event_timestamp_column: str = "event_timestamp",
        start: str | None = None,
        end: str | None = None,
        name: str = "training_set",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entity_uri = entity_uri
        self.feature_service = feature_service
        self.label_column = label_column
        # not templated: a task that is not known fails when the DAG is parsed
        self.task = normalize_task(task)
        self.event_timestamp_column = event_timestamp_column
        self.start = start
        self.end = end
        self.name = name

    def _entities(self, uri: str) -> pd.DataFrame:
        import pyarrow as pa
        import pyarrow.dataset as ds

        path = as_path(uri)
        if not path.exists():
            raise MLOpsInputError(
                f"entity dataframe {uri!r} does not exist.",
                fix="write the entity rows first (the lifecycle's feature steps) or correct entity_uri.",
            )
        try:
            dataset = ds.dataset(path.path, filesystem=path.fs, format="parquet", partitioning="hive")
            return dataset.to_table().to_pandas()
        except (pa.ArrowException, OSError) as err:
            raise MLOpsInputError(
                f"entity dataframe {uri!r} is not readable parquet ({err}).", fix="rewrite the file(s)."
            ) from err

    def execute(self, context: Context) -> dict[str, Any]:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from airflow_mlops.ml.metrics import check_labels

        task = normalize_task(self.task)
        store = ArtifactStore()
        uri = resolve_uri(self.entity_uri, store.settings.offline_root)
        entities = self._entities(uri)
        where = f"entity dataframe {uri!r}"
        ts = _utc_column(entities, self.event_timestamp_column, where)
        entities[self.event_timestamp_column] = ts
        if self.label_column not in entities.columns:
            raise MLOpsInputError(
                f"{where} has no label column {self.label_column!r}.",
                fix="correct label_column= or the entity dataframe.",
            )
        keep = entities[self.label_column].notna()
        if self.start:
            keep &= ts >= parse_timestamp(self.start, "start")
        if self.end:
            keep &= ts < parse_timestamp(self.end, "end")
        in_range = (ts >= parse_timestamp(self.start, "start")) if self.start else ts.notna()
        if self.end:
            in_range &= ts < parse_timestamp(self.end, "end")
        dropped = int((in_range & entities[self.label_column].isna()).sum())
        entities = entities[keep].drop(columns=[c for c in ("date",) if c in entities.columns])
        if entities.empty:
            raise MLOpsInputError(
                f"{where} has no labelled rows in [{self.start}, {self.end}).",
                fix="check the interval and that the entity rows were written for it.",
            )
        entities = entities.rename(columns={self.event_timestamp_column: "event_timestamp"})
        entities = entities.sort_values("event_timestamp", kind="stable").reset_index(drop=True)

        service = self.hook.feature_service(self.feature_service)
        refs = [
            f"{projection.name_to_use()}:{feature.name}"
            for projection in service.feature_view_projections
            for feature in projection.features
        ]
        frame = self.hook.historical_features(entities, self.feature_service)
        # the same rows in the same order on every run: by event time, ties broken by the entity columns
        order = ["event_timestamp", *(c for c in entities.columns if c != "event_timestamp" and c in frame)]
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
        # before anything is written: a label that does not fit the task leaves no training set behind
        classes = check_labels(
            frame[self.label_column], task, label=self.label_column, origin=f"the {self.name} from {uri!r}"
        )

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
        data = store.write_bytes(store.for_task(context, f"{self.name}.parquet"), buffer.getvalue())
        manifest = {
            "task": task,
            "classes": classes,
            "data_uri": data.uri,
            "sha256": data.sha256,
            "size": data.size,
            "rows": len(frame),
            "feature_service": self.feature_service,
            "feature_refs": refs,
            "label": self.label_column,
            "label_balance": _label_balance(frame[self.label_column], task, classes),
            "event_timestamp_column": "event_timestamp",
            "time_range": {
                "start": frame["event_timestamp"].min().isoformat(),
                "end": frame["event_timestamp"].max().isoformat(),
            },
            "entity_uri": uri,
            "dropped_unlabelled": dropped,
            "repo_path": str(self.hook.repo_path),
        }
        written = store.write_json(store.for_task(context, f"{self.name}.manifest.json"), manifest)
        self.log.info(
            "Training set %s (%s): %d rows, %d features, labels %s",
            data.uri,
            task,
            manifest["rows"],
            len(refs),
            manifest["label_balance"],
        )
        return {**manifest, "manifest_uri": written.uri}


__all__ = [
    "PENDING_TASK",
    "FeastApplyOperator",
    "FeatureDaysRecordOperator",
    "FeaturePendingDaysOperator",
    "MaterializedDays",
    "day_window",
    "FeastMaterializeOperator",
    "FeastTrainingDatasetOperator",
    "FeatureSourceSnapshotOperator",
    "feature_view_asset",
    "parse_timestamp",
]
