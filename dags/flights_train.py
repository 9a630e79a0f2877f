"""Train, gate and serve the flight-delay model.

Runs when the model's drift Asset ``flight_delay_drift`` receives an event (the monitor found drift),
or by hand. Every stage works on files in the artifact store; only URIs and figures travel in XCom.

1. ``retraining_gate`` lets at most one retraining through per cooldown window of data time and
   drops repeated drift events (Asset watchers deliver at least once); manual runs always train;
2. ``training_set`` / ``holdout_set``: point-in-time-correct sets from the Feast feature service
   ``delay_model`` (label: arrival delay > 15 min); the holdout is the days after the training window;
3. ``tune``: Ray Tune search (ASHA) over LightGBM on the training set, on local Ray or a cluster;
4. ``register`` the best model as a ``candidate``; ``promote`` it only if it beats production on the
   holdout (never a worse model); ``drift_baseline`` makes the production model's training snapshot
   the reference the monitor compares against;
5. ``build`` a Bento of the production version and ``deploy`` it blue/green behind the stable address
   (a no-op when that version is already live); ``sample_predictions`` sends real flights of the
   holdout window to the live endpoint and returns the answers.

The training window: conf/params ``train_start``, ``holdout_start``, ``holdout_end`` (days); a drift
event moves the holdout to the ``holdout_days`` before its ``data_time`` and the training window to the
``train_days`` before that.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Asset, Param, task

from airflow_mlops.operators.drift import DriftBaselineOperator, RetrainingGateOperator
from airflow_mlops.operators.features import FeastTrainingDatasetOperator
from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator
from airflow_mlops.operators.serving import BentoBuildOperator, BentoDeployOperator
from airflow_mlops.operators.tuning import RayTuneOperator

MODEL = "flight_delay"
FLIGHT_DELAY_DRIFT = Asset(name="flight_delay_drift")
FEATURE_REPO = os.environ.get("MLOPS_FEATURE_REPO") or str(
    Path(__file__).resolve().parents[1] / "feature_repo"
)
SERVING_PORT = int(os.environ.get("MLOPS_SERVING_PORT", "3900"))
#: what the model reads: request fields the endpoint receives, plus the feature service's online features
FEATURES = [
    "carrier",
    "origin",
    "distance",
    "sched_hour",
    *(
        f"weather_hourly__{f}"
        for f in ("temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib")
    ),
    "plane__year_built",
    "plane__seats",
    *(
        f"{view}__{f}"
        for view in ("carrier_daily", "origin_daily")
        for f in ("flights_7d", "arr_delay_mean_7d", "delayed_rate_7d", "cancel_rate_7d")
    ),
]
SEARCH_SPACE = {
    "learning_rate": {"loguniform": [0.02, 0.3]},
    "num_leaves": {"choice": [15, 31, 63]},
    "min_child_samples": {"choice": [20, 50, 100]},
    "num_boost_round": 150,
}


def train_window(params, triggering_asset_events) -> dict[str, str]:
    """ISO bounds (UTC midnight) of the training set and the holdout after it (a template macro)."""
    times = [
        str(event.extra["data_time"])[:10]
        for events in (triggering_asset_events or {}).values()
        for event in events
        if (event.extra or {}).get("data_time")
    ]
    if times:
        holdout_end = date.fromisoformat(max(times)) + timedelta(days=1)
        holdout_start = holdout_end - timedelta(days=int(params["holdout_days"]))
        train_start = holdout_start - timedelta(days=int(params["train_days"]))
    else:
        train_start = date.fromisoformat(params["train_start"])
        holdout_start = date.fromisoformat(params["holdout_start"])
        holdout_end = date.fromisoformat(params["holdout_end"])

    def iso(day: date) -> str:
        return datetime(day.year, day.month, day.day, tzinfo=UTC).isoformat()

    return {
        "train_start": iso(train_start),
        "holdout_start": iso(holdout_start),
        "holdout_end": iso(holdout_end),
    }


WINDOW = "train_window(params, triggering_asset_events)"

with DAG(
    dag_id="flights_train",
    description="Training set -> Ray Tune -> register -> gated promotion -> Bento build -> blue/green deploy.",
    schedule=[FLIGHT_DELAY_DRIFT],
    start_date=datetime(2013, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params={
        "train_start": Param("2013-01-01", type="string", format="date"),
        "holdout_start": Param("2013-04-01", type="string", format="date"),
        "holdout_end": Param("2013-04-15", type="string", format="date"),
        "train_days": Param(90, type="integer", minimum=7),
        "holdout_days": Param(14, type="integer", minimum=1),
    },
    user_defined_macros={"train_window": train_window},
    tags=["mlops", "flights", "train"],
    doc_md=__doc__,
) as dag:
    gate = RetrainingGateOperator(task_id="retraining_gate", model_name=MODEL, cooldown_days=7)
    training_set = FeastTrainingDatasetOperator(
        task_id="training_set",
        multiple_outputs=True,
        repo_path=FEATURE_REPO,
        entity_uri="flights_labelled",
        feature_service="delay_model",
        label_column="delayed",
        start=f"{{{{ {WINDOW}['train_start'] }}}}",
        end=f"{{{{ {WINDOW}['holdout_start'] }}}}",
    )
    holdout_set = FeastTrainingDatasetOperator(
        task_id="holdout_set",
        multiple_outputs=True,
        repo_path=FEATURE_REPO,
        entity_uri="flights_labelled",
        feature_service="delay_model",
        label_column="delayed",
        start=f"{{{{ {WINDOW}['holdout_start'] }}}}",
        end=f"{{{{ {WINDOW}['holdout_end'] }}}}",
        name="holdout",
    )
    tune = RayTuneOperator(
        task_id="tune",
        multiple_outputs=True,
        training_data_uri=training_set.output["manifest_uri"],
        trainable="airflow_mlops.ml.trainables.lightgbm_classifier",
        search_space=SEARCH_SPACE,
        metric="auc",
        mode="max",
        features=FEATURES,
        num_samples=8,
        max_concurrent_trials=2,
        time_budget_s=600,
        seed=13,
    )
    register = RegisterModelOperator(
        task_id="register",
        multiple_outputs=True,
        model_name=MODEL,
        model_uri=tune.output["model_uri"],
        metrics={"auc": tune.output["best_metric"]},
        hyperparameters=tune.output["best_config"],
        training_manifest_uri=training_set.output["manifest_uri"],
        feature_service="delay_model",
    )
    promote = PromoteModelOperator(
        task_id="promote",
        model_name=MODEL,
        candidate_version=register.output["version"],
        holdout_uri=holdout_set.output["manifest_uri"],
        metric="auc",
        min_improvement=0.002,
        floor=0.6,
    )
    baseline = DriftBaselineOperator(task_id="drift_baseline", model_name=MODEL)
    build = BentoBuildOperator(task_id="build", model_name=MODEL)
    deploy = BentoDeployOperator(
        task_id="deploy",
        multiple_outputs=True,
        model_name=MODEL,
        port=SERVING_PORT,
        feast_repo_path=FEATURE_REPO,
    )

    @task
    def sample_predictions(holdout: dict, deployment: dict, rows: int = 20) -> dict:
        """Send real flights of the holdout window to the live endpoint; return what it answered."""
        from airflow_mlops.ml.client import sample_predictions as send

        return send(deployment["url"], holdout["data_uri"], rows)

    gate >> [training_set, holdout_set]
    tune >> register >> promote >> baseline >> build >> deploy
    sample_predictions(holdout_set.output, deploy.output)
