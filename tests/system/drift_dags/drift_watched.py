"""Test DAGs of ``tests/system/test_drift_watcher.py``: scheduled on Assets watched by ``DriftEventTrigger``.

No schedule and no task starts them: the triggerer runs the watchers' triggers, each fires when its
source crosses the threshold, Airflow records an event on the watched Asset, and the scheduler starts
the DAG. The one task is the retraining gate a train DAG starts with, so each run records the event
that caused it (or why it was held back).

- ``drift_watch_metric``: a monitor's ``drift_summary.json`` (metric mode, ``drift_detected``);
- ``drift_watch_log``: a serving prediction log scored against the reference's ``stats.json`` (PSI).

The files live under ``$MLOPS_DRIFT_WATCH_ROOT`` (set by the test for every component); the path is
fixed when the dag-processor parses this file, and is part of each trigger's serialized arguments.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from airflow.sdk import DAG, Asset, AssetWatcher

from airflow_mlops.operators.drift import RetrainingGateOperator
from airflow_mlops.triggers.drift import DriftEventTrigger

ROOT = os.environ.get("MLOPS_DRIFT_WATCH_ROOT", "/tmp/mlops-drift-watch")
POLL = float(os.environ.get("MLOPS_DRIFT_WATCH_POLL", "2"))

METRIC_ASSET = Asset(
    name="drift_metric_watched",
    watchers=[
        AssetWatcher(
            name="drift_summary_watcher",
            trigger=DriftEventTrigger(
                source_uri=f"file://{ROOT}/monitor/drift_summary.json",
                metric_key="drift_detected",
                poll_interval=POLL,
            ),
        )
    ],
)
LOG_ASSET = Asset(
    name="drift_log_watched",
    watchers=[
        AssetWatcher(
            name="prediction_log_watcher",
            trigger=DriftEventTrigger(
                source_uri=f"file://{ROOT}/predictions/flight_delay",
                reference_stats_uri=f"file://{ROOT}/reference/stats.json",
                threshold=0.25,
                drift_share=0.3,
                window_files=1,
                min_rows=200,
                poll_interval=POLL,
            ),
        )
    ],
)

for dag_id, asset in (("drift_watch_metric", METRIC_ASSET), ("drift_watch_log", LOG_ASSET)):
    with DAG(
        dag_id=dag_id,
        description="Started by a DriftEventTrigger watching its Asset; the gate records the cause.",
        schedule=[asset],
        start_date=datetime(2013, 1, 1, tzinfo=UTC),
        catchup=False,
        tags=["mlops", "test", "drift"],
    ):
        RetrainingGateOperator(
            task_id="retraining_gate",
            model_name=dag_id,
            cooldown_days=7,
            state_dir=f"{ROOT}/retraining",
        )
