"""Model registry operators: register a tuned model, gate its promotion on a holdout, roll back.

All three work on the registry kept by :class:`~airflow_mlops.hooks.bentoml.BentoMLHook` and return
small JSON-able dicts. Promotion never puts a worse model in front of users: the candidate and the
current production model are scored on the same holdout, later in time than either model's training
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

from airflow_mlops.artifacts import as_path, sha256_of
from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelRegistryError

if TYPE_CHECKING:
    from airflow.sdk import Context

#: direction each built-in metric improves in (True: higher is better)
HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "r2": True, "logloss": False, "rmse": False, "mae": False}


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
    """Register a tuned model as ``<model_name>:<version>`` with stage ``candidate``.

    :param model_name: registry name, e.g. ``churn`` (templated).
    :param model_uri: the model folder (model file + ``model.json``) or its model file, as returned by
        ``RayTuneOperator`` (templated).
    :param metrics: validation metrics to record, e.g. the tuning result's best metric (templated).
    :param hyperparameters: the configuration the model was trained with (templated).
    :param training_manifest_uri: manifest of the training set; its sha256 and time range are recorded
        (templated).
    :param feature_service: Feast feature service the model reads at serving time (templated).
    """

    template_fields: Sequence[str] = (
        "model_name",
        "model_uri",
        "metrics",
        "hyperparameters",
        "training_manifest_uri",
        "feature_service",
    )

    def __init__(
        self,
        *,
        model_uri: str,
        metrics: dict[str, Any] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        training_manifest_uri: str | None = None,
        feature_service: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.metrics = metrics
        self.hyperparameters = hyperparameters
        self.training_manifest_uri = training_manifest_uri
        self.feature_service = feature_service

    def execute(self, context: Context) -> dict[str, Any]:
        source = as_path(self.model_uri)
        if source.is_file() or not source.exists():
            source = source.parent
        if not (source / "model.json").exists():
            raise MLOpsInputError(
                f"{self.model_uri!r} is not a model folder (no model.json beside the model file).",
                fix="pass the model_uri returned by RayTuneOperator.",
            )
        metadata: dict[str, Any] = {
            "metrics": self.metrics or {},
            "hyperparameters": self.hyperparameters or {},
            "feature_service": self.feature_service,
            "dag_run_id": context["run_id"],
            "dag_id": context["ti"].dag_id,
        }
        if self.training_manifest_uri:
            manifest_path = as_path(self.training_manifest_uri)
            manifest = json.loads(manifest_path.read_bytes())
            metadata["training_manifest"] = {
                "uri": self.training_manifest_uri,
                "sha256": sha256_of(manifest_path),
                "data_sha256": manifest.get("sha256"),
                "time_range": manifest.get("time_range"),
                "rows": manifest.get("rows") or manifest.get("row_count"),
            }
        with tempfile.TemporaryDirectory(prefix="mlops-register-") as tmp:
            for item in source.iterdir():
                if item.is_file():
                    with item.open("rb") as src, (Path(tmp) / item.name).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
            record = self.hook.register(self.model_name, Path(tmp), metadata)
        self.log.info("Registered %s (stage %s)", record["tag"], record["stage"])
        return {k: record[k] for k in ("tag", "version", "stage", "export_uri", "files_sha256")}


class PromoteModelOperator(_RegistryOperator):
    """Promote a candidate only if it beats production on the same later-in-time holdout.

    The candidate must clear ``floor`` and beat the production model's score by at least
    ``min_improvement``; with no production model the floor alone decides. The previous production
    model becomes ``archived`` (kept for rollback); a refused candidate becomes ``rejected``.

    :param model_name: registry name (templated).
    :param candidate_version: version returned by ``RegisterModelOperator`` (templated).
    :param holdout_uri: training-set manifest or parquet of the holdout, with the label column (templated).
    :param metric: ``auc`` (default), ``accuracy``, ``logloss``, ``rmse``, ``mae`` or ``r2``.
    :param min_improvement: required margin over production (>= 0).
    :param floor: absolute score the candidate must reach.
    """

    template_fields: Sequence[str] = ("model_name", "candidate_version", "holdout_uri")

    def __init__(
        self,
        *,
        candidate_version: str,
        holdout_uri: str,
        metric: str = "auc",
        min_improvement: float = 0.0,
        floor: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"metric {metric!r} is not one of {sorted(HIGHER_IS_BETTER)}")
        if not min_improvement >= 0:
            raise ValueError(
                f"min_improvement must be >= 0 (a negative margin would promote worse models), "
                f"got {min_improvement!r}"
            )
        self.candidate_version = candidate_version
        self.holdout_uri = holdout_uri
        self.metric = metric
        self.min_improvement = min_improvement
        self.floor = floor

    def _score(self, version: str, frame: Any, label: str) -> float:
        from airflow_mlops.ml.trainables import scores

        predictor = self.hook.load(self.model_name, version)
        return scores(predictor.task, frame[label].to_numpy(), predictor.predict(frame))[self.metric]

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_mlops.ml.promotion import decide

        manifest, frame = _read_manifest_or_parquet(self.holdout_uri)
        with self.hook.locked(self.model_name) as index:
            candidate = self.hook.version_record(index, self.candidate_version)
            production_version = index["production"]
            if production_version == self.candidate_version:
                self.log.info("%s is already in production; nothing to do", candidate["tag"])
                return {
                    "promoted": False,
                    "reason": "already in production",
                    "version": self.candidate_version,
                    "production_version": production_version,
                }
            label = manifest.get("label") or candidate.get("label") or self._label_of(candidate)
            if label not in frame.columns:
                raise MLOpsInputError(
                    f"holdout {self.holdout_uri!r} has no label column {label!r}.",
                    fix="build the holdout with the label the model was trained on.",
                )
            self._check_later_in_time(
                manifest,
                frame,
                [candidate] + ([index["versions"][production_version]] if production_version else []),
            )
            candidate_score = self._score(self.candidate_version, frame, label)
            production_score = self._score(production_version, frame, label) if production_version else None
            decision = decide(
                candidate_score,
                production_score,
                min_improvement=self.min_improvement,
                floor=self.floor,
                higher_is_better=HIGHER_IS_BETTER[self.metric],
            )
            now = datetime.now(UTC).isoformat()
            if decision.promote:
                if production_version:
                    index["versions"][production_version]["stage"] = "archived"
                candidate["stage"] = "production"
                index["production"] = self.candidate_version
            else:
                candidate["stage"] = "rejected"
            entry = {
                "at": now,
                "action": "promote" if decision.promote else "reject",
                "version": self.candidate_version,
                "previous_production": production_version,
                "metric": self.metric,
                "holdout_uri": self.holdout_uri,
                "holdout_rows": len(frame),
                "dag_run_id": context["run_id"],
                **decision.to_dict(),
            }
            index["history"].append(entry)
            candidate.setdefault("decisions", []).append(entry)
        self.log.info(
            "%s %s: %s", "Promoted" if decision.promote else "Rejected", candidate["tag"], decision.reason
        )
        return {
            "promoted": decision.promote,
            "reason": decision.reason,
            "version": self.candidate_version,
            "production_version": self.candidate_version if decision.promote else production_version,
            "candidate_score": candidate_score,
            "production_score": production_score,
            "metric": self.metric,
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
            current = index["production"]
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
            index["versions"][current]["stage"] = "archived"
            index["versions"][previous]["stage"] = "production"
            index["production"] = previous
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
