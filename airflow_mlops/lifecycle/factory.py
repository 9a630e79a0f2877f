"""The lifecycle factory: a validated spec in, the model's DAGs out.

``lifecycle_dags(spec_path)`` returns ``{dag_id: DAG}`` for

- ``<prefix>_ingest``: wait for each landed batch (deferred), validate it with Great Expectations
  (quarantine on failure), publish it to the offline store; the ``<table>_offline`` Asset gets an event;
- ``<prefix>_features``: on those events, run the spec's preparation steps, ``feast apply`` and
  materialize the days named by the events into the online store;
- ``<prefix>_train``: on the model's drift Asset (``<model>_drift``; and on new features when the spec
  says so) or by hand: retraining gate -> training and holdout sets from Feast -> Ray Tune -> register
  -> gated promotion -> drift baseline -> Bento build -> blue/green deploy -> sample predictions;
- ``<prefix>_monitor``: every day or week of data time, an Evidently drift check (and the model's
  quality decay, by the spec's metrics, where labels have arrived) of the last ``window_days`` against
  the production model's training snapshot; drift emits the event that starts ``<prefix>_train``;
- ``<prefix>_operate``: by hand only (conf ``{"action": "promote"|"rollback", "version": ...}``): put a
  version in production or roll back, recorded with the triggering user, then deploy as ``_train`` does.

With ``promotion.approval: manual`` the train DAG's ``approval`` task waits (no worker slot held) for a
person to approve or reject the candidate that passed the gate before anything is deployed.

The spec's ``task`` (binary, multiclass or regression) reaches every stage: the training sets check
their labels against it, tuning, registration and promotion use the spec's metrics (the task's default
unless the spec names others), the monitor measures decay by ``monitoring.max_decay``.

Feature steps named by import path (``operator:`` / ``callable:``) may live next to the spec file: its
folder is appended to ``sys.path`` (as Airflow does with the DAG folder) before they are imported.

A DAG file is a few lines::

    from pathlib import Path

    from airflow_mlops.lifecycle import lifecycle_dags

    globals().update(lifecycle_dags(Path(__file__).with_name("model.yaml")))

Parsing imports only Airflow, pydantic, PyYAML and the operator modules (none of the ML libraries).
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param
from airflow.timetables.interval import CronDataIntervalTimetable, DeltaDataIntervalTimetable

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.lifecycle.spec import LifecycleSpec, LifecycleSpecError, Step, load_spec

#: Jinja for the features run's window (the XCom of its first task, ``feature_window``, which decides
#: the days due); ``{{ window.first }}`` in a step's args becomes this
FEATURE_WINDOW = "ti.xcom_pull(task_ids='feature_window')"
#: the training window of a train DAG run: from the retraining gate's decision once it has decided (its cause
#: may be an event Airflow gave to no run, see RetrainingGateOperator), else from the triggering events
TRAIN_WINDOW = "train_window(params, triggering_asset_events, ti.xcom_pull(task_ids='retraining_gate'))"
#: the last day of the data interval (the interval's only day for a daily schedule)
LAST_DAY = "{{ (data_interval_end - macros.timedelta(days=1)) | ds }}"
FIRST_DAY = "{{ data_interval_start | ds }}"
#: the operate DAG's request (its run's conf, through its params) and the user the decision names: the one
#: who triggered the run (Airflow 3.1+ records it on the run)
OPERATE_REQUEST = {
    "action": "{{ params.action or '' }}",
    "version": "{{ params.version or '' }}",
    "user": "{{ dag_run.triggering_user_name or '' }}",
}


def operate_params() -> dict[str, Param]:
    """The operate DAG's params: its trigger form, and the conf keys a REST trigger gives."""
    return {
        "action": Param(
            None,
            type=["null", "string"],
            enum=[None, "promote", "rollback"],
            description="promote: put `version` in production; rollback: go back to the version that "
            "was in production before the current one.",
        ),
        "version": Param(
            None,
            type=["null", "string"],
            description="The version to promote (e.g. v1a2b3c4d5e6f7a8b); leave empty to roll back.",
        ),
    }


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _timetable(cadence: str) -> Any:
    if cadence == "weekly":
        # weeks counted from the start date (not calendar weeks): batch k covers days [7k, 7k+7)
        return DeltaDataIntervalTimetable(timedelta(days=7))
    return CronDataIntervalTimetable("@daily", timezone="UTC")


def _default_args(spec: LifecycleSpec) -> dict[str, Any]:
    # no "retries" here: Airflow's [core] default_task_retries (0 by default) applies, so a deployment
    # whose workers can die (the scaled topology, docs/scaling.md) has their tasks retried elsewhere
    return {"owner": ",".join(spec.owners)}


# ------------------------------------------------------------------------------------------ macros
def feature_window(
    triggering_asset_events: Any, dag_run: Any, *, timezone: str, available_after_hours: float, dag_id: str
) -> dict[str, str]:
    """The days a features run processes and the interval to materialize for them.

    The days are the partitions named by the triggering offline-store events (``extra.partitions`` or
    ``extra.partition`` = ``date=YYYY-MM-DD``), else the run's conf ``{"day": ..., "last_day": ...}``.
    For hand-written DAGs; the factory's features DAG decides its days in its first task instead
    (:class:`~airflow_mlops.operators.features.FeaturePendingDaysOperator`: every published day not yet
    materialized, so an event Airflow never queued delays nothing past the next run).

    :return: ``first`` and ``last`` day, ``start`` (local midnight of the first day) and ``end`` (local
        midnight after the last day plus ``available_after_hours``), ISO in UTC.
    """
    from airflow_mlops.operators.features import day_window

    days = sorted(
        {
            str(partition).removeprefix("date=")
            for events in (triggering_asset_events or {}).values()
            for event in events
            for partition in ((event.extra or {}).get("partitions") or [(event.extra or {}).get("partition")])
            if partition
        }
    )
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if not days and conf.get("day"):
        days = [str(conf["day"]), str(conf.get("last_day") or conf["day"])]
    if not days:
        raise MLOpsArgumentError(
            f"this run of {dag_id} names no day: no offline-store event with extra.partition(s) "
            "triggered it and its conf has no 'day'.",
            fix='trigger it with conf {"day": "YYYY-MM-DD"} or let the ingest DAG trigger it.',
        )
    return day_window(
        date.fromisoformat(days[0]),
        date.fromisoformat(days[-1]),
        timezone=timezone,
        available_after_hours=available_after_hours,
    )


def train_window(params: Any, triggering_asset_events: Any, gate: Any = None) -> dict[str, str]:
    """ISO bounds (UTC midnight) of the training set and the holdout after it.

    A drift event moves the holdout to the ``holdout_days`` before its ``data_time`` and the training
    window to the ``train_days`` before that; otherwise the params' fixed days are used. The event is the
    cause the retraining gate decided on (``gate``: its XCom), which may be one Airflow gave to no run;
    without a decision, the latest of the run's triggering events.
    """
    from airflow_mlops.ml.retraining import event_figures

    cause = gate.get("cause") if isinstance(gate, dict) else None
    if cause and cause.get("event_id") and cause.get("data_time"):
        times = [str(cause["data_time"])[:10]]
    else:
        figures = [
            event_figures(event.extra)
            for events in (triggering_asset_events or {}).values()
            for event in events
        ]
        times = [str(f["data_time"])[:10] for f in figures if f.get("data_time")]
    if times:
        holdout_end = date.fromisoformat(max(times)) + timedelta(days=1)
        holdout_start = holdout_end - timedelta(days=int(params["holdout_days"]))
        train_start = holdout_start - timedelta(days=int(params["train_days"]))
    else:
        train_start = date.fromisoformat(params["train_start"])
        holdout_start = date.fromisoformat(params["holdout_start"])
        holdout_end = date.fromisoformat(params["holdout_end"])
    return {
        "train_start": _utc(train_start).isoformat(),
        "holdout_start": _utc(holdout_start).isoformat(),
        "holdout_end": _utc(holdout_end).isoformat(),
    }


# ------------------------------------------------------------------------------------------ steps
def _with_window(value: Any) -> Any:
    """Replace ``{{ window.<key> }}`` in step arguments with the features window macro."""
    if isinstance(value, str):
        return value.replace("{{ window.", "{{ " + FEATURE_WINDOW + ".").replace(
            "{{window.", "{{ " + FEATURE_WINDOW + "."
        )
    if isinstance(value, dict):
        return {k: _with_window(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_window(v) for v in value]
    return value


def import_path(path: str) -> Any:
    """The object named by ``package.module.name``."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise ImportError(f"module {module!r} has no attribute {name!r}") from None


def _on_sys_path(folder: str | None) -> None:
    """Append ``folder`` (the spec's) to ``sys.path``, so steps kept next to the spec import; appended,
    never first, so it shadows no installed module."""
    import sys

    if folder and folder not in sys.path:
        sys.path.append(folder)


def _run_callable(path: str, step_args: dict[str, Any], folder: str | None = None) -> Any:
    """Call the function at ``path`` with the step's (rendered) args; no Airflow context is passed.

    :param folder: the spec's folder, put on ``sys.path`` first (steps may live next to the spec).
    """
    _on_sys_path(folder)
    return import_path(path)(**step_args)


def _step_task(spec: LifecycleSpec, step: Step, where: str) -> Any:
    """The operator of a spec step; an import failure is a spec error naming the step."""
    args = _with_window(step.args)
    folder = str(spec.source.parent) if spec.source is not None else None
    if step.callable:
        from airflow.providers.standard.operators.python import PythonOperator

        return PythonOperator(
            task_id=step.task_id,
            python_callable=functools.partial(_run_callable, step.callable, folder=folder),
            op_kwargs={"step_args": args},
        )
    _on_sys_path(folder)
    try:
        operator = import_path(step.operator)
    except ImportError as err:
        raise LifecycleSpecError(
            f"{spec.source}: {where}.operator {step.operator!r} cannot be imported ({err}).",
            fix="name an operator class by its import path, e.g. "
            "'airflow_mlops.operators.features.FeatureSourceSnapshotOperator' or "
            "'<module next to the spec>.<class>'.",
        ) from None
    try:
        return operator(task_id=step.task_id, **args)
    except TypeError as err:
        raise LifecycleSpecError(
            f"{spec.source}: {where}.args do not fit {step.operator} ({err}).",
            fix=f"give the arguments {step.operator.rsplit('.', 1)[-1]} takes (see its docstring).",
        ) from None


# ------------------------------------------------------------------------------------------ DAGs
def ingest_dag(spec: LifecycleSpec) -> DAG:
    from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator
    from airflow_mlops.operators.validation import GXValidateOperator
    from airflow_mlops.sensors.landing import LandedBatchSensor

    ingest = spec.ingest
    with DAG(
        dag_id=spec.dag_id("ingest"),
        description=f"Validate each landed {ingest.cadence} batch of {ingest.table}, quarantine bad "
        "batches, publish good ones to the offline store.",
        schedule=_timetable(ingest.cadence),
        start_date=_utc(spec.start_date),
        end_date=_utc(spec.end_date) if spec.end_date else None,
        catchup=False,
        max_active_runs=ingest.max_active_runs,
        default_args=_default_args(spec),
        # only the DAGs a DAG file puts in its globals exist: a file may take some of a spec's DAGs
        auto_register=False,
        tags=["mlops", *spec.tags, "ingest"],
        doc_md=f"""Ingest for model **{spec.model}** (spec `{spec.source}`).

One run per {ingest.cadence} data interval: `wait_for_batch` waits (deferred, in the triggerer) for
`{ingest.landing_path}` under `[mlops] landing_root`; `validate_batch` runs the Great Expectations suite
`{ingest.expectation_suite}` (a failing batch is moved to quarantine and the run fails naming each failed
expectation); `publish_to_offline_store` writes it to the offline table `{ingest.table}` atomically
and idempotently, and the `{spec.offline_asset_name}` Asset receives an event with the partitions.
""",
    ) as dag:
        wait = LandedBatchSensor(
            task_id="wait_for_batch",
            uri=ingest.landing_path,
            poke_interval=60,
            timeout=int(ingest.wait_timeout_hours * 3600),
            deferrable=True,
        )
        batch = ingest.landing_path.rsplit("/", 1)[0]
        validate = GXValidateOperator(
            task_id="validate_batch",
            data_uri="{{ ti.xcom_pull(task_ids='wait_for_batch') }}",
            expectation_suite=str(spec.resolve(ingest.expectation_suite)),
            batch_date=FIRST_DAY,
            batch_days=ingest.batch_days,
            batch_timezone=ingest.batch_timezone,
            quarantine_uri=batch,
        )
        publish = OfflinePartitionWriteOperator(
            task_id="publish_to_offline_store",
            source_uri="{{ ti.xcom_pull(task_ids='validate_batch')['data_uri'] }}",
            table=ingest.table,
            partition="date={date}" if ingest.partition_column else f"date={FIRST_DAY}",
            partition_column=ingest.partition_column,
            partition_timezone=ingest.batch_timezone,
            outlets=[Asset(name=spec.offline_asset_name)],
        )
        wait >> validate >> publish
    return dag


def features_dag(spec: LifecycleSpec) -> DAG:
    from airflow_mlops.operators.features import (
        PENDING_TASK,
        FeastApplyOperator,
        FeastMaterializeOperator,
        FeatureDaysRecordOperator,
        FeaturePendingDaysOperator,
    )

    features = spec.features
    repo = str(spec.resolve(features.repo))
    window = functools.partial(
        feature_window,
        timezone=spec.ingest.batch_timezone,
        available_after_hours=features.available_after_hours,
        dag_id=spec.dag_id("features"),
    )
    with DAG(
        dag_id=spec.dag_id("features"),
        description=f"Feature preparation, feast apply and materialization after each ingested {spec.ingest.table} batch.",
        schedule=[Asset(name=spec.offline_asset_name)],
        start_date=_utc(spec.start_date),
        catchup=False,
        max_active_runs=1,
        user_defined_macros={"feature_window": window},
        default_args=_default_args(spec),
        # only the DAGs a DAG file puts in its globals exist: a file may take some of a spec's DAGs
        auto_register=False,
        tags=["mlops", *spec.tags, "features"],
        doc_md=f"""Features for model **{spec.model}** (spec `{spec.source}`, Feast repository `{repo}`).

Runs when `{spec.offline_asset_name}` receives events. `{PENDING_TASK}` decides the days: every day
published in `{spec.ingest.table}` and not yet materialized at its current data version, whatever the
events name (an event Airflow merged or never queued delays nothing past the next run; nothing due skips
the run). A manual run's conf `{{"day": "YYYY-MM-DD", "last_day": "YYYY-MM-DD"}}` adds days to rebuild.
The preparation steps ({", ".join(s.task_id for s in features.steps) or "none"}) write the feature source
tables, `feast_apply` registers the repository, the materialize tasks load the days' feature values into
the online store, and `record_materialized` records the days with their data versions. Days published
while the run ran are the next run's: their events queue it.
""",
    ) as dag:
        pending = FeaturePendingDaysOperator(
            task_id=PENDING_TASK,
            table=spec.ingest.table,
            timezone=spec.ingest.batch_timezone,
            available_after_hours=features.available_after_hours,
        )
        steps = [_step_task(spec, step, f"features.steps[{i}]") for i, step in enumerate(features.steps)]
        apply = FeastApplyOperator(task_id="feast_apply", repo_path=repo)
        loads = []
        for item in features.materialize:
            loads.append(
                FeastMaterializeOperator(
                    task_id=item.task_id,
                    repo_path=repo,
                    start=item.start or "{{ " + FEATURE_WINDOW + "['start'] }}",
                    end="{{ " + FEATURE_WINDOW + "['end'] }}",
                    overlap=timedelta(days=item.overlap_days) if item.overlap_days else None,
                    feature_views=list(item.feature_views),
                )
            )
        if steps:
            pending >> steps >> apply
        else:
            pending >> apply
        # one after the other: materializations write the Feast file registry (a race leaves views
        # "MATERIALIZING" or entities missing for the training sets)
        apply >> loads[0]
        for before, after in zip(loads, loads[1:], strict=False):
            before >> after
        record = FeatureDaysRecordOperator(
            task_id="record_materialized", window=pending.output, table=spec.ingest.table
        )
        # No follow-up run of its own for days published meanwhile: their events queue the next asset-
        # triggered run (Airflow 3.3 keeps a Dag's queued event while its run is active), which takes
        # every day due. A run this DAG triggered itself (run type operator_triggered) would leave the
        # scheduler's max_active_runs flag set when it ends (Airflow 3.3.2 refreshes it only for
        # scheduled, manual and asset-triggered runs), so that queued event would wait for the DAG
        # processor's next parse: 40 s to 4 min in make demo.
        loads[-1] >> record
    return dag


def train_dag(spec: LifecycleSpec) -> DAG:
    from airflow.providers.standard.operators.python import PythonOperator

    from airflow_mlops.operators.drift import DriftBaselineOperator, RetrainingGateOperator
    from airflow_mlops.operators.features import FeastTrainingDatasetOperator, feature_view_asset
    from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator
    from airflow_mlops.operators.tuning import RayTuneOperator

    features, train, tuning, promotion = spec.features, spec.train, spec.train.tuning, spec.promotion
    repo = str(spec.resolve(features.repo))
    floor = "no floor" if promotion.floor is None else f"floor {promotion.floor:g}"
    schedule: list[Asset] = []
    if "drift" in train.retrain_on:
        schedule.append(Asset(name=spec.drift_asset_name))
    if "features" in train.retrain_on:
        schedule += [feature_view_asset(v) for m in features.materialize for v in m.feature_views]

    def window(key: str) -> str:
        return "{{ " + TRAIN_WINDOW + "['" + key + "'] }}"

    with DAG(
        dag_id=spec.dag_id("train"),
        description="Training set -> Ray Tune -> register -> gated promotion -> Bento build -> blue/green deploy.",
        schedule=schedule or None,
        start_date=_utc(spec.start_date),
        catchup=False,
        max_active_runs=1,
        params={
            "train_start": Param(train.train_start.isoformat(), type="string", format="date"),
            "holdout_start": Param(train.holdout_start.isoformat(), type="string", format="date"),
            "holdout_end": Param(train.holdout_end.isoformat(), type="string", format="date"),
            "train_days": Param(train.train_days, type="integer", minimum=7),
            "holdout_days": Param(train.holdout_days, type="integer", minimum=1),
        },
        user_defined_macros={"train_window": train_window},
        default_args=_default_args(spec),
        # only the DAGs a DAG file puts in its globals exist: a file may take some of a spec's DAGs
        auto_register=False,
        tags=["mlops", *spec.tags, "train"],
        doc_md=f"""Train, gate and serve model **{spec.model}** (spec `{spec.source}`).

Starts when `{spec.drift_asset_name}` receives an event (the monitor found drift) or by hand.
A **{spec.task}** model. `retraining_gate` lets at most one retraining through per
{spec.monitoring.cooldown_days:g} days of data time and drops repeated events; `training_set` / `holdout_set`
come from the Feast feature service `{features.feature_service}` (label `{features.label}`, checked to fit a
{spec.task} model; the holdout follows the training window); `tune` searches `{tuning.trainable}` with
Ray Tune ({tuning.num_samples} trials, {tuning.metric} {"maximized" if tuning.mode == "max" else "minimized"});
`register` adds the best model as a candidate with its signature; `promote` makes it production only if it
beats production on the holdout by {promotion.min_improvement} {promotion.metric} ({floor});
{approval_doc(spec)}`drift_baseline` makes its training snapshot the monitor's reference; `build` / `deploy` serve it
({spec.serving.target}) and `sample_predictions` sends real holdout rows to the live endpoint.

A drift event moves the holdout to the `holdout_days` before the event's data time and the training
window to the `train_days` before that; otherwise the params' days are used.
""",
    ) as dag:
        gate = RetrainingGateOperator(
            task_id="retraining_gate",
            model_name=spec.model,
            cooldown_days=spec.monitoring.cooldown_days,
            # a run by hand trains up to its holdout's end: later drift events' cooldown counts from there
            data_time=window("holdout_end"),
            # the Assets it reads the events of that Airflow gave to no run (RetrainingGateOperator)
            inlets=list(schedule),
        )
        common = {
            "repo_path": repo,
            "entity_uri": features.entity_table,
            "feature_service": features.feature_service,
            "label_column": features.label,
            "task": spec.task,
            "event_timestamp_column": features.event_timestamp_column,
            "multiple_outputs": True,
        }
        training_set = FeastTrainingDatasetOperator(
            task_id="training_set", start=window("train_start"), end=window("holdout_start"), **common
        )
        holdout_set = FeastTrainingDatasetOperator(
            task_id="holdout_set",
            start=window("holdout_start"),
            end=window("holdout_end"),
            name="holdout",
            **common,
        )
        tune = RayTuneOperator(
            task_id="tune",
            multiple_outputs=True,
            training_data_uri=training_set.output["manifest_uri"],
            trainable=tuning.trainable,
            search_space=dict(tuning.search_space),
            metric=tuning.metric,
            mode=tuning.mode,
            features=list(tuning.features) if tuning.features else None,
            num_samples=tuning.num_samples,
            max_concurrent_trials=tuning.max_concurrent_trials,
            time_budget_s=tuning.time_budget_s,
            scheduler=tuning.scheduler if isinstance(tuning.scheduler, str) else dict(tuning.scheduler),
            resources_per_trial=dict(tuning.resources_per_trial) if tuning.resources_per_trial else None,
            seed=tuning.seed,
            time_column=tuning.time_column,
            validation_fraction=tuning.validation_fraction,
            **({"ray_conn_id": tuning.ray_conn_id} if tuning.ray_conn_id else {}),
        )
        register = RegisterModelOperator(
            task_id="register",
            multiple_outputs=True,
            model_name=spec.model,
            model_uri=tune.output["model_uri"],
            metrics={tuning.metric: tune.output["best_metric"]},
            hyperparameters=tune.output["best_config"],
            training_manifest_uri=training_set.output["manifest_uri"],
            feature_service=features.feature_service,
            # the model's signature (entity keys, request features, task, classes) is read from here
            feast_repo_path=repo,
        )
        promote = PromoteModelOperator(
            task_id="promote",
            model_name=spec.model,
            candidate_version=register.output["version"],
            holdout_uri=holdout_set.output["manifest_uri"],
            metric=promotion.metric,
            min_improvement=promotion.min_improvement,
            # None: no floor (the spec gives none for metrics without a natural one, e.g. rmse)
            floor=promotion.floor,
            approval=promotion.approval,
        )
        baseline = DriftBaselineOperator(
            task_id="drift_baseline",
            model_name=spec.model,
            columns=spec.monitoring.columns,
            reference_columns=dict(spec.monitoring.reference_columns) or None,
        )
        gate >> [training_set, holdout_set]
        tune >> register >> promote
        if promotion.approval == "manual":
            promote >> _approval_task(spec, promote) >> baseline
        else:
            promote >> baseline
        if spec.serving.target == "local":
            on_host = _serving_queue(spec)
            deploy = _serving_tasks(spec, repo, baseline, shadow=True)
            if spec.serving.sample_rows:
                sample = PythonOperator(
                    task_id="sample_predictions",
                    python_callable=functools.partial(
                        _run_callable, "airflow_mlops.ml.client.sample_predictions"
                    ),
                    op_kwargs={
                        "step_args": {
                            # the deploy's answer: a server of its own, or /models/<model> on an endpoint
                            "url": "{{ ti.xcom_pull(task_ids='deploy')['url'] }}",
                            "data_uri": "{{ ti.xcom_pull(task_ids='holdout_set')['data_uri'] }}",
                            "model": spec.model,
                            "rows": spec.serving.sample_rows,
                        }
                    },
                    **on_host,
                )
                [deploy, holdout_set] >> sample
    return dag


def approval_doc(spec: LifecycleSpec) -> str:
    """The train DAG's documentation of ``promotion.approval`` (empty when automatic)."""
    from airflow_mlops.operators.registry import TIMEOUT_ANSWERS

    promotion = spec.promotion
    if promotion.approval != "manual":
        return ""
    timeout = (
        f"without an answer within {promotion.approval_timeout_hours:g} h it is {TIMEOUT_ANSWERS[promotion.on_timeout]}"
        if promotion.approval_timeout_hours
        else "it waits until someone answers"
    )
    return (
        "A candidate that passes becomes `pending_approval`: `approval` waits (awaiting input, no worker "
        "slot) for a person to answer in Required actions or on the model page; Approve puts it in production "
        f"and the run deploys it, Reject marks it `rejected` and deploys nothing; {timeout}. "
    )


def _approval_task(spec: LifecycleSpec, promote: Any) -> Any:
    """``promotion.approval: manual``: the ``approval`` task, a person's answer in Airflow's
    human-in-the-loop before the candidate that passed the gate reaches production."""
    from airflow_mlops.operators.registry import ModelApprovalOperator

    hours = spec.promotion.approval_timeout_hours
    return ModelApprovalOperator(
        task_id="approval",
        model_name=spec.model,
        promotion=promote.output,
        response_timeout=timedelta(hours=hours) if hours else None,
        on_timeout=spec.promotion.on_timeout,
    )


def _serving_tasks(spec: LifecycleSpec, repo: str, upstream: Any, *, shadow: bool) -> Any:
    """The tasks that serve the production version after ``upstream`` (``serving.target: local``): build
    and deploy (or the deploy onto the spec's multi-model endpoint); returns the ``deploy`` task.

    :param shadow: put ``serving.rollout.shadow_minutes``' shadow period before the deploy.
    """
    # serving.queue: the serving tasks run on the hosts whose Celery workers listen on it
    on_host = _serving_queue(spec)
    if spec.serving.endpoint:
        deploy = _deploy_onto_endpoint(spec, repo)
        upstream >> deploy
        return deploy
    from airflow_mlops.operators.serving import BentoBuildOperator, BentoDeployOperator

    build = BentoBuildOperator(task_id="build", model_name=spec.model, **on_host)
    rollout = spec.serving.rollout
    deploy = BentoDeployOperator(
        task_id="deploy",
        multiple_outputs=True,
        model_name=spec.model,
        port=spec.serving.port,
        feast_repo_path=repo,
        strategy=rollout.strategy,
        canary_steps=rollout.steps,
        step_minutes=rollout.step_minutes,
        guardrails=rollout.guardrails.model_dump(),
        **on_host,
    )
    if shadow and rollout.shadow_minutes:
        first, last = _shadow_period(spec, repo)
        upstream >> build >> first
        last >> deploy
    else:
        upstream >> build >> deploy
    return deploy


def _serving_queue(spec: LifecycleSpec) -> dict[str, Any]:
    """``serving.queue`` as operator arguments (``{"queue": ...}``), or none: Airflow's default queue."""
    return {"queue": spec.serving.queue} if spec.serving.queue else {}


def _shadow_period(spec: LifecycleSpec, repo: str) -> tuple[Any, Any]:
    """``serving.rollout.shadow_minutes``: the new production version first shadows the live one
    (``deploy_shadow``), the wait runs deferred (``shadow_period``, no worker slot held), then the shadow
    report gates the rollout (``shadow_gate``); returns the first and the last task."""
    from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync

    from airflow_mlops.operators.serving import BentoDeployOperator
    from airflow_mlops.operators.shadow import ShadowReportOperator

    rollout = spec.serving.rollout
    shadow = BentoDeployOperator(
        task_id="deploy_shadow",
        model_name=spec.model,
        port=spec.serving.port,
        feast_repo_path=repo,
        strategy="shadow",
        **_serving_queue(spec),
    )
    wait = DateTimeSensorAsync(
        task_id="shadow_period",
        target_time="{{ (ti.start_date + macros.timedelta(minutes="
        + repr(rollout.shadow_minutes)
        + ")).isoformat() }}",
        **_serving_queue(spec),
    )
    gate = ShadowReportOperator(
        task_id="shadow_gate",
        model_name=spec.model,
        # the period just waited (in hours), a little more for the records flushed as it began
        window_hours=rollout.shadow_minutes / 60 + 0.25,
        **rollout.shadow_gate.model_dump(),
        **_serving_queue(spec),
    )
    shadow >> wait >> gate
    return shadow, gate


def _deploy_onto_endpoint(spec: LifecycleSpec, repo: str) -> Any:
    """``serving.endpoint``: the ``deploy`` task puts the model onto that multi-model endpoint (shared with
    other lifecycles; no Bento is built); its ``url`` is the model's base, ``/models/<model>``."""
    from airflow_mlops.operators.multi_model import MultiModelDeployOperator

    return MultiModelDeployOperator(
        task_id="deploy",
        multiple_outputs=True,
        model_name=spec.model,
        endpoint=spec.serving.endpoint,
        feast_repo_path=repo,
        **_serving_queue(spec),
    )


def monitor_dag(spec: LifecycleSpec) -> DAG:
    from airflow_mlops.operators.drift import EvidentlyDriftOperator

    monitoring = spec.monitoring
    start = monitoring.start_date or spec.start_date
    max_decay = dict(monitoring.max_decay or {})
    thresholds = ", ".join(f"{metric} {value:g}" for metric, value in max_decay.items())
    if monitoring.label_column:
        quality = (
            f"where labels (`{monitoring.label_column}`) have arrived, scores the production {spec.task} "
            f"model on the window against its holdout score: decay beyond {thresholds} counts as drift"
        )
    else:
        quality = "checks no quality decay (the spec sets no `monitoring.label_column`)"
    predictions = (
        " It also compares the served predictions (prediction log) with the holdout's predictions."
        if monitoring.prediction_drift
        else ""
    )
    with DAG(
        dag_id=spec.dag_id("monitor"),
        description=f"{monitoring.schedule.capitalize()} Evidently drift check of the last "
        f"{monitoring.window_days} days; drift starts a retraining.",
        schedule=_timetable(monitoring.schedule),
        start_date=_utc(start),
        end_date=_utc(spec.end_date) if spec.end_date else None,
        catchup=False,
        max_active_runs=2,
        params={
            "reference_uri": Param(
                None,
                type=["null", "string"],
                description="Compare against this parquet / training manifest instead of the production "
                "model's training snapshot (required while no model is in production).",
            ),
            "window_days": Param(monitoring.window_days, type="integer", minimum=1),
        },
        default_args=_default_args(spec),
        # only the DAGs a DAG file puts in its globals exist: a file may take some of a spec's DAGs
        auto_register=False,
        tags=["mlops", *spec.tags, "monitor"],
        doc_md=f"""Drift monitor for model **{spec.model}** (spec `{spec.source}`).

One run per {monitoring.schedule} data interval: `drift` reads the last `window_days` days up to the
interval's last day from the offline table `{monitoring.table or spec.ingest.table}`, compares them with
Evidently against the reference (the production model's training snapshot, or the run's
`reference_uri`), and {quality}.{predictions} It writes the HTML report and a JSON summary to the artifact
store and, only on drift or decay, emits an event on `{spec.drift_asset_name}`, which starts
`{spec.dag_id("train")}`.
""",
    ) as dag:
        EvidentlyDriftOperator(
            task_id="drift",
            model_name=spec.model,
            reference_uri="{{ params.reference_uri or '' }}",
            window_end=LAST_DAY,
            window_days="{{ params.window_days }}",
            table=monitoring.table or spec.ingest.table,
            joins=[dict(j) for j in monitoring.joins] or None,
            columns=monitoring.columns,
            drift_share=monitoring.drift_share,
            reference_columns=dict(monitoring.reference_columns) or None,
            label_column=monitoring.label_column,
            label_rule=dict(monitoring.label_rule) if monitoring.label_rule else None,
            labels_table=monitoring.labels_table,
            feature_repo=str(spec.resolve(spec.features.repo)) if monitoring.labels_table else None,
            max_decay=max_decay,
            prediction_drift=monitoring.prediction_drift,
            drift_asset=Asset(name=spec.drift_asset_name),
        )
    return dag


def operate_dag(spec: LifecycleSpec) -> DAG:
    from airflow_mlops.operators.drift import DriftBaselineOperator
    from airflow_mlops.operators.registry import ModelActionOperator

    repo = str(spec.resolve(spec.features.repo))
    serves = spec.serving.target == "local"
    with DAG(
        dag_id=spec.dag_id("operate"),
        description=f"Promote a version of {spec.model} or roll back, by hand; the live endpoint follows.",
        schedule=None,
        start_date=_utc(spec.start_date),
        catchup=False,
        # one change at a time: two runs would race on what production is
        max_active_runs=1,
        params=operate_params(),
        default_args=_default_args(spec),
        auto_register=False,
        tags=["mlops", *spec.tags, "operate"],
        doc_md=f"""Operate model **{spec.model}** by hand (spec `{spec.source}`).

Trigger with conf `{{"action": "promote", "version": "<version>"}}` or `{{"action": "rollback",
"version": null}}`. `operate` checks the request before changing anything (an unknown action or version,
a `rejected` version, one `pending_approval` in a train run, no previous version to roll back to: the run
fails naming the problem), puts the version in production in the registry and records the decision with
the run's triggering user. `drift_baseline` makes its training snapshot the monitor's reference{
            ", then `build` / `deploy` serve it as the train DAG does, so the live endpoint follows"
            if serves
            else ""
        }.
""",
    ) as dag:
        action = ModelActionOperator(task_id="operate", model_name=spec.model, **OPERATE_REQUEST)
        baseline = DriftBaselineOperator(
            task_id="drift_baseline",
            model_name=spec.model,
            columns=spec.monitoring.columns,
            reference_columns=dict(spec.monitoring.reference_columns) or None,
        )
        action >> baseline
        if serves:
            # a person chose this version: no shadow period before it serves
            _serving_tasks(spec, repo, baseline, shadow=False)
    return dag


def batch_scoring_dag(spec: LifecycleSpec) -> DAG:
    from airflow_mlops.operators.batch_scoring import BatchScoringOperator

    scoring = spec.batch_scoring
    assert scoring is not None
    table = scoring.table or spec.ingest.table
    output = scoring.output_table or f"{spec.model}_predictions"
    days = scoring.window_days or (7 if scoring.schedule == "weekly" else 1)
    with DAG(
        dag_id=spec.dag_id("batch_scoring"),
        description=f"{scoring.schedule.capitalize()} scoring of {table} with the production {spec.model} "
        f"into {output}.",
        schedule=_timetable(scoring.schedule),
        start_date=_utc(scoring.start_date or spec.start_date),
        end_date=_utc(spec.end_date) if spec.end_date else None,
        catchup=False,
        max_active_runs=1,
        params={
            "version": Param(
                None, type=["null", "string"], description="Score with this version instead of production."
            ),
            "window_days": Param(days, type="integer", minimum=1),
        },
        default_args=_default_args(spec),
        auto_register=False,
        tags=["mlops", *spec.tags, "batch-scoring"],
        doc_md=f"""Batch scoring for model **{spec.model}** (spec `{spec.source}`).

One run per {scoring.schedule} data interval: `score` reads the last `window_days` days up to the interval's
last day from the offline table `{table}`, answers every row with the production version (or the run's
`version`), and writes `{output}` with one partition per day, replaced on a rerun. Windows of at least
{scoring.parallel_min_rows:,} rows are scored on Ray.
""",
    ) as dag:
        BatchScoringOperator(
            task_id="score",
            model_name=spec.model,
            version="{{ params.version or '' }}",
            table=table,
            window_end=LAST_DAY,
            window_days="{{ params.window_days }}",
            output_table=output,
            joins=[dict(j) for j in scoring.joins] or None,
            carry_columns=scoring.carry_columns,
            feature_repo=str(spec.resolve(spec.features.repo)),
            parallel_min_rows=scoring.parallel_min_rows,
            chunk_rows=scoring.chunk_rows,
            outlets=[Asset(name=f"{spec.model}_predictions")],
        )
    return dag


def lifecycle_dags(spec_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, DAG]:
    """The ingest, features, train, monitor and operate DAGs of the lifecycle spec at ``spec_path``, and
    its batch scoring DAG when the spec has a ``batch_scoring`` section.

    :param overrides: nested mapping merged over the spec (tests use it to switch cadence or ports).
    :return: ``{dag_id: DAG}``; put it in the DAG file's globals for Airflow to find the DAGs. Only the
        DAGs put there exist (they are built with ``auto_register=False``): a file may take only some of
        them, e.g. the train and monitor DAGs of a model that shares another spec's ingest and features.
    :raises LifecycleSpecError: the spec is invalid; the message names the file, each field and the fix.
    """
    spec = load_spec(spec_path, overrides)
    dags = [ingest_dag(spec), features_dag(spec), train_dag(spec), monitor_dag(spec), operate_dag(spec)]
    if spec.batch_scoring is not None:
        dags.append(batch_scoring_dag(spec))
    return {dag.dag_id: dag for dag in dags}
