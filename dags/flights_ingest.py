"""Ingest the landed flights batches: one run per day takes that day's batch into the offline store.

Data validation (Great Expectations) and quarantine join this DAG in their own stage; here the batch
is published as the day's partition of the offline ``flights`` table, atomically and idempotently,
and the ``flights_offline`` Asset receives an event with the row count.
"""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.sdk import DAG, Asset
from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator

FLIGHTS_OFFLINE = Asset(name="flights_offline")

with DAG(
    dag_id="flights_ingest",
    description="Take each landed day of flights into the offline store.",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2013, 1, 1, tzinfo=timezone.utc),
    end_date=datetime(2013, 12, 31, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=4,
    tags=["mlops", "flights", "ingest"],
    doc_md=__doc__,
) as dag:
    OfflinePartitionWriteOperator(
        task_id="publish_to_offline_store",
        source_uri="flights/date={{ data_interval_start | ds }}/flights.parquet",
        table="flights",
        partition="date={{ data_interval_start | ds }}",
        outlets=[FLIGHTS_OFFLINE],
    )
