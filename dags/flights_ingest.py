"""Ingest the landed flights batches: one run per day takes that day's batch into the offline store.

For each data interval (one New York day of flights):

1. ``wait_for_batch`` waits, deferred in the triggerer, until ``flights/date=<day>/flights.parquet`` has
   landed under ``[mlops] landing_root``;
2. ``validate_batch`` validates it with the Great Expectations suite ``expectations/flights_batch.json``;
   a batch that fails (or cannot be read) is moved to ``<[mlops] state_dir>/quarantine/flights/date=<day>/``
   with its result beside it, and the run fails naming each failed expectation;
3. ``publish_to_offline_store`` publishes the validated batch as the day's partition of the offline
   ``flights`` table, atomically and idempotently, and the ``flights_offline`` Asset receives an event
   with the row count.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG, Asset
from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator
from airflow_mlops.operators.validation import GXValidateOperator
from airflow_mlops.sensors.landing import LandedBatchSensor

FLIGHTS_OFFLINE = Asset(name="flights_offline")
DAY = "{{ data_interval_start | ds }}"

with DAG(
    dag_id="flights_ingest",
    description="Validate each landed day of flights, quarantine bad batches, publish good ones to the offline store.",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2013, 1, 1, tzinfo=UTC),
    end_date=datetime(2013, 12, 31, tzinfo=UTC),
    catchup=False,
    max_active_runs=4,
    tags=["mlops", "flights", "ingest"],
    doc_md=__doc__,
) as dag:
    wait = LandedBatchSensor(
        task_id="wait_for_batch",
        uri=f"flights/date={DAY}/flights.parquet",
        poke_interval=60,
        timeout=6 * 3600,
        deferrable=True,
    )
    validate = GXValidateOperator(
        task_id="validate_batch",
        data_uri="{{ ti.xcom_pull(task_ids='wait_for_batch') }}",
        expectation_suite="expectations/flights_batch.json",
        batch_date=DAY,
        batch_timezone="America/New_York",
        quarantine_uri=f"flights/date={DAY}",
    )
    publish = OfflinePartitionWriteOperator(
        task_id="publish_to_offline_store",
        source_uri="{{ ti.xcom_pull(task_ids='validate_batch')['data_uri'] }}",
        table="flights",
        partition=f"date={DAY}",
        outlets=[FLIGHTS_OFFLINE],
    )
    wait >> validate >> publish
