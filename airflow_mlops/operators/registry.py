"""Model registry operators: register a tuned model with its signature, gate its promotion on a
holdout, roll back.

All three work on the registry kept by :class:`~airflow_mlops.hooks.bentoml.BentoMLHook` and return
small JSON-able dicts. Registration records the model's task, classes and signature
(:mod:`airflow_mlops.ml.signature`: entity keys, request features with their types and allowed values,
the feature service) so the model-agnostic service can describe its requests. Promotion never puts a
worse model in front of users: the candidate and the current production model are scored with the task's
metric (:mod:`airflow_mlops.ml.metrics`) on the same holdout, later in time than either model's training
data, and the decision with both scores is recorded in the registry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
            if decision.promote:
                self.hook.put_in_production(index, self.candidate_version)
            else:
                candidate["stage"] = "rejected"
            entry = {
                "at": now,
                "action": "promote" if decision.promote else "reject",
                "version": self.candidate_version,
                "previous_production": production_version,
                "metric": metric,
                "mode": spec.mode,
                "task": task,
                "holdout_uri": self.holdout_uri,
                "holdout_rows": len(frame),
                "dag_run_id": context["run_id"],
                **decision.to_dict(),
            }
            index["history"].append(entry)
            candidate.setdefault("decisions", []).append(entry)
        self.log.info(
            "%s %s on %s (%s): %s",
            "Promoted" if decision.promote else "Rejected",
            candidate["tag"],
            metric,
            spec.mode,
            decision.reason,
        )
        return {
            "promoted": decision.promote,
            "reason": decision.reason,
            "version": self.candidate_version,
            "production_version": self.candidate_version if decision.promote else production_version,
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


class RollbackModelOperator(_RegistryOperator):
    """Put the previous production version back; the current one becomes ``archived``.

    :param model_name: registry name (templated).
    """

    template_fields: Sequence[str] = ("model_name",)

    def execute(self, context: Context) -> dict[str, Any]:
        with self.hook.locked(self.model_name) as index:
            current = self.hook.production_version(self.model_name, index)
            previous = next(
                (
                    h["previous_production"]
                    for h in reversed(index["history"])
                    if h["action"] == "promote" and h["version"] == current and h["previous_production"]
                ),
                None,
            )
            if not current or not previous:
                raise ModelRegistryError(
                    f"model {self.model_name!r} has no previous production version to roll back to.",
                    fix="promote a second version before rolling back.",
                )
            self.hook.model_dir(self.model_name, previous)  # refuse a tampered version before switching
            self.hook.put_in_production(index, previous)
            index["history"].append(
                {
                    "at": datetime.now(UTC).isoformat(),
                    "action": "rollback",
                    "version": previous,
                    "previous_production": current,
                    "dag_run_id": context["run_id"],
                }
            )
        self.log.info("Rolled %s back from %s to %s", self.model_name, current, previous)
        return {"production_version": previous, "rolled_back_from": current}
