"""One Ray Tune search from a JSON-able :class:`SearchSpec`: the same code runs inside the Airflow task
(local Ray) and as a Ray Job on a cluster (``python -m airflow_mlops.ml.search <spec-uri>``).

Tune keeps its experiment state and the trials' checkpoints under ``spec.storage_path`` in the artifact
store. When that folder already holds an experiment (the task was killed and Airflow retried it), the
search resumes with ``Tuner.restore``: completed trials keep their results and are not run again.

``Tuner.restore`` unpickles that state, so it is resumed only when it is the state this search wrote:
while Tune runs, the driver signs (HMAC-SHA256, key from ``MLOPS_TUNE_STATE_KEY`` or the caller) the
sha256 of every file it stages for the experiment folder, in ``<storage>/search.manifest.json``, right
after each of Tune's own snapshots. Before resuming, every ``.pkl`` and ``.json`` file of the stored
experiment (checkpoint folders aside: Tune does not unpickle them) must be one the manifest signs. State
that does not verify, or any state when there is no key, is moved aside to ``search.refused-<time>`` and
the search starts fresh, with a warning in the log.

Outputs, all under ``spec.output_uri`` and written atomically: ``model/<model file>`` with its
``.sha256`` and ``model.json`` beside it, ``trials.csv`` (one row per trial), ``trials.png`` (metric
over time per trial) and ``result.json`` (what the operator returns).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError, TuningError

log = logging.getLogger("airflow_mlops.tuning")

BUILTIN_MODULE = "airflow_mlops.ml.trainables"
EXPERIMENT = "search"
#: environment variable carrying the tune-state key (hex) into a Ray Job
STATE_KEY_ENV = "MLOPS_TUNE_STATE_KEY"
#: the signed manifest of the experiment's files, beside the experiment folder
MANIFEST = f"{EXPERIMENT}.manifest.json"
#: per experiment folder: the key and the hashes signed so far. Module state, never an attribute of the
#: Tune callback: Tune pickles its callbacks into the state it stores.
_SIGNERS: dict[str, dict[str, Any]] = {}


@dataclass
class SearchSpec:
    """Everything a search needs, JSON-able so it can travel to a Ray Job as a file."""

    training_data_uri: str
    trainable: str
    search_space: dict[str, Any]
    #: None until :func:`prepare` resolves it: the task's default metric and its direction
    metric: str | None
    mode: str | None
    storage_path: str
    output_uri: str
    #: ``binary``, ``multiclass``, ``regression``; None: from the trainable's declaration or the label
    task: str | None = None
    label: str | None = None
    time_column: str | None = None
    features: list[str] | None = None
    validation_fraction: float = 0.2
    num_samples: int = 10
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    max_concurrent_trials: int | None = None
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    time_budget_s: float | None = None
    seed: int | None = None
    reuse_actors: bool = True
    progress_interval: float = 5.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SearchSpec:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------- checks


def resolve_trainable(path: str) -> tuple[str, Any]:
    """``module.function`` (or a built-in's bare name) -> (full import path, the function).

    :raises MLOpsArgumentError: the module or function cannot be imported, naming it.
    """
    from airflow_mlops.ml.trainables import BUILTINS

    full = f"{BUILTIN_MODULE}.{path}" if path in BUILTINS else path
    module_name, _, attr = full.rpartition(".")
    fix = (
        f"use a built-in ({', '.join(BUILTINS)}) or the import path 'package.module.function' of a "
        "function (config, data) importable on the workers."
    )
    if not module_name:
        raise MLOpsArgumentError(f"trainable {path!r} is not an import path.", fix=fix)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MLOpsArgumentError(
            f"trainable {path!r}: module {module_name!r} cannot be imported ({err}).", fix=fix
        ) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MLOpsArgumentError(
            f"trainable {path!r}: module {module_name!r} has no function {attr!r}.", fix=fix
        )
    return full, fn


def resolve_metric(metric: str | None, mode: str | None, task: str | None) -> tuple[str | None, str | None]:
    """The metric and its direction: a built-in metric's own direction (a contradicting ``mode`` is
    refused), the task's default metric and its direction when ``metric`` is None (a ``mode`` given with
    it is ignored), ``mode`` as given for a metric of the trainable's own.

    :raises MLOpsArgumentError: a built-in metric that does not fit ``task``, a ``mode`` against a
        built-in metric's direction, an unknown metric without ``mode``.
    """
    from airflow_mlops.ml.metrics import DEFAULT_METRIC, METRICS, check_metric, normalize_task

    if metric is None:
        if task is None:
            return None, mode
        metric = DEFAULT_METRIC[normalize_task(task)]
        if mode is not None and mode != METRICS[metric].mode:
            log.warning(
                "mode %r ignored: the task's default metric %s is %s", mode, metric, METRICS[metric].mode
            )
        return metric, METRICS[metric].mode
    if mode is not None and mode not in ("min", "max"):
        raise MLOpsArgumentError(f"mode must be 'min' or 'max', got {mode!r}.")
    if metric in METRICS:
        builtin = check_metric(metric, task, field="metric") if task else METRICS[metric]
        if mode is not None and mode != builtin.mode:
            raise MLOpsArgumentError(
                f"mode {mode!r} contradicts metric {metric!r}, which is better when "
                f"{'higher' if builtin.higher_is_better else 'lower'}.",
                fix=f"leave mode unset (it follows the metric) or set mode={builtin.mode!r}.",
            )
        return metric, builtin.mode
    if mode is None:
        raise MLOpsArgumentError(
            f"mode is needed for metric {metric!r} (not a built-in metric).",
            fix="pass mode='max' or 'min', or use a built-in metric (auc, macro_f1, logloss, rmse, ...).",
        )
    return metric, mode


def check_metric(fn: Any, trainable: str, metric: str, mode: str, task: str | None = None) -> None:
    """The metric must fit the task and be one the trainable reports (when it declares
    ``reported_metrics``)."""
    from airflow_mlops.ml.metrics import METRICS

    resolve_metric(metric, mode, task)
    reported = getattr(fn, "reported_metrics", None)
    if reported is None:
        log.warning(
            "Trainable %s declares no reported_metrics; metric %r is not checked before the search",
            trainable,
            metric,
        )
        return
    if metric not in reported:
        fitting = [m for m in reported if not task or m not in METRICS or task in METRICS[m].tasks]
        raise MLOpsArgumentError(
            f"metric {metric!r} is not reported by trainable {trainable!r}"
            + (f" for a {task} model" if task else "")
            + f"; it reports {fitting}.",
            fix="set metric to one of those, or leave it unset for the task's default metric.",
        )


def trainable_task(fn: Any, trainable: str, task: str | None) -> str | None:
    """The task of the search when it is known before the data is read: the one given (checked against
    the trainable's declaration) or the trainable's only declared task.

    :raises MLOpsArgumentError: the trainable declares other tasks than the one given.
    """
    from airflow_mlops.ml.metrics import normalize_task
    from airflow_mlops.ml.trainables import declared_tasks

    declared = declared_tasks(fn)
    if task:
        task = normalize_task(task)
        if declared and task not in declared:
            raise MLOpsArgumentError(
                f"trainable {trainable!r} trains {' or '.join(declared)} models, not {task}.",
                fix=f"pick a trainable for {task} models (e.g. "
                f"{'lightgbm_regressor' if task == 'regression' else 'lightgbm_classifier'}), or correct task.",
            )
        return task
    return declared[0] if declared and len(declared) == 1 else None


def check_scheduler(scheduler: Any) -> dict[str, Any]:
    """``"asha"`` / ``"fifo"`` / ``{"type": "asha", "grace_period": 2, ...}`` -> a dict."""
    if scheduler is None:
        scheduler = "fifo"
    if isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    if not isinstance(scheduler, dict) or str(scheduler.get("type", "")).lower() not in ("asha", "fifo"):
        raise MLOpsArgumentError(
            f"scheduler {scheduler!r} is not supported.",
            fix="use 'asha' (default), 'fifo', or {'type': 'asha', 'grace_period': 2, 'max_t': 100, "
            "'reduction_factor': 3}.",
        )
    unknown = set(scheduler) - {"type", "grace_period", "max_t", "reduction_factor"}
    if unknown:
        raise MLOpsArgumentError(
            f"scheduler options {sorted(unknown)} are not known.",
            fix="use grace_period, max_t and reduction_factor.",
        )
    return {**scheduler, "type": scheduler["type"].lower()}


def prepare(spec: SearchSpec) -> tuple[Any, Any]:
    """Every check that can fail before a trial starts: trainable, search space, task, metric, data.

    Resolves ``spec.task`` (given, the trainable's only task, or inferred from the label within the
    trainable's tasks), ``spec.metric`` (default: the task's) and ``spec.mode`` in place, so the spec
    written for a Ray Job carries them.

    :return: the trainable function and the :class:`~airflow_mlops.ml.dataset.TrainingSet`.
    """
    from airflow_mlops.ml.dataset import build_training_set, read_frame, resolve_source
    from airflow_mlops.ml.search_space import SearchSpaceError, parse_search_space
    from airflow_mlops.ml.trainables import declared_tasks

    full, fn = resolve_trainable(spec.trainable)
    try:
        parse_search_space(spec.search_space)
    except SearchSpaceError as err:
        raise MLOpsArgumentError(
            f"malformed search_space: {err}", fix="see docs/tuning.md for the search-space form."
        ) from err
    task = trainable_task(fn, full, spec.task)
    if task:  # the task is known: a wrong metric fails before the data is read
        metric, mode = resolve_metric(spec.metric, spec.mode, task)
        check_metric(fn, full, metric, mode, task)  # type: ignore[arg-type]
    check_scheduler(spec.scheduler)
    if spec.num_samples < 1:
        raise MLOpsArgumentError(f"num_samples must be at least 1, got {spec.num_samples}.")
    source = resolve_source(spec.training_data_uri)
    label = spec.label or source.label
    if not label:
        raise MLOpsArgumentError(
            f"no label given, and {spec.training_data_uri!r} is not a manifest naming one.",
            fix="pass label= to the operator.",
        )
    data = build_training_set(
        read_frame(source),
        label=label,
        task=task or "any",
        allowed_tasks=declared_tasks(fn),
        time_column=spec.time_column or source.time_column,
        features=spec.features,
        feature_refs=source.feature_refs,
        validation_fraction=spec.validation_fraction,
        origin=source.data_uri,
    )
    spec.task = data.task
    spec.metric, spec.mode = resolve_metric(spec.metric, spec.mode, data.task)
    check_metric(fn, full, spec.metric, spec.mode, data.task)  # type: ignore[arg-type]
    data.metric, data.mode = spec.metric, spec.mode
    return fn, data


# ------------------------------------------------------------------------------------------- progress


def _progress_callback(interval: float, metric: str, mode: str):
    from ray.tune import Callback

    class ProgressLog(Callback):
        """One compact log line every ``interval`` seconds, and one per finished trial."""

        def __init__(self) -> None:
            self.last = 0.0

        def _best(self, trials: list) -> float | None:
            values = [t.last_result.get(metric) for t in trials if t.last_result.get(metric) is not None]
            if not values:
                return None
            return max(values) if mode == "max" else min(values)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            now = time.monotonic()
            if now - self.last < interval:
                return
            self.last = now
            states: dict[str, int] = {}
            for t in trials:
                states[t.status] = states.get(t.status, 0) + 1
            done = [t for t in trials if t.status == "TERMINATED"]
            final = sum(1 for t in done if t.last_result.get("final"))
            best = self._best(trials)
            log.info(
                "Tune: %d trials | running %d, pending %d, done %d, stopped early %d, errored %d | best %s %s",
                len(trials),
                states.get("RUNNING", 0),
                states.get("PENDING", 0),
                final,
                len(done) - final,
                states.get("ERROR", 0),
                metric,
                "n/a" if best is None else f"{best:.5f}",
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result
            log.info(
                "Trial %s %s after %s iterations: %s=%s",
                trial.trial_id,
                "finished" if result.get("final") else "stopped early",
                result.get("training_iteration"),
                metric,
                result.get(metric),
            )

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.warning("Trial %s failed: %s", trial.trial_id, trial.error_file)

    return ProgressLog()


def _scheduler(config: dict[str, Any]):
    if config["type"] == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=int(config.get("max_t", 100)),
        grace_period=int(config.get("grace_period", 2)),
        reduction_factor=float(config.get("reduction_factor", 3)),
    )


def _local_or_uri(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


# ------------------------------------------------------------------------------------- signed state


def _fs(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of ``uri``. An object-store URI goes through the artifact store's
    own fsspec filesystem (``ObjectStoragePath``: the connection of ``s3://<conn_id>@bucket/...``, its keys
    and endpoint), not pyarrow's S3 client, which would take the connection id for an access key."""
    import pyarrow.fs as pafs

    if "://" not in uri or uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    from airflow_mlops.artifacts import as_path

    path = as_path(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(path.fs)), path.path


def _checked(relpath: str) -> bool:
    """Whether Tune may deserialize ``relpath`` on restore: its ``.pkl`` and ``.json`` files outside the
    trials' checkpoint folders (those hold the model files, read as data and checked at registration)."""
    parts = relpath.split("/")
    return relpath.endswith((".pkl", ".json")) and not any(p.startswith("checkpoint_") for p in parts)


def _stored_files(experiment: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the checked files of the stored experiment."""
    import hashlib

    import pyarrow.fs as pafs

    fs, root = _fs(experiment)
    files = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        relpath = info.path[len(root) :].lstrip("/")
        if info.type == pafs.FileType.File and _checked(relpath):
            with fs.open_input_stream(info.path) as handle:
                files[relpath] = hashlib.sha256(handle.readall()).hexdigest()
    return files


def _manifest_payload(experiment: str, files: dict[str, list[str]]) -> dict[str, Any]:
    return {"experiment": experiment.rstrip("/"), "files": files}


def _read_manifest(experiment: str, key: bytes) -> dict[str, list[str]] | None:
    """The signed hashes of ``experiment``, None when the manifest is missing or does not verify."""
    from airflow_mlops.ml.signing import verify

    fs, root = _fs(experiment)
    path = f"{root.rstrip('/')}.manifest.json"
    try:
        with fs.open_input_stream(path) as handle:
            manifest = json.loads(handle.readall())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not verify(
        key, _manifest_payload(experiment, files), manifest.get("hmac")
    ):
        return None
    return files


def _write_manifest(experiment: str, key: bytes, files: dict[str, list[str]]) -> None:
    from airflow_mlops.ml.signing import sign

    fs, root = _fs(experiment)
    path = f"{root.rstrip('/')}.manifest.json"
    body = {"files": files, "hmac": sign(key, _manifest_payload(experiment, files))}
    temporary = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(temporary) as handle:
        handle.write(json.dumps(body, sort_keys=True).encode())
    fs.move(temporary, path)


def sign_staged_state(experiment: str, staging: str) -> None:
    """Add the sha256 of every checked file Tune staged in ``staging`` (the driver's private folder it
    syncs to ``experiment``) to the signed manifest; called right after each of Tune's snapshots."""
    import hashlib

    signer = _SIGNERS.get(experiment.rstrip("/"))
    if signer is None or not os.path.isdir(staging):
        return
    signer["staging"] = staging
    seen: dict[str, tuple[int, int]] = signer["seen"]
    changed = False
    for folder, _, names in os.walk(staging):
        for name in names:
            full = os.path.join(folder, name)
            relpath = os.path.relpath(full, staging).replace(os.sep, "/")
            if not _checked(relpath) or relpath.startswith("tmp-") or "/tmp-" in relpath:
                continue
            try:
                stat = os.stat(full)
                if seen.get(relpath) == (stat.st_size, stat.st_mtime_ns):
                    continue
                with open(full, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
            except OSError:
                continue  # replaced while we looked: the next snapshot signs it
            seen[relpath] = (stat.st_size, stat.st_mtime_ns)
            known = signer["files"].setdefault(relpath, [])
            if digest not in known:
                known.append(digest)
                del known[:-8]  # the storage copy may lag the staged file by a snapshot or two
                changed = True
    if changed:
        _write_manifest(experiment, signer["key"], signer["files"])


def sign_tuner_file(experiment: str) -> None:
    """Sign ``tuner.pkl``, which Tune writes straight to storage (not through the staging folder) when a
    new ``Tuner`` is built, in this process, just before this is called."""
    import hashlib

    signer = _SIGNERS.get(experiment.rstrip("/"))
    if signer is None:
        return
    fs, root = _fs(experiment)
    with fs.open_input_stream(f"{root.rstrip('/')}/tuner.pkl") as handle:
        digest = hashlib.sha256(handle.readall()).hexdigest()
    signer["files"]["tuner.pkl"] = [digest]
    _write_manifest(experiment, signer["key"], signer["files"])


def _signing_callback(experiment: str):
    """A Tune callback that signs the staged state after each snapshot (Tune snapshots inside ``step``,
    just before ``on_step_end``). It holds only the experiment's path: Tune pickles it into the state."""
    from ray import tune

    class SignState(tune.Callback):
        def __init__(self) -> None:
            self.experiment = experiment
            self.staging: str | None = None

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if self.staging is None:
                for trial in trials:
                    storage = getattr(trial, "storage", None)
                    if storage is not None:
                        self.staging = storage.experiment_driver_staging_path
                        break
            if self.staging:
                from airflow_mlops.ml import search

                search.sign_staged_state(self.experiment, self.staging)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.on_step_end(0, trials)

    return SignState()


def verified_state(experiment: str, key: bytes | None) -> bool:
    """Whether ``experiment`` holds state this search signed and can be resumed. State that does not
    verify (or any state, without a key) is moved aside, logged, so the search starts fresh."""
    from ray import tune

    if not tune.Tuner.can_restore(experiment):
        return False
    problem = None
    if key is None:
        problem = "no tune-state key is configured, so its origin cannot be checked"
    else:
        signed = _read_manifest(experiment, key)
        if signed is None:
            problem = f"its manifest {MANIFEST} is missing or its signature does not verify"
        else:
            stored = _stored_files(experiment)
            unsigned = sorted(p for p, digest in stored.items() if digest not in signed.get(p, []))
            if unsigned:
                problem = f"files {unsigned[:5]} differ from what this search wrote"
            else:
                _SIGNERS[experiment.rstrip("/")]["files"].update({p: list(v) for p, v in signed.items()})
    if problem is None:
        return True
    fs, root = _fs(experiment)
    aside = f"{root.rstrip('/')}.refused-{int(time.time())}"
    log.warning(
        "Not resuming the search from %s: %s. Tune would unpickle it, so it is moved to %s and the search "
        "starts fresh (completed trials run again).",
        experiment,
        problem,
        aside,
    )
    try:
        fs.move(root, aside)
    except OSError:
        fs.delete_dir(root)
    return False


# ------------------------------------------------------------------------------------------- search


def run_search(spec: SearchSpec, fn: Any, data: Any, state_key: bytes | None = None) -> dict[str, Any]:
    """Run (or resume) the search on the Ray that is initialised, write the outputs, return the result.

    :param state_key: the key signing the saved Tune state (default: ``MLOPS_TUNE_STATE_KEY``, hex); without
        one the state is never resumed.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from airflow_mlops.ml.search_space import to_tune

    # the legacy reporter prints nothing at verbose=0; the new one still prints a banner
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot the experiment state every 2 s (Tune's "auto" waits >= 10 s): a killed task then loses
    # at most the trials that ended in its last 2 s; a resumed search reruns only those.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    started_wall = time.time()
    started = time.monotonic()
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    wrapped = tune.with_resources(tune.with_parameters(fn, data=data), spec.resources_per_trial)
    space = to_tune(spec.search_space)
    if spec.seed is not None and "seed" not in space:
        space["seed"] = spec.seed
    storage = _local_or_uri(spec.storage_path)
    experiment = f"{storage.rstrip('/')}/{EXPERIMENT}"

    if state_key is None and os.environ.get(STATE_KEY_ENV):
        state_key = bytes.fromhex(os.environ[STATE_KEY_ENV])
    if state_key is not None:
        _SIGNERS[experiment.rstrip("/")] = {"key": state_key, "files": {}, "seen": {}}
    resumed = verified_state(experiment, state_key)
    # Tune's own storage access: through the artifact store's filesystem on an object store (see _fs)
    storage_fs, storage_root = _fs(storage) if "://" in storage else (None, storage)
    if resumed:
        log.info("Resuming the search from %s (a previous try was interrupted)", experiment)
        tuner = tune.Tuner.restore(
            f"{storage_root.rstrip('/')}/{EXPERIMENT}",
            trainable=wrapped,
            resume_unfinished=True,
            resume_errored=True,
            param_space=space,
            storage_filesystem=storage_fs,
        )
    else:
        tuner = tune.Tuner(
            wrapped,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=spec.num_samples,
                scheduler=_scheduler(check_scheduler(spec.scheduler)),
                # the limit goes to the generator: Tune ignores max_concurrent_trials next to a given
                # BasicVariantGenerator (it only wraps Searchers)
                search_alg=BasicVariantGenerator(
                    random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0
                ),
                time_budget_s=spec.time_budget_s,
                reuse_actors=spec.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=storage_root,
                storage_filesystem=storage_fs,
                verbose=0,
                callbacks=[
                    _progress_callback(spec.progress_interval, spec.metric, spec.mode),
                    _signing_callback(experiment),
                ],
                # a trial whose Ray worker died (killed, out of memory, node lost) runs once more
                # instead of ending the search one trial short; a trainable that raises fails twice
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
        sign_tuner_file(experiment)
    log.info(
        "Tuning %s on %d train / %d validation rows: %d samples, metric %s (%s)",
        spec.trainable,
        len(data.y_train),
        len(data.y_valid),
        spec.num_samples,
        spec.metric,
        spec.mode,
    )
    try:
        grid = tuner.fit()
        staging = _SIGNERS.get(experiment.rstrip("/"), {}).get("staging")
        if staging:  # Tune's final snapshot comes after its last step
            sign_staged_state(experiment, staging)
    finally:
        _SIGNERS.pop(experiment.rstrip("/"), None)
    return write_outputs(
        spec, grid, data, resumed=resumed, started_wall=started_wall, elapsed=time.monotonic() - started
    )


def _plain(value: Any) -> Any:
    """numpy scalars and tuples -> plain JSON values."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _trial_rows(spec: SearchSpec, grid: Any) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        values = (
            history[spec.metric].dropna().tolist()
            if history is not None and spec.metric in history.columns
            else []
        )
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = "stopped_early"
        best = (max(values) if spec.mode == "max" else min(values)) if values else None
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or os.path.basename(str(result.path)),
                "status": status,
                "metric": metrics.get(spec.metric),
                "best_metric": best,
                "iterations": metrics.get("iterations"),
                "best_iteration": metrics.get("best_iteration"),
                "reports": metrics.get("training_iteration"),
                "time_s": metrics.get("time_total_s"),
                "finished_at": metrics.get("timestamp"),
                "config": {k: _plain(v) for k, v in (result.config or {}).items()},
                "error": str(result.error).splitlines()[0][:300] if result.error is not None else None,
                "_result": result,
                "_history": history,
            }
        )
    return rows


def write_outputs(
    spec: SearchSpec, grid: Any, data: Any, *, resumed: bool, started_wall: float, elapsed: float
) -> dict[str, Any]:
    """trials.csv, trials.png, the best model with its sha256, result.json."""
    from airflow_mlops.artifacts import as_path

    rows = _trial_rows(spec, grid)
    if not rows:
        raise TuningError("the search ran no trial.", fix="check num_samples and time_budget_s.")
    errored = [r for r in rows if r["status"] == "error"]
    scored = [r for r in rows if r["status"] != "error" and r["metric"] is not None]
    if not scored:
        first = errored[0]["error"] if errored else "no trial reported the metric"
        raise TuningError(
            f"every trial of the search failed; the first error: {first}",
            fix=f"read the trial's error file under {spec.storage_path} and fix the trainable or search space.",
        )
    sign = 1 if spec.mode == "max" else -1
    completed = [r for r in scored if r["status"] == "completed"] or scored
    best = max(completed, key=lambda r: sign * r["metric"])

    out = as_path(spec.output_uri)
    trials = _write_trials_csv(out / "trials.csv", spec, rows, best)
    plot = _write_plot(out / "trials.png", spec, rows, best)
    model = _write_model(out / "model", best, spec)
    resumed_done = sum(
        1 for r in rows if r["status"] != "error" and r["finished_at"] and r["finished_at"] < started_wall
    )
    result = {
        "best_config": best["config"],
        "best_metric": best["metric"],
        "best_trial_id": best["trial_id"],
        "metric": spec.metric,
        "mode": spec.mode,
        "task": data.task,
        "classes": list(data.classes),
        "trainable": spec.trainable,
        **model,
        "trials_uri": trials,
        "plot_uri": plot,
        "counts": {
            "trials": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows),
            "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
            "errored": len(errored),
            "finished_before_resume": resumed_done,
        },
        "resumed": resumed,
        "training_set": data.summary(),
        "tune_storage": spec.storage_path,
        "elapsed_s": round(elapsed, 2),
    }
    result["result_uri"] = str(out / "result.json")
    _write_bytes(out / "result.json", json.dumps(result, indent=2, sort_keys=True, default=str).encode())
    log.info(
        "Best trial %s: %s=%.5f with %s; %d trials (%d completed, %d stopped early, %d errored)",
        best["trial_id"],
        spec.metric,
        best["metric"],
        best["config"],
        len(rows),
        result["counts"]["completed"],
        result["counts"]["stopped_early"],
        len(errored),
    )
    return result


def _write_bytes(target: Any, data: bytes) -> None:
    from airflow_mlops.artifacts import staged

    with staged(target) as tmp:
        tmp.write_bytes(data)


def _write_trials_csv(target: Any, spec: SearchSpec, rows: list[dict], best: dict) -> str:
    import csv
    import io

    keys = sorted({k for r in rows for k in r["config"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "trial_id",
            "status",
            "best",
            "metric",
            "mode",
            spec.metric,
            f"best_{spec.metric}",
            "iterations",
            "best_iteration",
            "reports",
            "time_s",
            "finished_at",
            *(f"config.{k}" for k in keys),
            "error",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r["trial_id"],
                r["status"],
                int(r is best),
                spec.metric,
                spec.mode,
                r["metric"],
                r["best_metric"],
                r["iterations"],
                r["best_iteration"],
                r["reports"],
                r["time_s"],
                r["finished_at"],
                *(
                    json.dumps(r["config"].get(k))
                    if isinstance(r["config"].get(k), list | dict)
                    else r["config"].get(k)
                    for k in keys
                ),
                r["error"],
            ]
        )
    _write_bytes(target, buffer.getvalue().encode())
    return str(target)


def _write_plot(target: Any, spec: SearchSpec, rows: list[dict], best: dict) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in rows:
        history = r["_history"]
        if history is None or spec.metric not in history.columns or "time_total_s" not in history.columns:
            continue
        style = {"completed": "-", "stopped_early": ":", "error": "--"}[r["status"]]
        ax.plot(
            history["time_total_s"],
            history[spec.metric],
            style,
            marker=".",
            linewidth=2.5 if r is best else 1.0,
            alpha=1.0 if r is best else 0.6,
            label=f"{r['trial_id']} (best)" if r is best else None,
        )
    ax.set_xlabel("trial time (s)")
    ax.set_ylabel(f"validation {spec.metric}")
    ax.set_title(f"{spec.trainable.rsplit('.', 1)[-1]}: {len(rows)} trials (dotted: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    _write_bytes(target, buffer.getvalue())
    return str(target)


def _write_model(folder: Any, best: dict, spec: SearchSpec) -> dict[str, Any]:
    """Copy the best trial's model out of its checkpoint, with ``<file>.sha256`` and ``model.json``."""
    import hashlib

    result = best["_result"]
    checkpoint = result.checkpoint
    if checkpoint is None:
        log.warning("Best trial %s saved no model (its trainable writes no checkpoint)", best["trial_id"])
        return {"model_uri": None, "model_sha256": None, "model_format": None, "model_meta_uri": None}
    with checkpoint.as_directory() as local:
        meta = json.loads(open(os.path.join(local, "model.json"), "rb").read())
        blob = open(os.path.join(local, meta["model_file"]), "rb").read()
    digest = hashlib.sha256(blob).hexdigest()
    model = folder / meta["model_file"]
    _write_bytes(model, blob)
    _write_bytes(folder / f"{meta['model_file']}.sha256", f"{digest}  {meta['model_file']}\n".encode())
    meta = {
        **meta,
        "sha256": digest,
        "trial_id": best["trial_id"],
        "metric": best["metric"],
        "metric_name": spec.metric,
        "metric_mode": spec.mode,
    }
    _write_bytes(folder / "model.json", json.dumps(meta, indent=2, default=str).encode())
    return {
        "model_uri": str(model),
        "model_sha256": digest,
        "model_format": meta["format"],
        "model_meta_uri": str(folder / "model.json"),
    }


# ---------------------------------------------------------------------------------------- Ray Job entry


def main(argv: list[str] | None = None) -> int:
    """Entry point of the Ray Job: ``python -m airflow_mlops.ml.search <spec-uri>``."""
    import ray

    from airflow_mlops.artifacts import as_path

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    spec = SearchSpec.from_json(as_path(argv[0]).read_bytes())
    try:
        fn, data = prepare(spec)
    except (MLOpsArgumentError, MLOpsInputError) as err:
        log.error("%s", err)
        return 2
    ray.init(log_to_driver=False, logging_level=logging.WARNING)
    result = run_search(spec, fn, data)
    print("@@result " + result["result_uri"], flush=True)
    return 0


if __name__ == "__main__":
    # run as the importable module, not as __main__: the Tune callbacks reach this module's state by name
    sys.exit(importlib.import_module("airflow_mlops.ml.search").main())
