"""Report how a shadow version compares with production on the live traffic it was copied.

A version deployed with ``BentoDeployOperator(strategy="shadow")`` answers a copy of every live request
and logs its answers, marked ``shadow``, next to production's in the prediction log, with the same request
id. :class:`ShadowReportOperator` pairs the two by request id over a window and reports their agreement
(:mod:`airflow_mlops.ml.shadow`) and the latency the deployment's router measured for both; optional
thresholds turn the report into a gate before promotion.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_mlops.exceptions import MLOpsArgumentError, ServingError
from airflow_mlops.hooks.bentoml import BentoMLHook

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_mlops.operators.serving import LocalDeploymentTarget


class ShadowAgreementError(ServingError, AirflowFailException):
    """The shadow version's answers are too far from production's (or too few to tell)."""


class ShadowReportOperator(BaseOperator):
    """Compare a shadow version's logged answers with production's answers to the same requests.

    Reads the model's prediction log for the last ``window_hours`` (up to ``window_end``), pairs the
    production and shadow records by request id (``/predict`` requests that came through the deployment's
    router; ``/predict_batch`` records carry no request id and do not pair) and returns::

        {"deployment", "production_version", "shadow_version", "window_start", "window_end",
         "paired", "production_rows", "shadow_rows", "production_unpaired", "shadow_unpaired",
         "agreement": {"task", "rows", ...per task, see airflow_mlops.ml.shadow},
         "latency_ms": {"active": {"n", "mean", "p99"}, "shadow": {...}} or None,
         "router": {"sent", "skipped", "failed"} or None}

    ``latency_ms`` is the router's timing of both versions on the mirrored requests (since the router
    started), ``None`` when the router does not answer. ``router`` counts the copies since the router
    started: ``sent`` to the shadow, ``skipped`` (dropped: the shadow gets only CPU production leaves idle,
    and copies it cannot keep up with are dropped rather than queued without end), ``failed``; with
    ``skipped`` above 0 the shadow saw a sample of the traffic, and ``production_unpaired`` counts the
    production requests of the window it did not answer. With thresholds set, a report that misses one
    fails the task (:class:`ShadowAgreementError`) with the figures, e.g. to stop a promotion.

    :param model_name: registry name (templated).
    :param deployment_name: name of the deployment; default ``model_name``.
    :param shadow_version: the shadow's version; default the deployment's current shadow (templated).
    :param production_version: production's version; default the deployment's live version (templated).
    :param window_hours: length of the window compared.
    :param window_end: end of the window, ISO 8601 (templated); default now.
    :param min_rows: fewest pairs for a verdict; fewer fails when any threshold is set.
    :param min_label_agreement: binary and multiclass: least share of requests with the same label.
    :param max_mean_abs_diff: binary: largest mean absolute difference of probabilities; regression: of
        values.
    :param min_correlation: regression: least correlation of the predicted values.
    """

    template_fields: Sequence[str] = ("model_name", "shadow_version", "production_version", "window_end")
    ui_color = "#fde8c8"

    def __init__(
        self,
        *,
        model_name: str,
        deployment_name: str | None = None,
        shadow_version: str | None = None,
        production_version: str | None = None,
        window_hours: float = 24.0,
        window_end: str | None = None,
        min_rows: int = 1,
        min_label_agreement: float | None = None,
        max_mean_abs_diff: float | None = None,
        min_correlation: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if float(window_hours) <= 0:
            raise MLOpsArgumentError(
                f"window_hours must be positive, got {window_hours}.", fix="pass e.g. 24."
            )
        self.model_name = model_name
        self.deployment_name = deployment_name
        self.shadow_version = shadow_version
        self.production_version = production_version
        self.window_hours = window_hours
        self.window_end = window_end
        self.min_rows = min_rows
        self.min_label_agreement = min_label_agreement
        self.max_mean_abs_diff = max_mean_abs_diff
        self.min_correlation = min_correlation

    @cached_property
    def hook(self) -> BentoMLHook:
        return BentoMLHook()

    @cached_property
    def local(self) -> LocalDeploymentTarget:
        from airflow_mlops.operators.serving import LocalDeploymentTarget

        return LocalDeploymentTarget(self.hook)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_mlops.ml.prediction_log import log_root
        from airflow_mlops.ml.shadow import shadow_report

        deployment = self.deployment_name or self.model_name
        state = self.local.read_state(deployment)
        shadow_version = self.shadow_version or (state.get("shadow") or {}).get("version")
        if not shadow_version:
            raise ServingError(
                f"deployment {deployment!r} has no shadow version and none was given.",
                fix="deploy one with BentoDeployOperator(strategy='shadow'), or pass shadow_version=.",
            )
        production_version = self.production_version or (state.get("active") or {}).get("version")
        end = datetime.fromisoformat(self.window_end) if self.window_end else datetime.now(UTC)
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        start = end - timedelta(hours=float(self.window_hours))
        days = [
            (start + timedelta(days=n)).date().isoformat()
            for n in range((end.date() - start.date()).days + 1)
        ]
        report = shadow_report(
            log_root(str(self.model_name), self.hook.store.settings.artifact_root),
            days,
            production_version=production_version,
            shadow_version=shadow_version,
            start=start,
            end=end,
        )
        status = self.local.router_status(state.get("router")) or {}
        router = status.get("shadow")
        result = {
            "deployment": deployment,
            "production_version": production_version,
            "shadow_version": shadow_version,
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            **report,
            "latency_ms": (router or {}).get("latency_ms"),
            "router": {k: router[k] for k in ("sent", "skipped", "failed")} if router else None,
        }
        self.log.info(
            "Shadow %s vs production %s: %d pairs, agreement %s, latency %s",
            shadow_version,
            production_version,
            report["paired"],
            report["agreement"],
            result["latency_ms"],
        )
        misses = self.misses(report)
        if misses:
            raise ShadowAgreementError(
                f"shadow version {shadow_version} of {self.model_name!r} does not agree enough with production "
                f"version {production_version}: {'; '.join(misses)} (report: {result}).",
                fix="keep production; look at the requests where they differ in the prediction log, or relax "
                "the thresholds if the difference is intended.",
            )
        return result

    def misses(self, report: dict[str, Any]) -> list[str]:
        """The thresholds ``report`` misses (none when no threshold is set)."""
        checks = [
            ("label_agreement", self.min_label_agreement, lambda v, t: v >= t, ">="),
            ("probability_mean_abs_diff", self.max_mean_abs_diff, lambda v, t: v <= t, "<="),
            ("value_mean_abs_diff", self.max_mean_abs_diff, lambda v, t: v <= t, "<="),
            ("correlation", self.min_correlation, lambda v, t: v >= t, ">="),
        ]
        if all(threshold is None for _, threshold, _, _ in checks):
            return []
        if report["paired"] < int(self.min_rows):
            return [f"{report['paired']} paired requests, fewer than min_rows={self.min_rows}"]
        figures = report["agreement"]
        misses = []
        for name, threshold, ok, sign in checks:
            if threshold is None or name not in figures:
                continue
            value = figures[name]
            if value is None or not ok(value, float(threshold)):
                misses.append(f"{name} {value}, wanted {sign} {threshold}")
        return misses
