"""Example DAGs: the Seattle rain lifecycle written by hand with the provider's operators (no spec).

The same model as ``tests/lifecycle/seattle/seattle.yaml`` ("will it rain in Seattle on day D", from the
weather known at the end of D-1; real daily weather of 2012-2015 from ``vega_datasets``), wired in
Python the way the lifecycle factory wires it from the spec. It reuses that folder's expectation suite,
Feast repository and feature steps by path. Four DAGs, each started by the one before:

- ``example_seattle_rain_ingest``: every week, wait for the landed batch, validate it with Great
  Expectations (a bad batch goes to quarantine), publish it as daily partitions of the offline table
  ``seattle_weather``; the ``seattle_weather_offline`` Asset gets an event naming the days;
- ``example_seattle_rain_features``: on those events, the feature steps, ``feast apply`` and the
  materialization of the days into the online store;
- ``example_seattle_rain_train``: on a drift event (or by hand): retraining gate, point-in-time training
  and holdout sets from Feast, Ray Tune, register, promotion gate, drift reference of the new model;
- ``example_seattle_rain_monitor``: every week, Evidently drift of the last 28 days against the
  production model's training snapshot, and the model's AUC on those days against its holdout AUC;
  drift or decay emits the event that starts the train DAG.

The blocks between ``[START howto_...]`` and ``[END howto_...]`` markers are the examples that
``docs/operators.md`` shows for each operator (``python -m airflow_mlops.reference``).
``tests/integration/test_handwritten_example.py`` runs these DAGs through Airflow.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Asset, Param
from airflow.timetables.interval import DeltaDataIntervalTimetable

from airflow_mlops.lifecycle.factory import train_window
from airflow_mlops.operators.drift import (
    DriftBaselineOperator,
    EvidentlyDriftOperator,
    RetrainingGateOperator,
)
from airflow_mlops.operators.features import (
    FeastApplyOperator,
    FeastMaterializeOperator,
    FeastTrainingDatasetOperator,
    FeatureDaysRecordOperator,
    FeaturePendingDaysOperator,
)
from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator
from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator
from airflow_mlops.operators.tuning import RayTuneOperator
from airflow_mlops.operators.validation import GXValidateOperator
from airflow_mlops.sensors.landing import LandedBatchSensor

# The Seattle example's suite, Feast repository and feature steps (plain functions), used by path.
SEATTLE = Path(__file__).resolve().parents[1] / "seattle"
if str(SEATTLE) not in sys.path:
    sys.path.append(str(SEATTLE))
from seattle_features import daily_features, labelled_days  # noqa: E402

MODEL = "seattle_rain"
FEATURE_REPO = str(SEATTLE / "feature_repo")
EXPECTATION_SUITE = str(SEATTLE / "expectations" / "seattle_batch.json")
START_DATE = datetime(2012, 1, 1, tzinfo=UTC)
END_DATE = datetime(2015, 12, 31, tzinfo=UTC)
WEEKLY = DeltaDataIntervalTimetable(timedelta(days=7))  # batch k covers days [7k, 7k+7) from the start

SEATTLE_WEATHER = Asset(name="seattle_weather_offline")  # validated weeks published
SEATTLE_RAIN_DRIFT = Asset(name="seattle_rain_drift")  # the monitor found drift: retrain

# the observed weather of the predicted day is in the entity rows for monitoring only: never a feature
FEATURES = [
    "day_of_year",
    "seattle_daily__precipitation",
    "seattle_daily__temp_max",
    "seattle_daily__temp_min",
    "seattle_daily__temp_range",
    "seattle_daily__wind",
    "seattle_daily__rained",
    "seattle_daily__rain_days_7d",
    "seattle_daily__precipitation_7d",
    "seattle_daily__temp_max_mean_7d",
    "seattle_daily__wind_mean_7d",
]
DRIFT_COLUMNS = {
    "temp_max": {"kind": "numerical"},
    "temp_min": {"kind": "numerical"},
    "precipitation": {"kind": "numerical"},
    "wind": {"kind": "numerical"},
    "weather": {"kind": "categorical"},
}
DEFAULT_ARGS = {"owner": "mlops", "retries": 0}

# ------------------------------------------------------------------------------------------ ingest
with DAG(
    dag_id="example_seattle_rain_ingest",
    description="Validate each landed week of Seattle weather; quarantine bad weeks, publish good ones.",
    schedule=WEEKLY,
    start_date=START_DATE,
    end_date=END_DATE,
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "ingest"],
) as ingest_dag:
    # [START howto_sensor_landed_batch]
    wait_for_batch = LandedBatchSensor(
        task_id="wait_for_batch",
        uri="seattle/week={{ data_interval_start | ds }}/weather.parquet",  # under [mlops] landing_root
        poke_interval=60,
        timeout=6 * 3600,
        deferrable=True,
    )
    # [END howto_sensor_landed_batch]

    # [START howto_operator_gx_validate]
    validate_batch = GXValidateOperator(
        task_id="validate_batch",
        data_uri=wait_for_batch.output,
        expectation_suite=EXPECTATION_SUITE,
        batch_date="{{ data_interval_start | ds }}",
        batch_days=7,
        batch_timezone="UTC",
        quarantine_uri="seattle/week={{ data_interval_start | ds }}",  # under <state_dir>/quarantine
    )
    # [END howto_operator_gx_validate]

    # [START howto_operator_offline_partition_write]
    publish = OfflinePartitionWriteOperator(
        task_id="publish_to_offline_store",
        source_uri="{{ ti.xcom_pull(task_ids='validate_batch')['data_uri'] }}",
        table="seattle_weather",
        partition="date={date}",  # one partition per day of the weekly batch
        partition_column="date",
        outlets=[SEATTLE_WEATHER],
    )
    # [END howto_operator_offline_partition_write]

    wait_for_batch >> validate_batch >> publish

# ------------------------------------------------------------------------------------------ features
# the days due (published and not yet materialized, whatever the events name; plus a manual run's conf
# {"day": ..., "last_day": ...}) and the interval to materialize for them: the first task's XCom
DAYS = "ti.xcom_pull(task_ids='days_due')"

with DAG(
    dag_id="example_seattle_rain_features",
    description="Feature steps, feast apply and materialization after each ingested week.",
    schedule=[SEATTLE_WEATHER],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "features"],
) as features_dag:
    # [START howto_operator_feature_pending_days]
    days_due = FeaturePendingDaysOperator(
        task_id="days_due",
        table="seattle_weather",  # its date=YYYY-MM-DD partitions are the published days
        timezone="UTC",
    )
    # [END howto_operator_feature_pending_days]

    # the feature steps: plain functions of tests/lifecycle/seattle/seattle_features.py
    features = PythonOperator(
        task_id="daily_features",
        python_callable=daily_features,
        op_kwargs={
            "first_day": "{{ " + DAYS + "['first'] }}",
            "last_day": "{{ " + DAYS + "['last'] }}",
            "window_days": 7,
        },
    )
    labels = PythonOperator(
        task_id="labelled_days",
        python_callable=labelled_days,
        op_kwargs={"first_day": "{{ " + DAYS + "['first'] }}", "last_day": "{{ " + DAYS + "['last'] }}"},
    )

    # [START howto_operator_feast_apply]
    feast_apply = FeastApplyOperator(task_id="feast_apply", repo_path=FEATURE_REPO)
    # [END howto_operator_feast_apply]

    # [START howto_operator_feast_materialize]
    materialize = FeastMaterializeOperator(
        task_id="materialize",
        repo_path=FEATURE_REPO,
        start="{{ " + DAYS + "['start'] }}",
        end="{{ " + DAYS + "['end'] }}",
        overlap=timedelta(days=1),  # re-read yesterday too: late rows reach the online store
        feature_views=["seattle_daily"],  # the feast_seattle_daily Asset gets an event
    )
    # [END howto_operator_feast_materialize]

    # [START howto_operator_feature_days_record]
    record = FeatureDaysRecordOperator(
        task_id="record_materialized", window=days_due.output, table="seattle_weather"
    )
    # [END howto_operator_feature_days_record]

    days_due >> [features, labels] >> feast_apply >> materialize >> record

# ------------------------------------------------------------------------------------------ train
with DAG(
    dag_id="example_seattle_rain_train",
    description="Training set -> Ray Tune -> register -> gated promotion -> drift reference.",
    schedule=[SEATTLE_RAIN_DRIFT],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    # a drift event moves the holdout to the 35 days before its data time; by hand, these days count
    params={
        "train_start": Param("2012-01-08", type="string", format="date"),
        "holdout_start": Param("2012-04-15", type="string", format="date"),
        "holdout_end": Param("2012-05-20", type="string", format="date"),
        "train_days": Param(98, type="integer", minimum=7),
        "holdout_days": Param(35, type="integer", minimum=1),
    },
    user_defined_macros={"train_window": train_window},
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "train"],
) as train_dag:
    # [START howto_operator_retraining_gate]
    retraining_gate = RetrainingGateOperator(
        task_id="retraining_gate",
        model_name=MODEL,
        cooldown_days=28,  # at most one retraining per 28 days of data time
        data_time="{{ train_window(params, triggering_asset_events)['holdout_end'] }}",
    )
    # [END howto_operator_retraining_gate]

    # [START howto_operator_feast_training_dataset]
    training_set = FeastTrainingDatasetOperator(
        task_id="training_set",
        repo_path=FEATURE_REPO,
        entity_uri="seattle_labelled",  # offline table of entity rows with the label
        feature_service="rain_model",
        label_column="rain",
        task="binary",  # the label must hold two classes
        start="{{ train_window(params, triggering_asset_events)['train_start'] }}",
        end="{{ train_window(params, triggering_asset_events)['holdout_start'] }}",
        multiple_outputs=True,
    )
    holdout_set = FeastTrainingDatasetOperator(
        task_id="holdout_set",
        repo_path=FEATURE_REPO,
        entity_uri="seattle_labelled",
        feature_service="rain_model",
        label_column="rain",
        task="binary",
        start="{{ train_window(params, triggering_asset_events)['holdout_start'] }}",
        end="{{ train_window(params, triggering_asset_events)['holdout_end'] }}",
        name="holdout",
        multiple_outputs=True,
    )
    # [END howto_operator_feast_training_dataset]

    # [START howto_operator_ray_tune]
    tune = RayTuneOperator(
        task_id="tune",
        training_data_uri=training_set.output["manifest_uri"],
        trainable="airflow_mlops.ml.trainables.logistic_regression",
        search_space={"C": {"loguniform": [0.003, 0.3]}},  # strong regularization: few rows
        # metric: the task's default (the manifest's task, binary: AUC, maximized)
        features=FEATURES,
        num_samples=4,
        max_concurrent_trials=2,
        scheduler="fifo",
        time_budget_s=300,
        seed=13,
        multiple_outputs=True,
    )
    # [END howto_operator_ray_tune]

    # [START howto_operator_register_model]
    register = RegisterModelOperator(
        task_id="register",
        model_name=MODEL,
        model_uri=tune.output["model_uri"],  # with the metric it was tuned for (AUC)
        hyperparameters=tune.output["best_config"],
        # the signature (entity keys, request features, task, classes) comes from the training snapshot
        # and the feature service: a request sends the station and the day of year, Feast the rest
        training_manifest_uri=training_set.output["manifest_uri"],
        feature_service="rain_model",
        feast_repo_path=FEATURE_REPO,
        multiple_outputs=True,
    )
    # [END howto_operator_register_model]

    # [START howto_operator_promote_model]
    promote = PromoteModelOperator(
        task_id="promote",
        model_name=MODEL,
        candidate_version=register.output["version"],
        holdout_uri=holdout_set.output["manifest_uri"],
        # metric: the one the model was tuned for (AUC)
        min_improvement=0.01,  # beat production by 0.01 AUC on the same holdout
        floor=0.5,  # and never be worse than a coin
    )
    # [END howto_operator_promote_model]

    # [START howto_operator_drift_baseline]
    drift_baseline = DriftBaselineOperator(task_id="drift_baseline", model_name=MODEL, columns=DRIFT_COLUMNS)
    # [END howto_operator_drift_baseline]

    retraining_gate >> [training_set, holdout_set]
    tune >> register >> promote >> drift_baseline

# ------------------------------------------------------------------------------------------ monitor
with DAG(
    dag_id="example_seattle_rain_monitor",
    description="Weekly Evidently drift check of the last 28 days; drift starts a retraining.",
    schedule=WEEKLY,
    start_date=START_DATE,
    end_date=END_DATE,
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "monitor"],
) as monitor_dag:
    # [START howto_operator_evidently_drift]
    drift = EvidentlyDriftOperator(
        task_id="drift",
        model_name=MODEL,  # the reference: its production version's training snapshot
        table="seattle_weather",
        window_end="{{ (data_interval_end - macros.timedelta(days=1)) | ds }}",
        window_days=28,
        columns=DRIFT_COLUMNS,
        drift_share=0.4,  # drifted when 2 of the 5 columns drift
        # quality decay: the model scored on the window's labelled days against its holdout score
        label_column="rain",
        labels_table="seattle_labelled",  # entity rows with the label, written by labelled_days
        feature_repo=FEATURE_REPO,  # their features, joined point in time as for training
        max_decay={"auc": 0.1},  # decay: holdout AUC minus the window's AUC above 0.1
        prediction_drift=True,  # and the served predictions against the holdout's (prediction log)
        drift_asset=SEATTLE_RAIN_DRIFT,  # on drift, an event that starts example_seattle_rain_train
    )
    # [END howto_operator_evidently_drift]
