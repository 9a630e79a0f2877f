"""Hyperparameter search with Ray Tune, on local Ray inside the task or on a Ray cluster as a Ray Job."""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.configuration import conf

from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsConfigError, TuningError
from airflow_mlops.hooks.ray import TERMINAL_JOB_STATES, RayHook, merge_runtime_env
from airflow_mlops.triggers.ray import RayJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_mlops.ml.search import SearchSpec

OUTPUT_FOLDER = "tuning"


def job_prefix(dag_id: str, run_id: str, task_id: str, map_index: int | None = -1) -> str:
    """The submission-id prefix of a task instance's Ray Jobs (``mlops-tune-<hash>-``): the same for
    every try, so a try finds the jobs of the earlier ones."""
    index = -1 if map_index is None else map_index
    key = hashlib.sha256(f"{dag_id}/{run_id}/{task_id}/{index}".encode()).hexdigest()[:16]
    return f"mlops-tune-{key}-"


def _package_dir(module_name: str) -> str | None:
    """The folder of ``module_name``'s top-level package when it is not installed in site-packages
    (so the cluster needs it shipped), else None."""
    import importlib.util

    spec = importlib.util.find_spec(module_name.split(".")[0])
    if spec is None or not spec.origin:
        return None
    location = next(iter(spec.submodule_search_locations)) if spec.submodule_search_locations else spec.origin
    return None if "site-packages" in location else location


class RayTuneOperator(BaseOperator):
    """Tune a model's hyperparameters with Ray Tune and return the best model.

    Runs on local Ray started inside the task (``ray_conn_id`` empty, or a ``ray`` connection with no
    host), or as a Ray Job on the cluster of a ``ray`` connection; with ``deferrable=True`` the task
    then waits in the triggerer (:class:`~airflow_mlops.triggers.ray.RayJobTrigger`) and holds no
    worker slot. Every check that can fail (trainable, search space, task, metric, label, data, cluster)
    runs before any trial starts.

    The model's task (``binary``, ``multiclass`` or ``regression``) is ``task`` when given, else the
    trainable's only declared task, else inferred from the label within the trainable's tasks (the
    classifiers: two classes -> binary, three or more -> multiclass). ``metric`` defaults to the task's
    (``auc``, ``macro_f1``, ``rmse``); a metric that does not fit the task is refused before any trial.

    Tune's state lives in the artifact store under ``<dag>/<run>/<task>/tuning/tune_state``: a retry
    of a killed task resumes the search and does not run completed trials again.

    On a cluster, the job's submission id is derived from the task instance
    (``mlops-tune-<hash of dag, run, task, map index>-try<n>``), so one tune state never has two jobs:
    before submitting, a try stops (and waits for) a job of an earlier try that still runs (its worker
    died, or it was cleared while its trigger could not reach the cluster), and a try whose own job is
    already there waits for that job instead of submitting another. Clearing the task or marking it
    failed or succeeded stops the job: ``on_kill`` on the worker, the trigger's ``on_kill`` in the
    triggerer while deferred. The job id and result URI travel in the trigger's event and in the
    deferral's ``kwargs``, never in ``self``.

    Returns (XCom, JSON): ``best_config``, ``best_metric``, ``metric`` and ``mode``, ``task`` and
    ``classes``, ``model_uri`` + ``model_sha256`` +
    ``model_format`` (skops or LightGBM text, never pickle), ``trials_uri`` (CSV), ``plot_uri`` (PNG),
    ``counts`` (trials, completed, stopped_early, errored, finished_before_resume), ``result_uri``.

    :param training_data_uri: parquet file or folder, or the JSON manifest of the training-set operator
        (templated).
    :param label: label column; default the manifest's (templated).
    :param trainable: built-in name (e.g. ``lightgbm_classifier``) or import path of a function
        ``(config, data)`` (templated).
    :param search_space: plain mapping, or JSON/YAML text, e.g.
        ``{"learning_rate": {"loguniform": [0.01, 0.3]}}`` (templated).
    :param metric: metric to optimise, one that fits the task and that the trainable reports (``auc``,
        ``macro_f1``, ``accuracy``, ``logloss``, ``rmse``, ``mae``, ``r2``); default the task's default
        metric (:data:`airflow_mlops.ml.metrics.DEFAULT_METRIC`).
    :param mode: ``max`` or ``min``; a built-in metric's own direction (leave it unset); needed for a
        metric of your own trainable.
    :param task: ``binary``, ``multiclass`` or ``regression``; the label is checked against it (default:
        from the trainable and the label).
    :param num_samples: trials to sample (times the grid size when ``grid_search`` is used).
    :param scheduler: ``asha`` (default), ``fifo``, or ``{"type": "asha", "grace_period": 2, "max_t": 100,
        "reduction_factor": 3}``.
    :param max_concurrent_trials: at most this many trials at once (default: as many as resources allow).
    :param resources_per_trial: Ray resources per trial, default ``{"cpu": 1}``.
    :param time_budget_s: stop the whole search after this many seconds.
    :param seed: seed for sampling the search space and for the models.
    :param time_column: time column for the time-based validation split; default the manifest's
        ``event_timestamp_column`` (templated).
    :param features: feature columns; default the manifest's features or every other column (templated).
    :param validation_fraction: share of the latest rows used for validation.
    :param reuse_actors: reuse trial actors between trials (much less per-trial overhead).
    :param ray_conn_id: ``ray`` connection; None means local Ray.
    :param runtime_env: extra Ray runtime env for the cluster job (templated).
    :param deferrable: on a cluster, wait for the job in the triggerer; default
        ``[operators] default_deferrable``.
    :param poll_interval: seconds between two job-status checks on a cluster.
    :param progress_interval: seconds between two progress lines in the task log.
    """

    template_fields: Sequence[str] = (
        "training_data_uri",
        "label_column",
        "trainable",
        "search_space",
        "time_column",
        "features",
        "runtime_env",
    )
    template_fields_renderers = {"search_space": "json", "runtime_env": "json"}
    ui_color = "#fde6c8"

    def __init__(
        self,
        *,
        training_data_uri: str,
        trainable: str,
        search_space: dict[str, Any] | str,
        metric: str | None = None,
        label: str | None = None,
        mode: str | None = None,
        task: str | None = None,
        num_samples: int = 10,
        scheduler: str | dict[str, Any] | None = "asha",
        max_concurrent_trials: int | None = None,
        resources_per_trial: dict[str, float] | None = None,
        time_budget_s: float | None = None,
        seed: int | None = None,
        time_column: str | None = None,
        features: list[str] | None = None,
        validation_fraction: float = 0.2,
        reuse_actors: bool = True,
        ray_conn_id: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 10.0,
        progress_interval: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.training_data_uri = training_data_uri
        # BaseOperator.label is the task's display label, so the argument is stored as label_column
        self.label_column = label
        self.trainable = trainable
        self.search_space = search_space
        self.metric = metric
        self.mode = mode
        self.model_task = task  # the model's task (not an Airflow task)
        self.num_samples = num_samples
        self.scheduler = scheduler
        self.max_concurrent_trials = max_concurrent_trials
        self.resources_per_trial = resources_per_trial
        self.time_budget_s = time_budget_s
        self.seed = seed
        self.time_column = time_column
        self.features = features
        self.validation_fraction = validation_fraction
        self.reuse_actors = reuse_actors
        self.ray_conn_id = ray_conn_id
        self.runtime_env = runtime_env
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.progress_interval = progress_interval
        self._job_id: str | None = None

    @cached_property
    def hook(self) -> RayHook:
        return RayHook(ray_conn_id=self.ray_conn_id)

    # --------------------------------------------------------------------------------- spec

    def build_spec(self, context: Context) -> SearchSpec:
        """The search spec from the rendered arguments; checks the search space's form (no Ray)."""
        from airflow_mlops.artifacts import ArtifactStore
        from airflow_mlops.ml.metrics import normalize_task
        from airflow_mlops.ml.search import SearchSpec, check_scheduler, resolve_metric
        from airflow_mlops.ml.search_space import SearchSpaceError, parse_search_space

        try:
            space = parse_search_space(self.search_space)
        except SearchSpaceError as err:
            raise MLOpsArgumentError(
                f"malformed search_space: {err}", fix="see docs/tuning.md for the search-space form."
            ) from err
        task = normalize_task(self.model_task) if self.model_task else None
        metric, mode = resolve_metric(self.metric or None, self.mode or None, task)
        features = self.features
        if isinstance(features, str):
            features = [f.strip() for f in features.split(",") if f.strip()]
        output = ArtifactStore().for_task(context, OUTPUT_FOLDER)
        return SearchSpec(
            training_data_uri=str(self.training_data_uri),
            trainable=str(self.trainable),
            search_space=space,
            metric=metric,
            mode=mode,
            task=task,
            storage_path=str(output / "tune_state"),
            output_uri=str(output),
            label=self.label_column or None,
            time_column=self.time_column or None,
            features=list(features) if features else None,
            validation_fraction=float(self.validation_fraction),
            num_samples=int(self.num_samples),
            scheduler=check_scheduler(self.scheduler),
            max_concurrent_trials=self.max_concurrent_trials,
            resources_per_trial=dict(self.resources_per_trial or {"cpu": 1}),
            time_budget_s=self.time_budget_s,
            seed=self.seed,
            reuse_actors=bool(self.reuse_actors),
            progress_interval=float(self.progress_interval),
        )

    # ------------------------------------------------------------------------------ execute

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_mlops.ml.search import prepare, run_search

        spec = self.build_spec(context)
        local = self.hook.is_local
        if not local:
            self.log.info("Ray cluster at %s (connection %s)", self.hook.address, self.ray_conn_id)
            self.hook.job_client  # noqa: B018 -- an unreachable cluster fails here, before any trial
        fn, data = prepare(spec)
        self.log.info("Training set: %s", data.summary())
        self.log.info("Task %s: optimising %s (%s)", spec.task, spec.metric, spec.mode)
        if local:
            if self.deferrable:
                self.log.info("deferrable=True has no effect on local Ray: the search runs in this task")
            with self.hook.local_ray():
                return run_search(spec, fn, data, state_key=self._state_key(spec))
        return self._submit(context, spec, fn)

    def _state_key(self, spec: SearchSpec) -> bytes | None:
        """The key signing this search's saved Tune state, derived from the registry signing key for this
        search's state folder alone; None (a retry starts fresh) when no registry key is configured."""
        from airflow_mlops.hooks.bentoml import registry_signing_key
        from airflow_mlops.ml.signing import derive

        try:
            return derive(registry_signing_key(), f"tune-state:{spec.storage_path}")
        except MLOpsConfigError as err:
            self.log.warning("A retry of this search will start fresh, not resume: %s", err)
            return None

    def _runtime_env(self, fn: Any, state_key: bytes | None = None) -> dict[str, Any]:
        import airflow_mlops

        modules = [os.path.dirname(airflow_mlops.__file__)]
        extra = _package_dir(fn.__module__)
        if extra and extra not in modules:
            modules.append(extra)
        env: dict[str, Any] = {
            "py_modules": modules,
            # the UI plugin's npm tree (airflow_mlops/plugins/ui/node_modules, ~100 MB in a source checkout) is
            # no task code: uploaded with the package it exceeded the Ray Jobs API's 100 MiB request limit (413)
            "excludes": ["node_modules/"],
            "env_vars": {"PYTHONUNBUFFERED": "1"},
        }
        if state_key:  # scoped to this search's state: it can forge nothing else
            from airflow_mlops.ml.search import STATE_KEY_ENV

            env["env_vars"][STATE_KEY_ENV] = state_key.hex()
        return self.hook.runtime_env(merge_runtime_env(env, self.runtime_env))

    def _submit(self, context: Context, spec: SearchSpec, fn: Any) -> dict[str, Any]:
        from airflow_mlops.artifacts import ArtifactStore, as_path

        store = ArtifactStore()
        spec_path = as_path(spec.output_uri) / "spec.json"
        store.write_bytes(spec_path, spec.to_json().encode())
        result_uri = str(as_path(spec.output_uri) / "result.json")
        return self._start_job(
            context,
            f"python -m airflow_mlops.ml.search {shlex.quote(str(spec_path))}",
            result_uri,
            runtime_env=self._runtime_env(fn, self._state_key(spec)),
        )

    #: seconds to wait for the job of an earlier try to stop before a new one is submitted
    stop_wait_s: float = 120.0

    def _start_job(
        self, context: Context, entrypoint: str, result_uri: str, runtime_env: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Submit this try's job (or attach to it when it exists), once no other job of the task runs."""
        ti = context["ti"]
        prefix = job_prefix(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
        job_id = f"{prefix}try{getattr(ti, 'try_number', 0) or 0}"
        jobs = self.hook.jobs_with_prefix(prefix)
        for other, status in sorted(jobs.items()):
            if other != job_id and status not in TERMINAL_JOB_STATES:
                # the same tune state: never two jobs writing it
                self.log.warning("Ray Job %s of an earlier try is still %s: stopping it first", other, status)
                self.hook.stop_job(other, wait=self.stop_wait_s)
        self._job_id = job_id
        if job_id in jobs:
            self.log.info("Ray Job %s of this try exists (%s): waiting for it", job_id, jobs[job_id])
        else:
            self.hook.submit_job(
                entrypoint,
                runtime_env=runtime_env,
                submission_id=job_id,
                metadata={
                    "dag_id": ti.dag_id,
                    "task_id": ti.task_id,
                    "run_id": ti.run_id,
                    "map_index": str(getattr(ti, "map_index", -1)),
                },
            )
            self.log.info("Submitted Ray Job %s to %s", job_id, self.hook.address)
        if self.deferrable:
            self.defer(
                trigger=RayJobTrigger(
                    job_id=job_id,
                    ray_conn_id=str(self.ray_conn_id),
                    result_uri=result_uri,
                    poll_interval=float(self.poll_interval),
                ),
                method_name="execute_complete",
                kwargs={"job_id": job_id, "result_uri": result_uri},
            )
        return self.execute_complete(context, self._wait(job_id, result_uri))

    def _wait(self, job_id: str, result_uri: str) -> dict[str, Any]:
        """Poll the job from the worker (non-deferrable), relaying its new log lines."""
        shown = 0
        while True:
            status = self.hook.get_job_status(job_id)
            logs = self.hook.get_job_logs(job_id)
            for line in logs[shown:].splitlines():
                if line.strip():
                    self.log.info("[job] %s", line)
            shown = len(logs)
            if status in TERMINAL_JOB_STATES:
                break
            time.sleep(float(self.poll_interval))
        event = {
            "status": "success" if status == "SUCCEEDED" else "error",
            "job_id": job_id,
            "job_status": status,
            "result_uri": result_uri,
        }
        if status != "SUCCEEDED":
            event["message"] = f"Ray Job {job_id} ended {status}. Last lines of its log:\n{logs[-4000:]}"
        return event

    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any],
        job_id: str | None = None,
        result_uri: str | None = None,
    ) -> dict[str, Any]:
        """Resume after the job ended; all state comes from ``event`` (and the deferral's ``job_id``,
        ``result_uri``) and the artifact store, never from ``self``."""
        from airflow_mlops.artifacts import ArtifactStore

        event = {"job_id": job_id, "result_uri": result_uri, **{k: v for k, v in event.items() if v}}
        if event.get("status") != "success":
            raise TuningError(
                f"the tuning job failed: {event.get('message')}",
                fix="read the job log above; fix the trainable or data, then clear the task "
                "(completed trials are kept).",
            )
        result = ArtifactStore().read_json(event["result_uri"])
        result["ray_job_id"] = event["job_id"]
        self.log.info(
            "Ray Job %s: best %s=%s, model %s",
            event["job_id"],
            result["metric"],
            result["best_metric"],
            result["model_uri"],
        )
        return result

    def on_kill(self) -> None:
        if self._job_id and not self.hook.is_local:
            self.log.info("Stopping Ray Job %s", self._job_id)
            self.hook.stop_job(self._job_id)
