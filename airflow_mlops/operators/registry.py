"""Model registry operators: register a tuned model with its signature, gate its promotion on a
holdout, roll back.

All three work on the registry kept by :class:`~airflow_mlops.hooks.bentoml.BentoMLHook` and return
small JSON-able dicts. Registration records the model's task, classes and signature
(:mod:`airflow_mlops.ml.signature`: entity keys, request features with their types and allowed values,
the feature service) so the model-agnostic service can describe its requests. Promotion never puts a
worse model in front of users: the candidate and the current production model are scored with the task's
metric (:mod:`airflow_mlops.ml.metrics`) on the same holdout, later in time than either model's training
data, and the decision with both scores is recorded in the registry.

With human approval (:class:`ModelApprovalOperator`) a candidate that passed the gate waits with stage
``pending_approval`` until someone approves it (production) or rejects it (``rejected``) in Airflow's
human-in-the-loop "Required actions". :class:`ModelActionOperator` promotes a named version or rolls back
by hand (the lifecycle's operate DAG). Every decision is appended to the registry history; those taken by
a person carry their name as ``user`` (None for the gate's own decisions).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseOperator

from airflow_mlops.artifacts import as_path, reaching, sha256_of
from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.ml.metrics import METRICS

if TYPE_CHECKING:
    from airflow.sdk import Context

#: direction each built-in metric improves in (True: higher is better); kept for older imports, the
#: source is :data:`airflow_mlops.ml.metrics.METRICS`
HIGHER_IS_BETTER = {name: metric.higher_is_better for name, metric in METRICS.items()}
#: the floor a candidate must clear when ``floor`` is not given: chance level where the metric has one
DEFAULT_FLOOR: dict[str, float] = {"auc": 0.5}
#: how a candidate that passed the gate reaches production: at once, or after a person approves it
APPROVALS = ("automatic", "manual")
#: the stage (and history action) of a candidate that passed the gate and awaits a person's approval
PENDING_APPROVAL = "pending_approval"
#: what ``ModelApprovalOperator(on_timeout=...)`` does to a candidate nobody answered for, as the docs say it
TIMEOUT_ANSWERS = {"reject": "rejected", "approve": "approved"}
#: the history actions that put a version in production (a rollback goes back to their previous_production)
PROMOTING_ACTIONS = ("promote", "approve")


def _read_manifest_or_parquet(uri: str) -> tuple[dict[str, Any], Any]:
    """(manifest, DataFrame) for a training-set manifest JSON or a plain parquet file."""
    import pandas as pd

    path = as_path(uri)
    if not path.exists():
        raise MLOpsInputError(
            f"data set {uri!r} does not exist.", fix="pass the URI a previous task returned."
        )
    manifest: dict[str, Any] = {}
    if path.name.endswith(".json"):
        manifest = json.loads(path.read_bytes())
        path = as_path(manifest["data_uri"])
    with path.open("rb") as handle:
        frame = pd.read_parquet(handle)
    return manifest, frame


def _time_column(manifest: dict[str, Any], frame: Any) -> str | None:
    for name in (
        manifest.get("event_timestamp_column"),
        "event_timestamp",
        "sched_dep_time_utc",
        "time_hour",
    ):
        if name and name in frame.columns:
            return name
    return None


class _RegistryOperator(BaseOperator):
    ui_color = "#f0e4d8"

    def __init__(self, *, model_name: str, bentoml_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.bentoml_conn_id = bentoml_conn_id

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)


class RegisterModelOperator(_RegistryOperator):
    """Register a tuned model as ``<model_name>:<version>`` with stage ``candidate``, with its signature.

    The registry record carries ``task``, ``label``, ``classes``, ``metrics`` (named by metric),
    ``metric`` / ``metric_mode`` (the metric the model was tuned for) and ``signature``
    (:class:`~airflow_mlops.ml.signature.ModelSignature` as JSON): the model's features, the feature
    service's entity join keys and the features it provides, and every other feature as a request
    feature with its type and allowed values or range from the training snapshot. Everything is computed
    before anything is written: a registration that cannot record a signature registers nothing.

    :param model_name: registry name, e.g. ``churn`` (templated).
    :param model_uri: the model folder (model file + ``model.json``) or its model file, as returned by
        ``RayTuneOperator`` (templated).
    :param metrics: validation metrics to record, e.g. ``{"auc": <the tuning result's best_metric>}``;
        default the metric the model was tuned for, from its ``model.json`` (templated).
    :param hyperparameters: the configuration the model was trained with (templated).
    :param training_manifest_uri: manifest of the training set; its sha256 and time range are recorded and
        the signature is inferred from its data file. Required unless ``signature`` is given (templated).
    :param feature_service: Feast feature service the model reads at serving time; its entity keys become
        the request's keys and the features it provides are not asked of the client (templated).
    :param feast_repo_path: Feast repository folder, to resolve ``feature_service`` (templated).
    :param feast_conn_id: ``feast`` connection (optional for the default id).
    :param signature: an explicit signature (a ``ModelSignature`` dict) instead of one inferred from the
        training snapshot (templated).
    """

    template_fields: Sequence[str] = (
        "model_name",
        "model_uri",
        "metrics",
        "hyperparameters",
        "training_manifest_uri",
        "feature_service",
        "feast_repo_path",
        "signature",
    )

    def __init__(
        self,
        *,
        model_uri: str,
        metrics: dict[str, Any] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        training_manifest_uri: str | None = None,
        feature_service: str | None = None,
        feast_repo_path: str | None = None,
        feast_conn_id: str | None = FeastHook.default_conn_name,
        signature: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.metrics = metrics
        self.hyperparameters = hyperparameters
        self.training_manifest_uri = training_manifest_uri
        self.feature_service = feature_service
        self.feast_repo_path = feast_repo_path
        self.feast_conn_id = feast_conn_id
        self.signature = signature

    @cached_property
    def feast_hook(self) -> FeastHook:
        return FeastHook(feast_conn_id=self.feast_conn_id, repo_path=self.feast_repo_path or None)

    def execute(self, context: Context) -> dict[str, Any]:
        source = as_path(self.model_uri)
        with reaching(source):
            if source.is_file() or not source.exists():
                source = source.parent
            if not (source / "model.json").exists():
                raise MLOpsInputError(
                    f"{self.model_uri!r} is not a model folder (no model.json beside the model file).",
                    fix="pass the model_uri returned by RayTuneOperator.",
                )
            try:
                description = json.loads((source / "model.json").read_bytes())
            except ValueError as err:
                raise MLOpsInputError(
                    f"model.json beside {self.model_uri!r} is not JSON ({err}).",
                    fix="pass the model_uri returned by RayTuneOperator.",
                ) from None
        metadata: dict[str, Any] = {
            **self._model_fields(description),
            "hyperparameters": self.hyperparameters or {},
            "feature_service": self.feature_service or None,
            "dag_run_id": context["run_id"],
            "dag_id": context["ti"].dag_id,
        }
        if self.training_manifest_uri:
            manifest_path = as_path(self.training_manifest_uri)
            with reaching(manifest_path):
                manifest = json.loads(manifest_path.read_bytes())
            metadata["training_manifest"] = {
                "uri": self.training_manifest_uri,
                "sha256": sha256_of(manifest_path),
                "data_sha256": manifest.get("sha256"),
                "time_range": manifest.get("time_range"),
                "rows": manifest.get("rows") or manifest.get("row_count"),
            }
        metadata["signature"] = self._signature(description, metadata)
        with tempfile.TemporaryDirectory(prefix="mlops-register-") as tmp:
            with reaching(source):
                for item in source.iterdir():
                    if item.is_file():
                        with item.open("rb") as src, (Path(tmp) / item.name).open("wb") as dst:
                            shutil.copyfileobj(src, dst)
            record = self.hook.register(self.model_name, Path(tmp), metadata)
        self.log.info(
            "Registered %s (stage %s): %s model, %d request fields",
            record["tag"],
            record["stage"],
            record.get("task"),
            len((record.get("signature") or {}).get("entity_keys", []))
            + len((record.get("signature") or {}).get("request_features", [])),
        )
        return {
            **{k: record[k] for k in ("tag", "version", "stage", "export_uri", "files_sha256")},
            "task": record.get("task"),
            "classes": record.get("classes", []),
        }

    def _model_fields(self, description: dict[str, Any]) -> dict[str, Any]:
        """task, label, classes and the metrics from the model's description and ``metrics``."""
        from airflow_mlops.ml.metrics import normalize_task

        task = normalize_task(str(description.get("task") or "binary"))
        classes = list(description.get("classes") or ([0, 1] if task == "binary" else []))
        tuned_for, mode = description.get("metric_name"), description.get("metric_mode")
        metrics = {str(k): v for k, v in (self.metrics or {}).items() if k not in (None, "None", "")}
        unnamed = [v for k, v in (self.metrics or {}).items() if k in (None, "None", "")]
        if tuned_for and unnamed:  # {tune.metric: best_metric} with the metric left to its default
            metrics.setdefault(tuned_for, unnamed[0])
        if not metrics and tuned_for and description.get("metric") is not None:
            metrics[tuned_for] = description["metric"]
        for name, value in list(metrics.items()):
            try:
                metrics[name] = float(value)
            except (TypeError, ValueError):
                raise MLOpsInputError(
                    f"metrics[{name!r}] is {value!r}, not a number.",
                    fix="pass the tuning result's best_metric, e.g. metrics={'auc': tune.output['best_metric']}.",
                ) from None
        return {
            "task": task,
            "label": description.get("label"),
            "classes": classes,
            "metrics": metrics,
            "metric": tuned_for or (next(iter(metrics)) if metrics else None),
            "metric_mode": mode or (METRICS[tuned_for].mode if tuned_for in METRICS else None),
        }

    def _signature(self, description: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        """The model's signature as JSON: the one given, or inferred from the training snapshot.

        :raises MLOpsInputError: no training snapshot and no signature given, or a snapshot that lacks
            the request fields.
        """
        from airflow_mlops.ml.dataset import read_frame, resolve_source
        from airflow_mlops.ml.signature import ModelSignature, SignatureError, infer_signature

        if self.signature:
            raw = self.signature if isinstance(self.signature, dict) else json.loads(str(self.signature))
            try:
                signature = ModelSignature.model_validate(raw)
            except Exception as err:
                raise SignatureError(
                    f"signature= is not a valid model signature ({err}).",
                    fix="pass ModelSignature(...).model_dump(mode='json'), or leave signature unset and "
                    "pass training_manifest_uri.",
                ) from None
            if signature.task != metadata["task"]:
                raise SignatureError(
                    f"signature= says task {signature.task!r}, but the model's model.json says "
                    f"{metadata['task']!r}.",
                    fix="correct the signature's task.",
                )
            return signature.model_dump(mode="json")
        if not self.training_manifest_uri:
            raise SignatureError(
                f"training_manifest_uri is not set, so the signature of {self.model_name!r} (its request "
                "fields, their types and allowed values) cannot be recorded; a model without one cannot be "
                "served.",
                fix="pass training_manifest_uri= (the manifest_uri of the training-set task), or an explicit "
                "signature= dict.",
            )
        source = resolve_source(self.training_manifest_uri)
        frame = read_frame(source)
        features = list(description.get("features") or [])
        keys: list[str] = []
        provided: list[str] = []
        if self.feature_service:
            keys, columns = self.feast_hook.service_columns(self.feature_service)
            provided = [f for f in features if f in columns and f not in keys]
        signature = infer_signature(
            frame,
            task=metadata["task"],
            label=str(metadata["label"] or source.label or ""),
            classes=metadata["classes"],
            features=features,
            entity_keys=keys,
            store_features=provided,
            feature_service=self.feature_service or None,
        )
        return signature.model_dump(mode="json")


class PromoteModelOperator(_RegistryOperator):
    """Promote a candidate only if it beats production on the same later-in-time holdout.

    Both models are scored with ``metric`` (default: the candidate's task's default metric, ``auc`` /
    ``macro_f1`` / ``rmse``), in the metric's own direction (:data:`airflow_mlops.ml.metrics.METRICS`).
    The candidate must clear ``floor`` and beat the production model's score by at least
    ``min_improvement``; with no production model the floor alone decides. The previous production
    model becomes ``archived`` (kept for rollback); a refused candidate becomes ``rejected``. The decision
    records the metric, its mode and both scores.

    :param model_name: registry name (templated).
    :param candidate_version: version returned by ``RegisterModelOperator`` (templated).
    :param holdout_uri: training-set manifest or parquet of the holdout, with the label column (templated).
    :param metric: a metric that fits the candidate's task: ``auc``, ``accuracy``, ``macro_f1``,
        ``logloss`` (classification), ``rmse``, ``mae``, ``r2`` (regression); default the task's.
    :param min_improvement: required margin over production (>= 0), in the metric's units.
    :param floor: score the candidate must reach (at least for higher-is-better metrics, at most for
        losses); default 0.5 for ``auc`` (chance), none for the others.
    :param approval: ``automatic`` (default): a candidate that passes goes to production at once;
        ``manual``: it gets stage ``pending_approval`` and the decision is recorded as
        ``pending_approval``, production is left as it is until :class:`ModelApprovalOperator` records a
        person's answer. The return value's ``pending_approval`` says which happened.
    """

    template_fields: Sequence[str] = ("model_name", "candidate_version", "holdout_uri")

    def __init__(
        self,
        *,
        candidate_version: str,
        holdout_uri: str,
        metric: str | None = None,
        min_improvement: float = 0.0,
        floor: float | None = None,
        approval: str = "automatic",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if approval not in APPROVALS:
            raise MLOpsArgumentError(
                f"approval must be one of {', '.join(APPROVALS)}, got {approval!r}.",
                fix="write approval='manual' to have a person approve each promotion, else leave it out.",
            )
        if metric is not None and metric not in METRICS:
            raise MLOpsArgumentError(
                f"metric {metric!r} is not a known metric.",
                fix=f"use one of {', '.join(METRICS)}, or leave it unset for the task's default.",
            )
        if not min_improvement >= 0:
            raise MLOpsArgumentError(
                f"min_improvement must be >= 0 (a negative margin would promote worse models), "
                f"got {min_improvement!r}."
            )
        self.candidate_version = candidate_version
        self.holdout_uri = holdout_uri
        self.metric = metric
        self.min_improvement = min_improvement
        self.floor = floor
        self.approval = approval

    def _score(self, version: str, frame: Any, label: str, metric: str) -> float:
        from airflow_mlops.ml.metrics import encode_labels, scores

        predictor = self.hook.load(self.model_name, version)
        labelled = frame[frame[label].notna()]
        if predictor.task == "regression":
            y = labelled[label].astype(float).to_numpy()
        else:
            y = encode_labels(labelled[label].tolist(), predictor.classes)
        prediction = predictor.predict(labelled)
        return scores(predictor.task, y, prediction, n_classes=len(predictor.classes) or None)[metric]

    def _task_of(self, record: dict[str, Any]) -> str:
        from airflow_mlops.ml.metrics import normalize_task

        task = record.get("task") or json.loads(
            (self.hook.model_dir(self.model_name, record["version"], record) / "model.json").read_text()
        ).get("task", "binary")
        return normalize_task(task)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_mlops.ml.metrics import DEFAULT_METRIC, check_metric
        from airflow_mlops.ml.promotion import decide

        manifest, frame = _read_manifest_or_parquet(self.holdout_uri)
        with self.hook.locked(self.model_name) as index:
            candidate = self.hook.version_record(index, self.candidate_version)
            production_version = self.hook.production_version(self.model_name, index)
            if production_version == self.candidate_version:
                self.log.info("%s is already in production; nothing to do", candidate["tag"])
                return {
                    "promoted": False,
                    "reason": "already in production",
                    "version": self.candidate_version,
                    "production_version": production_version,
                }
            task = self._task_of(candidate)
            metric = self.metric or DEFAULT_METRIC[task]
            spec = check_metric(metric, task, field="metric")
            production = index["versions"][production_version] if production_version else None
            if production is not None and self._task_of(production) != task:
                raise ModelRegistryError(
                    f"candidate {candidate['tag']} is a {task} model but production {production['tag']} is a "
                    f"{self._task_of(production)} model; their {metric} scores cannot be compared.",
                    fix="register the new model under a new model name, or roll it out by hand.",
                )
            label = manifest.get("label") or candidate.get("label") or self._label_of(candidate)
            if label not in frame.columns:
                raise MLOpsInputError(
                    f"holdout {self.holdout_uri!r} has no label column {label!r}.",
                    fix="build the holdout with the label the model was trained on.",
                )
            self._check_later_in_time(manifest, frame, [candidate] + ([production] if production else []))
            candidate_score = self._score(self.candidate_version, frame, label, metric)
            production_score = (
                self._score(production_version, frame, label, metric) if production_version else None
            )
            floor = self.floor if self.floor is not None else DEFAULT_FLOOR.get(metric)
            decision = decide(
                candidate_score,
                production_score,
                min_improvement=self.min_improvement,
                floor=floor,
                higher_is_better=spec.higher_is_better,
            )
            now = datetime.now(UTC).isoformat()
            pending = decision.promote and self.approval == "manual"
            if pending:
                candidate["stage"] = PENDING_APPROVAL
                action = PENDING_APPROVAL
            elif decision.promote:
                self.hook.put_in_production(index, self.candidate_version)
                action = "promote"
            else:
                candidate["stage"] = "rejected"
                action = "reject"
            entry = {
                "at": now,
                "action": action,
                "version": self.candidate_version,
                "previous_production": production_version,
                "metric": metric,
                "mode": spec.mode,
                "task": task,
                "holdout_uri": self.holdout_uri,
                "holdout_rows": len(frame),
                "dag_id": context["ti"].dag_id,
                "dag_run_id": context["run_id"],
                "user": None,
                **decision.to_dict(),
            }
            index["history"].append(entry)
            candidate.setdefault("decisions", []).append(entry)
        self.log.info(
            "%s %s on %s (%s): %s",
            "Passed the gate, awaiting approval:"
            if pending
            else "Promoted"
            if decision.promote
            else "Rejected",
            candidate["tag"],
            metric,
            spec.mode,
            decision.reason,
        )
        promoted = decision.promote and not pending
        return {
            "promoted": promoted,
            "pending_approval": pending,
            "reason": decision.reason,
            "version": self.candidate_version,
            "production_version": self.candidate_version if promoted else production_version,
            "candidate_score": candidate_score,
            "production_score": production_score,
            "metric": metric,
            "mode": spec.mode,
        }

    def _label_of(self, record: dict[str, Any]) -> str:
        return json.loads(
            (self.hook.model_dir(self.model_name, record["version"], record) / "model.json").read_text()
        ).get("label", "")

    def _check_later_in_time(
        self, manifest: dict[str, Any], frame: Any, records: list[dict[str, Any]]
    ) -> None:
        import pandas as pd

        column = _time_column(manifest, frame)
        if column is None:
            return
        holdout_start = pd.Timestamp(frame[column].min())
        for record in records:
            end = ((record.get("training_manifest") or {}).get("time_range") or {}).get("end")
            if end and holdout_start <= pd.Timestamp(end):
                raise ModelRegistryError(
                    f"holdout {self.holdout_uri!r} starts at {holdout_start}, not after the training data of "
                    f"{record['tag']} (ends {end}); scores on it would flatter that model.",
                    fix="build the holdout from a time window after every compared model's training data.",
                )


def model_page_url(model_name: str) -> str:
    """The model's page in Airflow's UI (the plugin's ``mlops-models`` page), under ``[api] base_url``:
    the plugin's :func:`~airflow_mlops.plugins.mlops_plugin.model_page_url`."""
    from airflow_mlops.plugins.mlops_plugin import model_page_url as page

    return page(model_name)


def previous_production(index: dict[str, Any], current: str | None) -> str | None:
    """The version that was in production before ``current`` (None when the history names none)."""
    return next(
        (
            h["previous_production"]
            for h in reversed(index["history"])
            if h.get("action") in PROMOTING_ACTIONS
            and h.get("version") == current
            and h.get("previous_production")
        ),
        None,
    )


def _metric_of(record: dict[str, Any] | None, metric: str | None) -> float | None:
    """The score ``record`` registered for ``metric`` (its validation score at tuning time), or None."""
    value = ((record or {}).get("metrics") or {}).get(metric) if metric else None
    return float(value) if isinstance(value, int | float) else None


class RollbackModelOperator(_RegistryOperator):
    """Put the previous production version back; the current one becomes ``archived``.

    :param model_name: registry name (templated).
    :param user: who asked for it, recorded as the decision's ``user`` (templated; e.g.
        ``{{ dag_run.triggering_user_name }}``); default none.
    """

    template_fields: Sequence[str] = ("model_name", "user")

    def __init__(self, *, user: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user = user

    def execute(self, context: Context) -> dict[str, Any]:
        with self.hook.locked(self.model_name) as index:
            current, previous = self._check_rollback(index)
            self._switch(index, previous, "rollback", context)
        self.log.info("Rolled %s back from %s to %s", self.model_name, current, previous)
        return {"production_version": previous, "rolled_back_from": current}

    def _check_rollback(self, index: dict[str, Any]) -> tuple[str, str]:
        """(current, previous) production versions; raises before anything changes when there is none."""
        current = self.hook.production_version(self.model_name, index)
        previous = previous_production(index, current)
        if not current or not previous:
            raise ModelRegistryError(
                f"model {self.model_name!r} has no previous production version to roll back to"
                + (
                    f" (the history names none before {current})." if current else " (none is in production)."
                ),
                fix="promote a second version before rolling back, or promote a named version instead.",
            )
        return current, previous

    def _switch(self, index: dict[str, Any], version: str, action: str, context: Context) -> dict[str, Any]:
        """Put ``version`` in production in ``index`` and record the decision with the user's name."""
        # refuse a tampered version before switching
        self.hook.model_dir(self.model_name, version, index["versions"][version])
        current = self.hook.production_version(self.model_name, index)
        records = index["versions"]
        metric = records[version].get("metric")
        self.hook.put_in_production(index, version)
        entry = {
            "at": datetime.now(UTC).isoformat(),
            "action": action,
            "version": version,
            "previous_production": current,
            "metric": metric,
            # hand decisions score nothing new: the versions' registered (validation) scores
            "candidate_score": _metric_of(records[version], metric),
            "production_score": _metric_of(records.get(current) if current else None, metric),
            "scores_from": "registration",
            "reason": f"{action} by hand" + (f" ({self.user})" if self.user else ""),
            "user": str(self.user) if self.user else None,
            "dag_id": context["ti"].dag_id,
            "dag_run_id": context["run_id"],
        }
        index["history"].append(entry)
        records[version].setdefault("decisions", []).append(entry)
        return entry


class ModelActionOperator(RollbackModelOperator):
    """Promote a named version, or roll back, by hand (the lifecycle's ``<prefix>_operate`` DAG).

    ``promote`` puts ``version`` in production (the one it replaces becomes ``archived``); ``rollback``
    puts the previous production version back (``version``, when given, must be the current production
    version). The decision is recorded with ``user``. Every check happens before anything changes: an
    unknown action or version, a ``rejected`` version, one ``pending_approval`` (answer its approval task
    instead), no previous version to roll back to. Promoting the version already in production changes
    nothing (a rerun after a failed deploy only deploys again).

    :param model_name: registry name (templated).
    :param action: ``promote`` or ``rollback`` (templated).
    :param version: the version to promote; empty for a rollback (templated).
    :param user: who asked for it, recorded as the decision's ``user`` (templated).
    """

    template_fields: Sequence[str] = ("model_name", "action", "version", "user")

    def __init__(self, *, action: str, version: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.action = action
        self.version = version

    def execute(self, context: Context) -> dict[str, Any]:
        action = str(self.action or "").strip()
        version = str(self.version or "").strip() or None
        if version in ("None", "null"):
            version = None
        if action not in ("promote", "rollback"):
            raise MLOpsArgumentError(
                f"action {action!r} is not one this DAG knows.",
                fix='trigger it with conf {"action": "promote", "version": "<version>"} or '
                '{"action": "rollback", "version": null}.',
            )
        with self.hook.locked(self.model_name) as index:
            current = self.hook.production_version(self.model_name, index)
            if action == "rollback":
                if version and version != current:
                    raise MLOpsArgumentError(
                        f"rollback of {self.model_name!r} names version {version!r}, which is not the "
                        f"production version ({current or 'none'}); a rollback goes back to the version "
                        "before production.",
                        fix='to put that version in production use {"action": "promote", "version": '
                        f'"{version}"}}, or leave version null.',
                    )
                _, target = self._check_rollback(index)
            else:
                target = self._check_promotable(index, version, current)
            if target == current:
                self.log.info("%s %s is already in production; nothing to change", self.model_name, target)
                return {
                    "action": action,
                    "production_version": current,
                    "previous_production": current,
                    "changed": False,
                }
            entry = self._switch(index, target, action, context)
        self.log.info(
            "%s: %s put %s in production (was %s), by %s",
            self.model_name,
            action,
            target,
            current,
            entry["user"] or "an unnamed user",
        )
        return {
            "action": action,
            "production_version": target,
            "previous_production": current,
            "changed": True,
        }

    def _check_promotable(self, index: dict[str, Any], version: str | None, current: str | None) -> str:
        if not version:
            raise MLOpsArgumentError(
                f"promote of {self.model_name!r} names no version.",
                fix='trigger it with conf {"action": "promote", "version": "<version>"} (the model page lists '
                "the versions).",
            )
        if version not in index["versions"]:
            known = ", ".join(sorted(index["versions"])) or "none"
            raise MLOpsArgumentError(
                f"model {self.model_name!r} has no version {version!r} (known: {known}).",
                fix="name a registered version.",
            )
        stage = index["versions"][version].get("stage")
        if stage == "rejected":
            raise MLOpsArgumentError(
                f"version {version!r} of {self.model_name!r} was rejected "
                f"({self._last_reason(index, version)}); it is not put in production by hand.",
                fix="retrain to get a better candidate, or promote another version.",
            )
        if stage == PENDING_APPROVAL:
            raise MLOpsArgumentError(
                f"version {version!r} of {self.model_name!r} awaits approval in its train run "
                f"({self._last_run(index, version)}).",
                fix="approve or reject it there (Airflow's Required actions, or the model page).",
            )
        return version

    @staticmethod
    def _last_reason(index: dict[str, Any], version: str) -> str:
        for entry in reversed(index["history"]):
            if entry.get("version") == version and entry.get("action") == "reject":
                return ("by " + entry["user"] + ": " if entry.get("user") else "") + str(entry.get("reason"))
        return "no reason recorded"

    @staticmethod
    def _last_run(index: dict[str, Any], version: str) -> str:
        for entry in reversed(index["history"]):
            if entry.get("version") == version and entry.get("action") == PENDING_APPROVAL:
                return f"{entry.get('dag_id')} / {entry.get('dag_run_id')}"
        return "run unknown"


class ModelApprovalOperator(ApprovalOperator):
    """Wait for a person to approve or reject the candidate that passed the promotion gate.

    Place it after ``PromoteModelOperator(approval="manual")``, before the tasks that serve production.
    When the gate left a candidate ``pending_approval``, the task asks in Airflow's human-in-the-loop
    ("Required actions", or ``PATCH api/v2/dags/<dag>/dagRuns/<run>/taskInstances/<task>/-1/hitlDetails``
    with ``{"chosen_options": ["Approve"]}``) and waits in Airflow 3.3's ``awaiting_input`` state: no
    worker slot and no triggerer are held. The answer is recorded in the registry with the responder's name
    (``user``) and the gate's scores:

    - ``Approve``: the candidate goes to production (the one it replaces becomes ``archived``); the
      downstream tasks (drift baseline, build, deploy) run.
    - ``Reject``: the candidate becomes ``rejected`` (it will not be put in production by hand either);
      the downstream tasks are skipped, so nothing is deployed.
    - no answer within ``response_timeout``: ``on_timeout``'s answer is taken and recorded with
      ``user`` None and ``timed_out`` True.

    While it waits, the version's registry record carries ``approval_request`` (``dag_id``, ``run_id``,
    ``task_id``, ``map_index``: where to answer). When the gate refused the candidate (or it was already
    production) nothing waits: the task returns at once and the run goes on as with automatic promotion.

    :param model_name: registry name (templated).
    :param promotion: the promote task's result (``promote.output``; templated).
    :param response_timeout: how long to wait for an answer; default for ever.
    :param on_timeout: ``reject`` (default) or ``approve``: the answer taken when the timeout passes.
    :param bentoml_conn_id: ``bentoml`` connection of the registry (optional for the default id).
    """

    template_fields: Sequence[str] = ("subject", "body", "model_name", "promotion")
    ui_color = "#f0e4d8"

    def __init__(
        self,
        *,
        model_name: str,
        promotion: Any,
        response_timeout: timedelta | None = None,
        on_timeout: str = "reject",
        bentoml_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if on_timeout not in TIMEOUT_ANSWERS:
            raise MLOpsArgumentError(
                f"on_timeout must be 'reject' or 'approve', got {on_timeout!r}.",
                fix="leave it out to reject a candidate nobody answered for.",
            )
        kwargs.setdefault("subject", f"Put a new {model_name} version in production?")
        super().__init__(
            response_timeout=response_timeout,
            defaults=[on_timeout.capitalize()] if response_timeout else None,
            **kwargs,
        )
        self.model_name = model_name
        self.promotion = promotion
        self.on_timeout = on_timeout
        self.bentoml_conn_id = bentoml_conn_id

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook(bentoml_conn_id=self.bentoml_conn_id)

    def _promotion(self) -> dict[str, Any]:
        promotion = self.promotion
        if isinstance(promotion, str):
            promotion = json.loads(promotion) if promotion.strip() else {}
        return dict(promotion or {})

    def execute(self, context: Context) -> Any:
        promotion = self._promotion()
        version = promotion.get("version")
        if not promotion.get("pending_approval"):
            self.log.info(
                "Nothing awaits approval (%s %s: %s); going on without asking",
                self.model_name,
                version,
                promotion.get("reason"),
            )
            return {"approved": None, "version": version, "reason": "nothing awaits approval"}
        self.subject = f"Put {self.model_name} {version} in production?"
        self.body = self._body(promotion)
        ti = context["ti"]
        with self.hook.locked(self.model_name) as index:
            record = self.hook.version_record(index, str(version))
            if record.get("stage") == PENDING_APPROVAL:
                # where the question waits: the model page answers it through Airflow's REST API
                record["approval_request"] = {
                    "dag_id": ti.dag_id,
                    "run_id": context["run_id"],
                    "task_id": ti.task_id,
                    "map_index": getattr(ti, "map_index", -1),
                }
        self.log.info("Candidate %s %s awaits approval: %s", self.model_name, version, self.subject)
        return super().execute(context)

    def _body(self, promotion: dict[str, Any]) -> str:
        metric = promotion.get("metric")
        production = promotion.get("production_version")
        score = promotion.get("production_score")
        lines = [
            f"The candidate **{promotion.get('version')}** of **{self.model_name}** passed the promotion gate "
            f"on the holdout: {promotion.get('reason')}.",
            "",
            "| | version | " + str(metric) + " |",
            "|---|---|---|",
            f"| candidate | {promotion.get('version')} | {promotion.get('candidate_score')} |",
            f"| production | {production or 'none'} | {score if score is not None else ''} |",
            "",
            "**Approve** puts it in production and deploys it; **Reject** archives it as `rejected` and "
            "deploys nothing.",
        ]
        if self.response_timeout:
            lines.append(
                f"Without an answer within {self.response_timeout}, it is {TIMEOUT_ANSWERS[self.on_timeout]}."
            )
        lines.append(f"\n[Model page]({model_page_url(self.model_name)})")
        return "\n".join(lines)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if "error" in event:
            return super().execute_complete(context=context, event=event)  # raises HITLTimeoutError etc.
        chosen = (event.get("chosen_options") or [None])[0]
        self.validate_chosen_options([chosen] if chosen else [])
        responder = event.get("responded_by_user") or {}
        user = responder.get("name") if isinstance(responder, dict) else getattr(responder, "name", None)
        timed_out = bool(event.get("timedout"))
        entry = self._record(context, approve=chosen == self.APPROVE, user=user, timed_out=timed_out)
        result = super().execute_complete(context=context, event=event)
        return {**dict(result or {}), "approved": chosen == self.APPROVE, "decision": entry}

    def _record(
        self, context: Context, *, approve: bool, user: str | None, timed_out: bool
    ) -> dict[str, Any]:
        """Record the answer in the registry (production on approve, ``rejected`` on reject)."""
        promotion = self._promotion()
        version = str(promotion["version"])
        who = f"by {user}" if user else "by nobody"
        if timed_out:
            reason = (
                f"no answer within {self.response_timeout}: {TIMEOUT_ANSWERS[self.on_timeout]} by default"
            )
        else:
            reason = ("approved " if approve else "rejected ") + who
        with self.hook.locked(self.model_name) as index:
            record = self.hook.version_record(index, version)
            if record.get("stage") != PENDING_APPROVAL:
                raise ModelRegistryError(
                    f"{self.model_name} {version} no longer awaits approval (stage {record.get('stage')!r}); "
                    "its stage changed while this task waited.",
                    fix="look at the model's history; promote or roll back with the operate DAG.",
                )
            current = self.hook.production_version(self.model_name, index)
            record.pop("approval_request", None)
            if approve:
                self.hook.model_dir(self.model_name, version, record)  # refuse a tampered version first
                self.hook.put_in_production(index, version)
            else:
                record["stage"] = "rejected"
            entry = {
                "at": datetime.now(UTC).isoformat(),
                "action": "approve" if approve else "reject",
                "version": version,
                "previous_production": current,
                "metric": promotion.get("metric"),
                "mode": promotion.get("mode"),
                "candidate_score": promotion.get("candidate_score"),
                "production_score": promotion.get("production_score"),
                # the production the gate compared with (production may have changed while waiting)
                "gate_production_version": promotion.get("production_version"),
                "reason": reason,
                "user": user,
                "timed_out": timed_out,
                "dag_id": context["ti"].dag_id,
                "dag_run_id": context["run_id"],
                "task_id": context["ti"].task_id,
            }
            index["history"].append(entry)
            record.setdefault("decisions", []).append(entry)
        self.log.info("%s %s: %s", self.model_name, version, reason)
        return entry
