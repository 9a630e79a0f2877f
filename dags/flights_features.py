"""Feature steps of the flight-delay lifecycle (``flights.yaml`` next to this file): the rolling daily
delay statistics and the labelled flight rows, computed from the validated flights in the offline store.

Not part of the provider: like ``tests/lifecycle/seattle/seattle_features.py`` for the Seattle model, the
steps of a model live next to its spec. The DAG folder is on ``sys.path`` for the DAG processor and the
tasks, so the spec names the operator ``flights_features.FlightDailyStatsOperator``. This file holds no
DAG (``.airflowignore`` keeps the DAG processor from parsing it) and imports pandas only when a task runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_mlops.artifacts import ArtifactStore, as_path, staged
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.offline_store import PARTITION_FILE, read_parquet_batch, resolve_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context, ObjectStoragePath


class FlightDailyStatsOperator(BaseOperator):
    """Compute the rolling daily delay statistics per carrier and per origin from the validated flights,
    and the labelled flight rows training sets start from.

    For each day ``D`` in [``start_day``, ``end_day``] it reads the offline ``flights`` partitions
    ``D-window_days+1 .. D`` (day ``D`` must exist) and writes, each replacing the day's partition:

    - ``carrier_daily/date=D`` and ``origin_daily/date=D``: ``flights_7d``, ``arr_delay_mean_7d``,
      ``dep_delay_mean_7d``, ``delayed_rate_7d`` (arrival delay > ``delay_threshold`` minutes) and
      ``cancel_rate_7d``, stamped ``event_timestamp`` = midnight after ``D`` in ``timezone`` plus
      ``available_after`` (the statistics include the day's last arrivals, so they are not known before);
    - ``flights_labelled/date=D``: one row per flight with ``event_timestamp`` = scheduled departure (UTC),
      the join keys, ``arr_delay`` and the label ``delayed`` (null for cancelled or diverted flights).

    :param start_day: first day, ``YYYY-MM-DD`` (templated).
    :param end_day: last day, inclusive; default ``start_day`` (templated).
    :param window_days: days in the rolling window.
    :param delay_threshold: minutes of arrival delay above which a flight counts as delayed.
    :param timezone: time zone of the flights' local days.
    :param available_after: wall-clock time after the local midnight that ends a day at which its
        statistics become usable (default 06:00 the next morning).
    :param offline_root: offline-store root; default ``[mlops] offline_root`` (templated).
    """

    template_fields: Sequence[str] = ("start_day", "end_day", "offline_root")
    ui_color = "#e8e0f8"

    def __init__(
        self,
        *,
        start_day: str,
        end_day: str | None = None,
        window_days: int = 7,
        delay_threshold: float = 15.0,
        timezone: str = "America/New_York",
        available_after: timedelta = timedelta(hours=6),
        flights_table: str = "flights",
        offline_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.start_day = start_day
        self.end_day = end_day
        self.window_days = window_days
        self.delay_threshold = delay_threshold
        self.timezone = timezone
        self.available_after = available_after
        self.flights_table = flights_table
        self.offline_root = offline_root

    def _day(self, value: str, what: str) -> date:
        try:
            return date.fromisoformat(str(value).strip())
        except ValueError:
            raise MLOpsArgumentError(
                f"{what} {value!r} is not a YYYY-MM-DD day.",
                fix="pass e.g. '2013-01-02' or '{{ data_interval_start | ds }}'.",
            ) from None

    def execute(self, context: Context) -> dict[str, Any]:
        import pandas as pd

        first = self._day(self.start_day, "start_day")
        last = self._day(self.end_day or self.start_day, "end_day")
        if last < first:
            raise MLOpsArgumentError(
                f"end_day {last} is before start_day {first}.", fix="swap or correct the days."
            )
        settings = ArtifactStore().settings
        root = as_path(resolve_uri(self.offline_root or settings.offline_root, settings.offline_root))
        cache: dict[date, pd.DataFrame | None] = {}
        written: dict[str, int] = {"carrier_daily": 0, "origin_daily": 0, "flights_labelled": 0}
        days = []
        day = first
        while day <= last:
            window = [self._flights(root, day - timedelta(days=k), cache) for k in range(self.window_days)]
            if window[0] is None:
                raise MLOpsInputError(
                    f"offline partition {str(self._partition(root, day))!r} does not exist.",
                    fix="ingest the day first (DAG flights_ingest), then rerun this task.",
                )
            flights = pd.concat([w for w in window if w is not None], ignore_index=True)
            available = self._available_at(day)
            for key, table in (("carrier", "carrier_daily"), ("origin", "origin_daily")):
                stats = self._stats(flights, key, available, day)
                written[table] += self._publish(root, table, day, stats)
            written["flights_labelled"] += self._publish(
                root, "flights_labelled", day, self._labelled(window[0])
            )
            days.append(day.isoformat())
            day += timedelta(days=1)
        self.log.info("Daily statistics for %s .. %s: %s", first, last, written)
        return {"days": days, "rows": written, "offline_root": str(root)}

    def _partition(self, root: ObjectStoragePath, day: date) -> ObjectStoragePath:
        return root.joinpath(self.flights_table, f"date={day.isoformat()}", PARTITION_FILE)

    def _flights(self, root: ObjectStoragePath, day: date, cache: dict) -> pd.DataFrame | None:
        if day not in cache:
            path = self._partition(root, day)
            cache[day] = read_parquet_batch(path).to_pandas() if path.exists() else None
        return cache[day]

    def _available_at(self, day: date) -> pd.Timestamp:
        import pandas as pd

        # Wall-clock arithmetic: "06:00 the next morning" stays 06:00 across a daylight-saving change.
        local = pd.Timestamp(day + timedelta(days=1)) + self.available_after
        return local.tz_localize(self.timezone).tz_convert("UTC")

    def _stats(self, flights: pd.DataFrame, key: str, available: pd.Timestamp, day: date) -> pd.DataFrame:
        frame = flights.assign(
            delayed=(flights["arr_delay"] > self.delay_threshold).where(flights["arr_delay"].notna()),
            cancelled=flights["dep_time"].isna(),
        )
        grouped = frame.groupby(key, sort=True)
        stats = grouped.agg(
            flights_7d=("flight", "size"),
            arr_delay_mean_7d=("arr_delay", "mean"),
            dep_delay_mean_7d=("dep_delay", "mean"),
            delayed_rate_7d=("delayed", "mean"),
            cancel_rate_7d=("cancelled", "mean"),
        ).reset_index()
        stats["flights_7d"] = stats["flights_7d"].astype("int64")
        stats["delayed_rate_7d"] = stats["delayed_rate_7d"].astype("float64")
        stats["cancel_rate_7d"] = stats["cancel_rate_7d"].astype("float64")
        stats["day"] = day.isoformat()
        stats["event_timestamp"] = available
        stats["as_of"] = available
        return stats

    def _labelled(self, flights: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        departure = flights["time_hour"].dt.tz_convert("UTC") + pd.to_timedelta(flights["minute"], unit="m")
        delayed = (flights["arr_delay"] > self.delay_threshold).astype("Int64")
        delayed[flights["arr_delay"].isna()] = pd.NA
        return pd.DataFrame(
            {
                "event_timestamp": departure.astype("datetime64[us, UTC]"),
                "origin": flights["origin"],
                "dest": flights["dest"],
                "carrier": flights["carrier"],
                "tailnum": flights["tailnum"],
                "flight": flights["flight"],
                "distance": flights["distance"],
                "sched_hour": flights["hour"],
                "arr_delay": flights["arr_delay"],
                "delayed": delayed,
            }
        )

    def _publish(self, root: ObjectStoragePath, table: str, day: date, frame: pd.DataFrame) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # staged, then renamed: a rerun of the day replaces the partition whole, never half-written
        target = root.joinpath(table, f"date={day.isoformat()}", PARTITION_FILE)
        with staged(target) as tmp:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        return len(frame)
