"""The lifecycle spec: one YAML file that describes a model's whole life, validated by pydantic.

A team writes the spec once; :func:`airflow_mlops.lifecycle.factory.lifecycle_dags` turns it into the
ingest, features, train and monitor DAGs. The spec names the model's ``task`` (binary, multiclass or
regression); its metrics (tuning, promotion, decay thresholds) default to the task's and must fit it
(:mod:`airflow_mlops.ml.metrics`). The field reference with examples is docs/lifecycle-spec.md.

Relative paths in the spec (expectation suite, feature repository) are taken relative to the spec file.
A spec that does not validate raises :class:`LifecycleSpecError`, which names the file, every wrong
field and what to write instead; raised while a DAG file is parsed, Airflow shows it as that file's
import error.
"""

from __future__ import annotations

import warnings
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.ml import metrics as ml_metrics

DOCS = "docs/lifecycle-spec.md"
_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_]*$"
_IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"


class LifecycleSpecError(MLOpsArgumentError):
    """A lifecycle spec file is missing, not YAML, or has fields that are wrong; the message names the
    file, each field at fault and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Section):
    """A task the spec adds to a DAG: an operator class (``operator``) or a plain function run as a
    Python task (``callable``), each given by import path, with keyword arguments (``args``)."""

    task_id: str = Field(pattern=_IDENTIFIER)
    operator: str | None = Field(default=None, pattern=_IMPORT_PATH)
    callable: str | None = Field(default=None, pattern=_IMPORT_PATH)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if (self.operator is None) == (self.callable is None):
            raise ValueError(
                "give exactly one of 'operator' (a BaseOperator class) or 'callable' (a function)"
            )
        return self


class Ingest(_Section):
    """Landed batches -> Great Expectations -> offline store."""

    cadence: Literal["daily", "weekly"] = "daily"
    landing_path: str = Field(
        min_length=1,
        description="where a batch lands, relative to [mlops] landing_root; templated with the data "
        "interval, e.g. 'orders/date={{ data_interval_start | ds }}/orders.parquet'",
    )
    table: str = Field(pattern=_IDENTIFIER)
    expectation_suite: str = Field(min_length=1)
    batch_timezone: str = "UTC"
    partition_column: str | None = Field(
        default=None,
        description="split each batch into daily 'date=YYYY-MM-DD' partitions by this timestamp column "
        "(local days in batch_timezone); without it the batch is one partition named by its first day",
    )
    wait_timeout_hours: float = Field(default=6, gt=0)
    max_active_runs: int = Field(default=4, ge=1)

    @field_validator("batch_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not an IANA time zone such as 'UTC' or 'America/New_York'"
            ) from None
        return value

    @property
    def batch_days(self) -> int:
        return 7 if self.cadence == "weekly" else 1


class Materialize(_Section):
    """One materialization task: feature views loaded into the online store."""

    task_id: str = Field(pattern=_IDENTIFIER)
    feature_views: list[str] = Field(min_length=1)
    start: str | None = Field(
        default=None,
        description="fixed ISO start (e.g. a snapshot's as-of time); default: the run's first day",
    )
    overlap_days: float = Field(default=0, ge=0)


class Features(_Section):
    """Feast: source tables prepared by steps, `feast apply`, materialization, the entity dataframe."""

    repo: str = Field(min_length=1, description="Feast repository folder, relative to the spec file")
    feature_service: str = Field(min_length=1)
    entity_table: str = Field(
        min_length=1, description="offline-store table (or path) of entity rows with label and event time"
    )
    label: str = Field(min_length=1)
    event_timestamp_column: str = "event_timestamp"
    available_after_hours: float = Field(
        default=0, ge=0, description="how long after a day ends its features are known (materialization end)"
    )
    steps: list[Step] = Field(default_factory=list)
    materialize: list[Materialize] = Field(min_length=1)


class Tuning(_Section):
    """Ray Tune: the trainable, its search space and the metric trials are ranked by."""

    trainable: str = Field(pattern=_IMPORT_PATH)
    search_space: dict[str, Any] = Field(min_length=1)
    metric: str | None = Field(
        default=None, description="a metric of the spec's task; default the task's (auc, macro_f1, rmse)"
    )
    mode: Literal["max", "min"] | None = Field(default=None, description="default: the metric's direction")
    features: list[str] | None = None
    num_samples: int = Field(default=8, ge=1)
    max_concurrent_trials: int = Field(default=2, ge=1)
    time_budget_s: float = Field(default=600, gt=0)
    scheduler: Literal["asha", "fifo"] | dict[str, Any] = "asha"
    resources_per_trial: dict[str, float] | None = None
    seed: int | None = 13
    time_column: str | None = None
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    ray_conn_id: str | None = None


class Train(_Section):
    """The training window and what starts a retraining."""

    train_start: date
    holdout_start: date
    holdout_end: date
    train_days: int = Field(default=90, ge=7)
    holdout_days: int = Field(default=14, ge=1)
    retrain_on: list[Literal["drift", "features"]] = Field(default_factory=lambda: ["drift"])
    tuning: Tuning

    @model_validator(mode="after")
    def _ordered(self) -> Train:
        if not self.train_start < self.holdout_start < self.holdout_end:
            raise ValueError("need train_start < holdout_start < holdout_end (the holdout follows training)")
        return self


class Promotion(_Section):
    """The gate a candidate passes to become production, scored on the holdout."""

    metric: str | None = Field(default=None, description="a metric of the spec's task; default the task's")
    min_improvement: float = Field(default=0.002, ge=0)
    floor: float | None = Field(
        default=None,
        description="score the candidate must reach (at most, for a metric where lower is better); "
        "default 0.5 for auc, 0 for r2, none for the other metrics",
    )
    approval: Literal["automatic", "manual"] = Field(
        default="automatic",
        description="manual: a candidate that passed the gate waits (stage pending_approval) for a human "
        "to approve or reject it in Airflow (human-in-the-loop) before it is put in production and deployed",
    )
    approval_timeout_hours: float | None = Field(
        default=None,
        gt=0,
        description="manual approval: hours to wait for an answer; then on_timeout decides (default: wait "
        "for ever)",
    )
    on_timeout: Literal["reject", "approve"] = Field(
        default="reject",
        description="manual approval: the answer taken when approval_timeout_hours pass without one",
    )

    @model_validator(mode="after")
    def _timeout_needs_manual(self) -> Promotion:
        if self.approval == "automatic" and self.approval_timeout_hours is not None:
            raise ValueError("approval_timeout_hours is set but approval is automatic (nothing waits)")
        return self


class CanaryGuardrails(_Section):
    """Thresholds a canary step is judged on (:mod:`airflow_mlops.ml.canary`)."""

    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="largest rise of the error rate over the old version's"
    )
    max_p99_ratio: float = Field(default=2.0, gt=0, description="largest p99 latency, new / old")
    max_prediction_shift: float = Field(
        default=0.2, ge=0, le=1, description="largest KS statistic between the versions' predictions"
    )
    min_requests: int = Field(default=0, ge=0, description="fewest requests the canary must get per step")


class ShadowGate(_Section):
    """Thresholds of the shadow report that gates a promotion (``ShadowReportOperator``)."""

    min_rows: int = Field(default=1, ge=1)
    min_label_agreement: float | None = Field(default=None, ge=0, le=1)
    max_mean_abs_diff: float | None = Field(default=None, ge=0)
    min_correlation: float | None = Field(default=None, ge=-1, le=1)


class Rollout(_Section):
    """How the train DAG puts a new production version behind the endpoint."""

    strategy: Literal["blue_green", "canary", "shadow"] = "blue_green"
    steps: list[float] = Field(
        default_factory=lambda: [10.0, 50.0, 100.0],
        description="canary: the new version's share of the traffic per step, in percent",
    )
    step_minutes: float = Field(default=5, gt=0, description="canary: minutes per step before it is judged")
    guardrails: CanaryGuardrails = Field(default_factory=CanaryGuardrails)
    shadow_minutes: float | None = Field(
        default=None,
        gt=0,
        description="shadow the new version this long, then gate on the shadow report before the rollout",
    )
    shadow_gate: ShadowGate = Field(default_factory=ShadowGate)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if (
            not steps
            or any(not 0 < w <= 100 for w in steps)
            or any(b <= a for a, b in zip(steps, steps[1:], strict=False))
            or steps[0] >= 100
        ):
            raise PydanticCustomError(
                "canary_steps",
                "{steps} are not increasing percentages in (0, 100] starting below 100",
                {"steps": steps},
            )
        return steps


class Serving(_Section):
    target: Literal["local", "none"] = "local"
    port: int = Field(default=3900, ge=1024, le=65535)
    workers: int = Field(default=1, ge=1)
    sample_rows: int = Field(default=20, ge=0, description="real rows sent to the endpoint after a deploy")
    rollout: Rollout = Field(default_factory=Rollout)
    endpoint: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="deploy onto this multi-model endpoint, shared with other lifecycles, instead of a "
        "server of the model's own (answers at /models/<model>/predict; no Bento is built)",
    )
    queue: str | None = Field(
        default=None,
        min_length=1,
        description="Airflow queue of the serving tasks (build, deploy, shadow, sample predictions): the "
        "Celery workers listening on it run the model servers; default Airflow's default queue",
    )

    @model_validator(mode="after")
    def _endpoint_rollout(self) -> Serving:
        rollout = self.rollout
        if self.endpoint and (rollout.strategy != "blue_green" or rollout.shadow_minutes):
            raise PydanticCustomError(
                "endpoint_rollout",
                "serving.endpoint {endpoint!r} puts the model onto a shared multi-model endpoint, which has no "
                "canary or shadow rollout; remove serving.rollout, or serving.endpoint to give the model a "
                "server of its own",
                {"endpoint": self.endpoint},
            )
        return self


class Monitoring(_Section):
    schedule: Literal["daily", "weekly"] = "daily"
    window_days: int = Field(default=7, ge=1)
    table: str | None = Field(default=None, description="offline-store table to watch; default ingest.table")
    columns: list[str] | dict[str, dict[str, Any]] | None = None
    drift_share: float = Field(default=0.5, gt=0, le=1)
    joins: list[dict[str, Any]] = Field(default_factory=list)
    reference_columns: dict[str, str] = Field(
        default_factory=dict,
        description="{drift column: column of the training snapshot} where the names differ",
    )
    label_column: str | None = Field(
        default=None,
        description="the model's label; set it to check the model's quality decay where labels have arrived",
    )
    labels_table: str | None = Field(
        default=None,
        description="offline-store table of labelled rows for the window (e.g. features.entity_table); "
        "features it lacks are joined from the feature repo",
    )
    label_rule: dict[str, Any] | None = None
    max_decay: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="{metric: threshold} of quality decay that counts as drift: a drop (auc, accuracy, "
        "macro_f1, r2) or a relative rise (rmse, mae, logloss); default the task's metric with its "
        "default threshold",
    )
    prediction_drift: bool = Field(
        default=False,
        description="also compare the served predictions (prediction log) with the holdout's predictions",
    )
    cooldown_days: float = Field(default=7, ge=0)
    start_date: date | None = Field(default=None, description="first monitored day; default spec start_date")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_auc_decay(cls, data: Any) -> Any:
        """``max_auc_decay: x`` (before tasks had their own metrics) is read as ``max_decay: {auc: x}``."""
        if not isinstance(data, dict) or "max_auc_decay" not in data:
            return data
        data = dict(data)
        value = data.pop("max_auc_decay")
        if data.get("max_decay") is not None:
            raise ValueError("give max_decay only: max_auc_decay is its deprecated form for {auc: ...}")
        warnings.warn(
            "monitoring.max_auc_decay is deprecated; write monitoring.max_decay: {auc: ...}",
            DeprecationWarning,
            stacklevel=2,
        )
        data["max_decay"] = {"auc": value}
        return data


class BatchScoring(_Section):
    """The production model's answers for every row of an offline-store table, on a schedule, as a
    predictions table (:class:`~airflow_mlops.operators.batch_scoring.BatchScoringOperator`)."""

    schedule: Literal["daily", "weekly"] = "daily"
    table: str | None = Field(default=None, description="offline-store table to score; default ingest.table")
    window_days: int | None = Field(
        default=None,
        ge=1,
        description="days scored by each run, ending with its interval's last day; "
        "default the schedule's (1 daily, 7 weekly)",
    )
    output_table: str | None = Field(
        default=None, pattern=_IDENTIFIER, description="the predictions table; default <model>_predictions"
    )
    carry_columns: list[str] = Field(
        default_factory=list, description="input columns kept next to the answers besides the request fields"
    )
    joins: list[dict[str, Any]] = Field(default_factory=list)
    parallel_min_rows: int = Field(default=5_000_000, ge=0, description="rows from which a run scores on Ray")
    chunk_rows: int = Field(default=100_000, ge=1, description="rows per Ray task")
    start_date: date | None = Field(default=None, description="first scored day; default spec start_date")


class LifecycleSpec(_Section):
    """A model's lifecycle: what lands, how it is validated and featurized, trained, gated, served and
    monitored."""

    model: str = Field(pattern=_IDENTIFIER, description="registry name of the model")
    task: Literal["binary", "multiclass", "regression"] = Field(
        description="what the model predicts: one of two classes (binary), one of three or more "
        "(multiclass) or a number (regression); labels and metrics are checked against it"
    )
    dag_prefix: str = Field(pattern=_IDENTIFIER, description="DAG ids are <dag_prefix>_ingest, ...")
    description: str = ""
    owners: list[str] = Field(default_factory=lambda: ["airflow"])
    tags: list[str] = Field(default_factory=list)
    start_date: date
    end_date: date | None = None
    ingest: Ingest
    features: Features
    train: Train
    promotion: Promotion = Field(default_factory=Promotion)
    serving: Serving = Field(default_factory=Serving)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    batch_scoring: BatchScoring | None = Field(
        default=None, description="score a table with the production model on a schedule (its own DAG)"
    )
    #: the spec file; relative paths resolve against its folder
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _dates(self) -> LifecycleSpec:
        if self.end_date is not None and self.end_date < self.start_date:
            raise ValueError("end_date is before start_date")
        return self

    @model_validator(mode="after")
    def _metrics_fit_task(self) -> LifecycleSpec:
        """Fill the metric defaults of the task and refuse metrics (and modes) that do not fit it."""
        task, problems = self.task, []

        def check(metric: str, field: str) -> ml_metrics.Metric | None:
            try:
                return ml_metrics.check_metric(metric, task, field=field)
            except MLOpsArgumentError as err:
                problems.append({"field": field, "message": err.problem, "fix": err.fix})
                return None

        default = ml_metrics.DEFAULT_METRIC[task]
        tuning = self.train.tuning
        tuning_metric = tuning.metric or default
        fitting = check(tuning_metric, "train.tuning.metric")
        mode = tuning.mode
        if fitting is not None:
            if mode is not None and mode != fitting.mode:
                problems.append(
                    {
                        "field": "train.tuning.mode",
                        "message": f"train.tuning.mode {mode!r} contradicts {tuning_metric}, which is "
                        f"better when {'higher' if fitting.mode == 'max' else 'lower'}.",
                        "fix": f"write mode: {fitting.mode} or leave mode out.",
                    }
                )
            mode = fitting.mode
        promotion_metric = self.promotion.metric or default
        check(promotion_metric, "promotion.metric")
        floor = self.promotion.floor
        if floor is None:
            floor = {"auc": 0.5, "r2": 0.0}.get(promotion_metric)
        max_decay = dict(self.monitoring.max_decay or {default: ml_metrics.DEFAULT_MAX_DECAY[default]})
        for metric in max_decay:
            check(metric, f"monitoring.max_decay.{metric}")
        if problems:
            raise PydanticCustomError(
                "metric_task",
                "{summary}",
                {"summary": " ".join(p["message"] for p in problems), "problems": problems},
            )
        # frozen sections: store the resolved values on copies
        train = self.train.model_copy(
            update={"tuning": tuning.model_copy(update={"metric": tuning_metric, "mode": mode})}
        )
        object.__setattr__(self, "train", train)
        object.__setattr__(
            self, "promotion", self.promotion.model_copy(update={"metric": promotion_metric, "floor": floor})
        )
        object.__setattr__(self, "monitoring", self.monitoring.model_copy(update={"max_decay": max_decay}))
        return self

    def resolve(self, path: str) -> Path:
        """``path`` as an absolute path: relative paths are taken relative to the spec file's folder."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or self.source is None:
            return candidate
        return (self.source.parent / candidate).resolve()

    def dag_id(self, stage: str) -> str:
        return f"{self.dag_prefix}_{stage}"

    @property
    def drift_asset_name(self) -> str:
        return f"{self.model}_drift"

    @property
    def offline_asset_name(self) -> str:
        return f"{self.ingest.table}_offline"


# ------------------------------------------------------------------------------------------ loading
_FIXES = {
    "missing": "add the field (see {docs})",
    "extra_forbidden": "remove it or correct its spelling (the fields of this section are listed in {docs})",
    "literal_error": "use one of the values named",
    "string_pattern_mismatch": "use letters, digits and '_' (an import path: 'package.module.name')",
    "date_from_datetime_parsing": "write the date as YYYY-MM-DD",
    "canary_steps": "give the canary's share of the traffic per step, increasing, e.g. [10, 50, 100] "
    "(100, if given, is the final switch)",
}

_FIELD_FIXES = {
    "task": "write 'task: binary' (two classes), 'task: multiclass' (three or more) or "
    "'task: regression' (a number) at the top level of the spec",
}


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def describe_errors(path: Path | str, err: ValidationError) -> str:
    """One line per wrong field: ``<file>: <field>: <problem> -> fix: <what to write>``."""
    lines = []
    for error in err.errors(include_url=False):
        kind = error.get("type", "")
        where = _location(tuple(error.get("loc", ())))
        if kind == "metric_task":
            for problem in (error.get("ctx") or {}).get("problems", []):
                message = problem["message"].removeprefix(problem["field"] + " ").rstrip(".")
                lines.append(f"{path}: {problem['field']}: {message}; fix: {problem['fix']}")
            continue
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        fix = _FIELD_FIXES.get(where) or _FIXES.get(kind, "correct the value (see {docs})")
        fix = fix.format(docs=DOCS)
        if kind == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path}: {where}: {message}; fix: {fix}.")
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> LifecycleSpec:
    """Read and validate a lifecycle spec YAML file.

    :param overrides: nested mapping merged over the file's content (e.g. a test's
        ``{"ingest": {"cadence": "daily"}}``).
    :raises LifecycleSpecError: the file is missing, not YAML, or a field is wrong; every wrong field is
        named with its fix.
    """
    import yaml

    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as err:
        raise LifecycleSpecError(
            f"lifecycle spec {path} cannot be read ({err.strerror}).",
            fix="create the file or pass the right path to lifecycle_dags().",
        ) from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LifecycleSpecError(
            f"lifecycle spec {path} is not valid YAML{where}: {getattr(err, 'problem', err)}.",
            fix="correct the YAML syntax (indentation, quotes around values with ':' or '{{').",
        ) from None
    if not isinstance(content, dict):
        raise LifecycleSpecError(
            f"lifecycle spec {path} must be a YAML mapping of sections, got {type(content).__name__}.",
            fix=f"start from the example in {DOCS}.",
        )
    if overrides:
        content = _merge(content, overrides)
    try:
        spec = LifecycleSpec.model_validate({**content, "source": path})
    except ValidationError as err:
        described = describe_errors(path, err)
        count = described.count("\n") + 1
        raise LifecycleSpecError(
            f"lifecycle spec has {count} wrong field{'s' if count > 1 else ''}:\n{described}\n",
            fix=f"correct the field{'s' if count > 1 else ''} named above; the reference is {DOCS}.",
        ) from None
    _check_paths(spec, path)
    return spec


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_paths(spec: LifecycleSpec, path: Path) -> None:
    problems = []
    suite = spec.resolve(spec.ingest.expectation_suite)
    if not suite.is_file():
        problems.append(f"{path}: ingest.expectation_suite: no file {suite}")
    repo = spec.resolve(spec.features.repo)
    if not (repo / "feature_store.yaml").is_file():
        problems.append(f"{path}: features.repo: {repo} holds no feature_store.yaml")
    if problems:
        raise LifecycleSpecError(
            "lifecycle spec names files that do not exist:\n" + "\n".join(problems) + "\n",
            fix="correct the paths (relative paths are taken from the spec file's folder).",
        )
    if "{{" not in spec.ingest.landing_path:
        # a fixed landing path would make every run validate the same file
        raise LifecycleSpecError(
            f"{path}: ingest.landing_path {spec.ingest.landing_path!r} does not depend on the data interval.",
            fix="template it, e.g. 'orders/date={{ data_interval_start | ds }}/orders.parquet'.",
        )
