"""Score a window of the offline store with a registered model into a predictions table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_mlops.artifacts import ArtifactStore, as_path, safe_segment, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.drift import window_dates
from airflow_mlops.operators.offline_store import PARTITION_FILE, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context

    from airflow_mlops.ml.signature import ModelSignature


class BatchScoringOperator(BaseOperator):
    """Score every row of a window of an offline-store table with a registered model (by default the
    production version) and write the answers as a predictions table, partitioned like the input.

    For each day of the window, ``<offline_root>/<table>/date=<day>/`` is scored into
    ``<offline_root>/<output_table>/date=<day>/part-0.parquet``, written atomically: a rerun of the same
    interval replaces the same partitions (never duplicates rows), and a failed run leaves the previous ones.
    Each scored row keeps the model's entity keys and request features (and ``carry_columns``) and gets the
    answer the serving endpoint gives for it: ``prediction``, ``probability`` (binary) or
    ``probability_<class>`` (multiclass), ``model`` and ``model_version`` (see
    :mod:`airflow_mlops.ml.batch_scoring`). Features the model reads from the feature store and the table
    lacks are joined point in time from the version's Feast feature service (the table then needs
    ``event_timestamp``). The model is loaded through the registry (sha256 checked).

    Windows of at least ``parallel_min_rows`` rows are scored by Ray tasks of ``chunk_rows`` rows each, on
    a Ray started inside the task (``ray_num_cpus`` CPUs); smaller ones in the task's own process, which
    avoids Ray's start-up. The default (5 million rows) is about where the CPUs Ray adds pay for its start-up
    on a worker of a few cores (``benchmarks/bench_delivery.py``: ~117,000 rows/s in the task's process
    against ~25 s to start Ray here).

    Returns ``{"model", "version", "table", "output_table", "days", "partitions", "rows", "missing_days",
    "on_ray"}``; the Assets in ``outlets`` receive an event whose ``extra`` names the model, version,
    output table, partitions and rows.

    :param model_name: registry name of the model (templated).
    :param table: offline-store table to score (templated).
    :param window_end: last day of the window, ``YYYY-MM-DD`` (templated, e.g. ``{{ ds }}``).
    :param window_days: days in the window, ending with ``window_end`` (templated).
    :param window_start: first day instead of ``window_days`` (templated).
    :param version: registered version to score with; empty: the production version (templated).
    :param output_table: table of the predictions; default ``<model_name>_predictions`` (templated).
    :param offline_root: root URI of the offline store; default ``[mlops] offline_root`` (templated).
    :param joins: tables joined onto each day's rows before scoring (as ``EvidentlyDriftOperator``'s).
    :param carry_columns: more input columns to keep in the predictions (e.g. a row id or the event time).
    :param feature_repo: Feast repository folder for features joined from the feature service.
    :param feast_conn_id: optional ``feast`` connection for that repository.
    :param parallel_min_rows: rows from which the window is scored on Ray (0: always; a huge number: never).
    :param chunk_rows: rows per Ray task.
    :param ray_num_cpus: CPUs of the Ray started for the task; default ``[mlops] ray_num_cpus``.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "table",
        "window_end",
        "window_days",
        "window_start",
        "version",
        "output_table",
        "offline_root",
    )
    ui_color = "#e6e0f8"

    def __init__(
        self,
        *,
        model_name: str,
        table: str,
        window_end: str,
        window_days: int | str = 1,
        window_start: str | None = None,
        version: str | None = None,
        output_table: str | None = None,
        offline_root: str | None = None,
        joins: Sequence[dict[str, Any]] | None = None,
        carry_columns: Sequence[str] = (),
        feature_repo: str | None = None,
        feast_conn_id: str | None = None,
        parallel_min_rows: int = 5_000_000,
        chunk_rows: int = 100_000,
        ray_num_cpus: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if chunk_rows < 1:
            raise MLOpsArgumentError(
                f"chunk_rows must be at least 1, not {chunk_rows}.", fix="pass the rows per Ray task."
            )
        if parallel_min_rows < 0:
            raise MLOpsArgumentError(
                f"parallel_min_rows must not be negative, not {parallel_min_rows}.",
                fix="pass 0 to always score on Ray, or the rows from which Ray pays for its start-up.",
            )
        self.model_name = model_name
        self.table = table
        self.window_end = window_end
        self.window_days = window_days
        self.window_start = window_start
        self.version = version
        self.output_table = output_table
        self.offline_root = offline_root
        self.joins = [dict(j) for j in joins or ()]
        self.carry_columns = list(carry_columns)
        self.feature_repo = feature_repo
        self.feast_conn_id = feast_conn_id
        self.parallel_min_rows = parallel_min_rows
        self.chunk_rows = chunk_rows
        self.ray_num_cpus = ray_num_cpus

    def execute(self, context: Context) -> dict[str, Any]:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        from airflow_mlops.hooks.bentoml import BentoMLHook
        from airflow_mlops.ml.batch_scoring import (
            answer_column_names,
            carried_columns,
            score_frame,
            split_rows,
        )
        from airflow_mlops.ml.signature import signature_of

        settings = ArtifactStore().settings
        root = resolve_uri(self.offline_root or settings.offline_root, settings.offline_root)
        output_table = self.output_table or f"{self.model_name}_predictions"
        if safe_segment(output_table) == safe_segment(self.table):
            raise MLOpsArgumentError(
                f"output_table {output_table!r} is the table being scored.",
                fix="write the predictions to a table of their own (default <model>_predictions).",
            )
        hook = BentoMLHook()
        version, record = hook.served_record(self.model_name, self.version or None)
        signature = signature_of(record, tag=record.get("tag"))
        predictor = hook.load(self.model_name, version)
        days = window_dates(str(self.window_end), int(self.window_days), self.window_start or None)

        whole, sizes, missing_days = self._read_window(root, days)
        whole = self._with_store_features(whole, signature, version)
        carry = carried_columns(signature, whole.columns, self.carry_columns)
        clash = sorted(set(carry) & set(answer_column_names(signature)))
        if clash:
            raise MLOpsArgumentError(
                f"input columns {clash} have the names of the answer columns scoring adds.",
                fix="leave them out of carry_columns (or rename them in the table).",
            )
        rows = len(whole)
        on_ray = rows >= self.parallel_min_rows
        self.log.info(
            "Scoring %d rows of %s (%d days, %s) with %s:%s %s",
            rows,
            self.table,
            len(sizes),
            f"missing {missing_days}" if missing_days else "none missing",
            self.model_name,
            version,
            "on Ray" if on_ray else "in this process",
        )
        options = {"carry": carry, "model": self.model_name, "version": version}
        # the window in pieces of chunk_rows (one model call each, whatever the days), then back into days
        days_scored = list(sizes)
        pieces = split_rows(whole, self.chunk_rows)
        if on_ray:
            parts = self._score_on_ray(predictor, signature, pieces, options)
        else:
            from threadpoolctl import threadpool_limits

            # one OpenMP thread per model call, as in the service: on a host shared with other tasks a
            # team of threads per call is many times slower (measured: 3,200 against 28,600 rows/s)
            with threadpool_limits(limits=1, user_api="openmp"):
                parts = [score_frame(predictor, signature, piece, **options) for piece in pieces]
        answered = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        offsets = [sum(list(sizes.values())[:i]) for i in range(len(sizes) + 1)]
        scored = {day: answered.iloc[offsets[i] : offsets[i + 1]] for i, day in enumerate(days_scored)}

        table_root = as_path(root).joinpath(safe_segment(output_table))
        partitions = []
        for day, frame in scored.items():
            target = table_root.joinpath(f"date={day}", PARTITION_FILE)
            with staged(target) as tmp:
                pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), tmp)
            partitions.append({"partition": f"date={day}", "uri": str(target), "rows": len(frame)})
        result = {
            "model": self.model_name,
            "version": version,
            "table": self.table,
            "output_table": output_table,
            "days": list(scored),
            "partitions": [p["partition"] for p in partitions],
            "rows": rows,
            "missing_days": missing_days,
            "on_ray": on_ray,
        }
        self.log.info("Wrote %d predictions to %d partition(s) of %s", rows, len(partitions), table_root)
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                k: result[k] for k in ("model", "version", "output_table", "partitions", "rows")
            }
        return result

    def _score_on_ray(
        self, predictor: Any, signature: ModelSignature, pieces: list[pd.DataFrame], options: dict[str, Any]
    ) -> list[pd.DataFrame]:
        from airflow_mlops.hooks.ray import RayHook
        from airflow_mlops.ml.batch_scoring import score_on_ray

        with RayHook(ray_conn_id=None).local_ray(self.ray_num_cpus, bytecode_cache=True):
            return score_on_ray(predictor, signature, pieces, **options)

    def _read_window(self, root: str, days: list[str]) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
        """The rows of ``days`` (one frame, day after day, joins applied), the rows of each day read and
        the days without a partition (or with an empty one)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from airflow_mlops.operators.drift import join_tables

        table_root = as_path(root).joinpath(safe_segment(self.table))
        tables, sizes, missing = [], {}, []
        for day in days:
            part = table_root.joinpath(f"date={day}", PARTITION_FILE)
            if not part.exists():
                missing.append(day)
                continue
            with part.open("rb") as handle:
                table = pq.read_table(handle)
            if not table.num_rows:
                missing.append(day)
                continue
            tables.append(table)
            sizes[day] = table.num_rows
        if not tables:
            raise MLOpsInputError(
                f"nothing to score: table {self.table!r} has no rows for {days[0]}..{days[-1]} under "
                f"{str(table_root)!r}.",
                fix="check that the ingest DAG published these days, or move the window (window_end, "
                "window_days).",
            )
        # one conversion to pandas for the whole window (per day, it took half of the scoring time)
        whole = pa.concat_tables(tables, promote_options="permissive").to_pandas()
        return join_tables(whole, self.joins, root), sizes, missing

    def _with_store_features(
        self, frame: pd.DataFrame, signature: ModelSignature, version: str
    ) -> pd.DataFrame:
        """``frame`` with the features the model reads from the feature store and ``frame`` lacks, joined
        point in time from the version's Feast feature service."""
        import pandas as pd

        missing = [f for f in signature.features if f not in frame.columns]
        if not missing:
            return frame
        service = signature.feature_service
        if not service:
            raise MLOpsInputError(
                f"table {self.table!r} lacks the features {missing} of {self.model_name}:{version}, which "
                "records no feature service to join them from.",
                fix="score a table that holds them (or add joins=), or register the model with its feature "
                "service.",
            )
        if "event_timestamp" not in frame.columns:
            raise MLOpsInputError(
                f"table {self.table!r} has no event_timestamp, so the features {missing} of service "
                f"{service!r} cannot be joined point in time.",
                fix="score the entity table the features DAG writes, which has event_timestamp and the join "
                "keys.",
            )
        from airflow_mlops.hooks.feast import FeastHook

        order = "__mlops_row"
        entities = frame.drop(columns=[c for c in ("date",) if c in frame.columns]).assign(
            event_timestamp=pd.to_datetime(frame["event_timestamp"], utc=True), **{order: range(len(frame))}
        )
        hook = FeastHook(feast_conn_id=self.feast_conn_id, repo_path=self.feature_repo or None)
        joined = hook.historical_features(entities.reset_index(drop=True), service)
        # Feast returns the rows in an order of its own: back to the window's (day after day)
        joined = joined.sort_values(order, kind="stable").drop(columns=[order]).reset_index(drop=True)
        still = [f for f in missing if f not in joined.columns]
        if still:
            raise MLOpsInputError(
                f"feature service {service!r} does not provide the features {still} of "
                f"{self.model_name}:{version}.",
                fix="register the model with the feature service it was trained on.",
            )
        return joined
