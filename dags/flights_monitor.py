"""Watch the flight-delay model's inputs for drift, every day of data time; retraining follows by itself.

One run per data interval (one UTC day of flights, like ``flights_ingest``):

``drift`` reads the validated flights of the **last 7 days** up to the interval's day from the offline
store (``<offline_root>/flights/date=YYYY-MM-DD/part-0.parquet``), joins the hourly weather at the
origin (``<offline_root>/weather/part-0.parquet``, published by ``flights_features``) and compares the
flights drift columns (``FLIGHTS_DRIFT_COLUMNS``: weather, schedule, network) with Evidently 0.7
against the reference. It writes the HTML report and a JSON summary to the artifact store and, only
when the data drifted, emits an event on the ``flight_delay_drift`` Asset with the figures in its
``extra``. ``flights_train`` is scheduled on that Asset, so the scheduler starts a retraining by itself;
its ``retraining_gate`` lets at most one through per cooldown window.

The reference is the training snapshot of the ``flight_delay`` model in ``production`` (through the
registry), or, when the run's param ``reference_uri`` is set, that parquet file / folder / training
manifest. Before any model is in production the param is required: without it the run fails, naming
the missing production version, rather than comparing against nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG, Asset, Param
from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_mlops.operators.drift import FLIGHTS_DRIFT_COLUMNS, FLIGHTS_DRIFT_SHARE, EvidentlyDriftOperator

MODEL = "flight_delay"
# Name-only, as flights_train declares it (a URI scheme would make every parse discover the providers).
FLIGHT_DELAY_DRIFT = Asset(name="flight_delay_drift")
#: weather columns joined onto the flights: the ones the drift columns need
WEATHER_COLUMNS = [c for c in ("temp", "dewp") if c in FLIGHTS_DRIFT_COLUMNS]
DAY = "{{ data_interval_start | ds }}"

with DAG(
    dag_id="flights_monitor",
    description="Daily Evidently drift check of the last 7 days of validated flights; drift starts a retraining.",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2013, 1, 8, tzinfo=UTC),
    end_date=datetime(2013, 12, 31, tzinfo=UTC),
    catchup=False,
    max_active_runs=2,
    params={
        "reference_uri": Param(
            None,
            type=["null", "string"],
            description="Compare against this parquet / training manifest instead of the production "
            "model's training snapshot (required while no model is in production).",
        ),
        "window_days": Param(7, type="integer", minimum=1),
    },
    tags=["mlops", "flights", "monitor"],
    doc_md=__doc__,
) as dag:
    EvidentlyDriftOperator(
        task_id="drift",
        model_name=MODEL,
        # empty when the param is unset: the operator then takes the production model's reference
        reference_uri="{{ params.reference_uri or '' }}",
        window_end=DAY,
        window_days="{{ params.window_days }}",
        table="flights",
        joins=[{"uri": "weather/part-0.parquet", "on": ["origin", "time_hour"], "columns": WEATHER_COLUMNS}],
        columns=FLIGHTS_DRIFT_COLUMNS,
        drift_share=FLIGHTS_DRIFT_SHARE,
        drift_asset=FLIGHT_DELAY_DRIFT,
    )
