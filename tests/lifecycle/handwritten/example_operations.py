"""Example DAGs: the operations around the Seattle rain model that its lifecycle does not run by itself.

- ``example_seattle_weather_history``: publish the whole landed weather history as one Feast source
  table (a backfill, instead of waiting for the weekly batches);
- ``example_seattle_rain_serve``: build a Bento of the production ``seattle_rain`` model, deploy it
  blue/green behind a stable local address and wait until it answers;
- ``example_seattle_rain_batch_scoring``: every week, the production model's answers for the week's
  labelled days as a predictions table of the offline store;
- ``example_seattle_rain_rollback``: by hand, when the new model misbehaves: the registry's previous
  production version comes back, and the deployment switches back to the version it served before.
- ``example_seattle_rain_approval``: by hand, a candidate version is gated on a holdout and, if it passes,
  waits for a person to approve it (Airflow's Required actions) before it is put in production and served.
- ``example_seattle_rain_operate``: by hand, promote a named version or roll back (conf ``action``,
  ``version``), recorded with the user who triggered the run, then served.
- ``example_seattle_rain_shadow``: by hand, a candidate version answers a copy of the live traffic beside
  production for a day (never answering a client), then its agreement with production is reported and
  checked before anyone promotes it.
- ``example_seattle_rain_shared_endpoint``: the production model deployed onto ``shared``, a multi-model
  endpoint other lifecycles deploy their models onto too (one server, models loaded on first use).

The model, its Feast repository and the offline tables come from ``example_seattle_rain.py``. The blocks
between ``[START howto_...]`` and ``[END howto_...]`` markers are the examples ``docs/operators.md``
shows (``python -m airflow_mlops.reference``); ``tests/integration/test_handwritten_example.py`` runs the
backfill and the serve DAG (then asks the endpoint over HTTP) and parses the rollback DAG.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import DAG

from airflow_mlops.operators.batch_scoring import BatchScoringOperator
from airflow_mlops.operators.features import FeatureSourceSnapshotOperator
from airflow_mlops.operators.multi_model import MultiModelDeployOperator
from airflow_mlops.operators.registry import (
    ModelActionOperator,
    ModelApprovalOperator,
    PromoteModelOperator,
    RollbackModelOperator,
)
from airflow_mlops.operators.serving import BentoBuildOperator, BentoDeployOperator, BentoRollbackOperator
from airflow_mlops.operators.shadow import ShadowReportOperator
from airflow_mlops.sensors.serving import BentoEndpointSensor

MODEL = "seattle_rain"
FEATURE_REPO = str(Path(__file__).resolve().parents[1] / "seattle" / "feature_repo")
START_DATE = datetime(2012, 1, 1, tzinfo=UTC)
PORT = 3100  # the stable address of the Seattle rain endpoint
DEFAULT_ARGS = {"owner": "mlops", "retries": 0}

# ------------------------------------------------------------------------------------------ backfill
with DAG(
    dag_id="example_seattle_weather_history",
    description="Publish the landed Seattle weather history as one Feast source table.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "features"],
) as history_dag:
    # [START howto_operator_feature_source_snapshot]
    weather_history = FeatureSourceSnapshotOperator(
        task_id="weather_history",
        source_uri="seattle/history/weather.parquet",  # under [mlops] landing_root
        table="seattle_weather_history",  # <offline_root>/seattle_weather_history/part-0.parquet
        timestamp_column="date",  # becomes the rows' event_timestamp
        columns=["date", "precipitation", "temp_max", "temp_min", "wind", "weather"],
    )
    # [END howto_operator_feature_source_snapshot]

# ------------------------------------------------------------------------------------------ serve
with DAG(
    dag_id="example_seattle_rain_serve",
    description="Build a Bento of the production seattle_rain model and deploy it blue/green.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "serving"],
) as serve_dag:
    # [START howto_operator_bento_build]
    build = BentoBuildOperator(
        task_id="build",
        model_name=MODEL,  # the registry's production version (or version="...")
        containerize=False,  # the Bento only; True also builds its image with Docker
        multiple_outputs=True,
    )
    # [END howto_operator_bento_build]

    # [START howto_operator_bento_deploy]
    deploy = BentoDeployOperator(
        task_id="deploy",
        model_name=MODEL,
        bento_tag=build.output["tag"],
        port=PORT,  # the stable address; versions switch behind it without dropping requests
        feast_repo_path=FEATURE_REPO,  # the service looks up the station's features online
        ready_timeout=300,
        multiple_outputs=True,
    )
    # [END howto_operator_bento_deploy]

    # [START howto_sensor_bento_endpoint]
    endpoint_ready = BentoEndpointSensor(
        task_id="endpoint_ready",
        url=deploy.output["url"],
        poke_interval=5,
        timeout=300,
        deferrable=True,  # wait in the triggerer, not in a worker slot
    )
    # [END howto_sensor_bento_endpoint]

# ------------------------------------------------------------------------------------------ rollback
with DAG(
    dag_id="example_seattle_rain_rollback",
    description="By hand: the previous seattle_rain model back in the registry and behind the endpoint.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "serving"],
) as rollback_dag:
    # [START howto_operator_rollback_model]
    rollback_model = RollbackModelOperator(task_id="rollback_model", model_name=MODEL)
    # [END howto_operator_rollback_model]

    # [START howto_operator_bento_rollback]
    rollback_endpoint = BentoRollbackOperator(
        task_id="rollback_endpoint",
        model_name=MODEL,
        port=PORT,
        feast_repo_path=FEATURE_REPO,
    )
    # [END howto_operator_bento_rollback]

    rollback_model >> rollback_endpoint

# ------------------------------------------------------------------------------------------ approval
with DAG(
    dag_id="example_seattle_rain_approval",
    description="By hand: a seattle_rain candidate gated on a holdout, then approved by a person, then served.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"version": "", "holdout_uri": ""},
    tags=["example", "seattle", "serving"],
) as approval_dag:
    gate = PromoteModelOperator(
        task_id="promote",
        model_name=MODEL,
        candidate_version="{{ params.version }}",
        holdout_uri="{{ params.holdout_uri }}",
        approval="manual",
    )
    # [START howto_operator_model_approval]
    approval = ModelApprovalOperator(
        task_id="approval",
        model_name=MODEL,
        promotion=gate.output,  # the gate's verdict: nothing is asked when it refused the candidate
        response_timeout=timedelta(days=2),
        on_timeout="reject",
    )
    # [END howto_operator_model_approval]
    approved_deploy = BentoDeployOperator(
        task_id="deploy", model_name=MODEL, port=PORT, feast_repo_path=FEATURE_REPO
    )
    gate >> approval >> approved_deploy  # a Reject skips the deploy

# ------------------------------------------------------------------------------------------ operate
with DAG(
    dag_id="example_seattle_rain_operate",
    description="By hand: promote a seattle_rain version or roll back, then serve production.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"action": "rollback", "version": ""},
    tags=["example", "seattle", "serving"],
) as operate_dag:
    # [START howto_operator_model_action]
    operate = ModelActionOperator(
        task_id="operate",
        model_name=MODEL,
        action="{{ params.action }}",  # promote | rollback
        version="{{ params.version }}",  # the version to promote; empty for a rollback
        user="{{ dag_run.triggering_user_name or '' }}",  # recorded with the decision
    )
    # [END howto_operator_model_action]
    operate >> BentoDeployOperator(
        task_id="deploy", model_name=MODEL, port=PORT, feast_repo_path=FEATURE_REPO
    )

# ------------------------------------------------------------------------------------------ shadow
with DAG(
    dag_id="example_seattle_rain_shadow",
    description="By hand: a candidate rain model answers a copy of live traffic; compare it with production.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"candidate": ""},
    tags=["example", "seattle", "serving"],
) as shadow_dag:
    shadow = BentoDeployOperator(
        task_id="shadow",
        model_name=MODEL,
        version="{{ params.candidate }}",  # a registered version that is not production
        strategy="shadow",  # production keeps every answer; the candidate gets a copy of each request
        port=PORT,
        feast_repo_path=FEATURE_REPO,
    )

    # the shadow period: a day of live traffic, waited for in the triggerer
    shadow_period = TimeDeltaSensor(task_id="shadow_period", delta=timedelta(hours=24), deferrable=True)

    # [START howto_operator_shadow_report]
    shadow_report = ShadowReportOperator(
        task_id="shadow_report",
        model_name=MODEL,
        window_hours=24,  # the shadow period (window_end defaults to now)
        min_rows=500,
        min_label_agreement=0.95,  # fail (and so block a promotion downstream) below 95 % same labels
        max_mean_abs_diff=0.05,  # or when the probabilities move by more than 0.05 on average
    )
    # [END howto_operator_shadow_report]

    shadow >> shadow_period >> shadow_report

# ------------------------------------------------------------------------------------------ batch scoring
with DAG(
    dag_id="example_seattle_rain_batch_scoring",
    description="Score each week's Seattle days with the production rain model into a predictions table.",
    schedule="@weekly",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "batch-scoring"],
) as batch_scoring_dag:
    # [START howto_operator_batch_scoring]
    score_week = BatchScoringOperator(
        task_id="score_week",
        model_name=MODEL,  # the production version unless version= names one
        table="seattle_labelled",  # entity rows of the days: the model's store features join point in time
        window_end="{{ macros.ds_add(data_interval_end | ds, -1) }}",
        window_days=7,
        output_table="seattle_rain_predictions",  # <offline_root>/seattle_rain_predictions/date=<day>/
        carry_columns=["event_timestamp"],
        feature_repo=FEATURE_REPO,
    )
    # [END howto_operator_batch_scoring]

# ------------------------------------------------------------------------------------------ shared endpoint
with DAG(
    dag_id="example_seattle_rain_shared_endpoint",
    description="Deploy the production Seattle rain model onto the shared multi-model endpoint.",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["example", "seattle", "serving"],
) as shared_endpoint_dag:
    # [START howto_operator_multi_model_deploy]
    deploy_shared = MultiModelDeployOperator(
        task_id="deploy_shared",
        model_name=MODEL,  # answers at <server>/models/seattle_rain/predict
        endpoint="shared",  # one server for every model deployed onto "shared"; started by the first deploy
        memory_budget_mb=512,  # past it, the least recently used models are unloaded until next asked
        feast_repo_path=FEATURE_REPO,
        ready_timeout=300,
    )
    # [END howto_operator_multi_model_deploy]
