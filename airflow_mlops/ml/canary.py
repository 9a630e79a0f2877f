"""Canary guardrails: compare a new version with the old one on the live traffic each got in one step.

During a canary deploy the deployment's router (:mod:`airflow_mlops.ml.router`) sends a share of the live
requests to the new version and counts, per backend, the requests, 5xx answers, connection failures and the
latency of the answers since the weight was set. The prediction log holds both versions' answers. At the end
of each step :func:`evaluate` compares them:

``error_rate``
    (5xx answers + connection failures) / requests, per version. Breach when the new version's exceeds the
    old one's by more than ``max_error_rate_increase`` (default 0.01, i.e. one point).
``p99_ms``
    the 99th percentile latency of each version's answers. Breach when new / old exceeds ``max_p99_ratio``
    (default 2.0). Not judged while either side has fewer than ``min_latency_samples`` (20) answers.
``prediction_shift``
    how far the distribution of the new version's ``prediction`` (the log's one value: the positive class's
    probability, the predicted value, or for multiclass the predicted class) is from the old one's, on the
    predictions each made in the step window. Numeric predictions: the two-sample **Kolmogorov-Smirnov
    statistic** D (the largest gap between the two empirical distribution functions, 0 = same, 1 = disjoint)
    with its asymptotic p-value; breach when D > ``max_prediction_shift`` (default 0.2) **and** p < 0.01, so a
    small sample's noise alone cannot roll a good version back. Classes: the total variation distance
    between the class frequencies (half the sum of the absolute differences, also 0..1), judged once each side
    has at least 30 predictions. Not judged with fewer than ``min_predictions`` (20) on either side.
``min_requests``
    (default 0) fewest requests the new version must have had in the step; fewer is a breach ("too little
    traffic to judge"), for deployments that want evidence before they promote.

Pure Python (no NumPy): it runs in the triggerer and in the task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.ml.prediction_log import is_shadow

#: p-value below which a prediction shift larger than the threshold counts
SHIFT_ALPHA = 0.01
#: fewest predictions per side for the class-frequency distance (no p-value there)
MIN_CLASS_PREDICTIONS = 30


@dataclass(frozen=True)
class Guardrails:
    """The thresholds of a canary step (see the module docstring)."""

    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 2.0
    max_prediction_shift: float = 0.2
    min_requests: int = 0
    min_latency_samples: int = 20
    min_predictions: int = 20

    @classmethod
    def parse(cls, given: Mapping[str, Any] | None) -> Guardrails:
        """Guardrails from a dict of some of the fields.

        :raises MLOpsArgumentError: an unknown key or a value that is not a number >= 0.
        """
        known = {f.name for f in fields(cls)}
        given = dict(given or {})
        unknown = sorted(set(given) - known)
        if unknown:
            raise MLOpsArgumentError(
                f"unknown canary guardrail(s) {unknown}.", fix=f"use some of {sorted(known)}."
            )
        values: dict[str, Any] = {}
        for name, value in given.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if isinstance(value, bool) or not number >= 0:
                raise MLOpsArgumentError(
                    f"canary guardrail {name}={value!r} is not a number >= 0.",
                    fix=f"give {name} a number, e.g. {getattr(cls, name)}.",
                )
            values[name] = int(number) if name.startswith("min_") else number
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backend_figures(split: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """Requests, errors, error rate and latency of ``backend`` in the router's ``split`` status."""
    counts = dict((split.get("backends") or {}).get(backend) or {})
    requests = int(counts.get("requests") or 0)
    errors = int(counts.get("errors_5xx") or 0) + int(counts.get("errors_connection") or 0)
    latency = counts.get("latency_ms") or {}
    return {
        "requests": requests,
        "errors": errors,
        "fallbacks": int(counts.get("fallbacks") or 0),
        "error_rate": round(errors / requests, 6) if requests else 0.0,
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "latency_samples": int(latency.get("n") or 0),
    }


def error_breach(old: Mapping[str, Any], new: Mapping[str, Any], guardrails: Guardrails) -> str | None:
    """The error-rate breach, if any (also checked while a step runs, to roll back early)."""
    increase = new["error_rate"] - old["error_rate"]
    if new["requests"] and increase > guardrails.max_error_rate_increase:
        return (
            f"error rate {new['error_rate']:.2%} ({new['errors']} of {new['requests']} requests) against "
            f"{old['error_rate']:.2%} for the old version: +{increase:.2%}, more than "
            f"max_error_rate_increase={guardrails.max_error_rate_increase:g}"
        )
    return None


def _ks_pvalue(d: float, n1: int, n2: int) -> float:
    """Asymptotic p-value of the two-sample Kolmogorov-Smirnov statistic ``d`` (Numerical Recipes' form)."""
    en = math.sqrt(n1 * n2 / (n1 + n2))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2 * (-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-10:
            break
    return min(1.0, max(0.0, total))


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    d = 0.0
    while i < len(xs) and j < len(ys):
        x = min(xs[i], ys[j])
        while i < len(xs) and xs[i] <= x:
            i += 1
        while j < len(ys) and ys[j] <= x:
            j += 1
        d = max(d, abs(i / len(xs) - j / len(ys)))
    return d


def _numeric(values: Iterable[Any]) -> list[float] | None:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isnan(value):
            out.append(float(value))
    return out


def prediction_shift(old: Sequence[Any], new: Sequence[Any]) -> dict[str, Any]:
    """How far ``new`` predictions are from ``old`` ones: ``{"method", "value", "p_value", "old_n",
    "new_n"}`` (``method``: ``ks`` for numbers, ``tvd`` for classes; ``value`` ``None`` without data)."""
    a, b = _numeric(old), _numeric(new)
    if a is not None and b is not None:
        if not a or not b:
            return {"method": "ks", "value": None, "p_value": None, "old_n": len(a), "new_n": len(b)}
        d = ks_statistic(a, b)
        return {
            "method": "ks",
            "value": round(d, 6),
            "p_value": round(_ks_pvalue(d, len(a), len(b)), 6),
            "old_n": len(a),
            "new_n": len(b),
        }
    a_labels, b_labels = [str(v) for v in old if v is not None], [str(v) for v in new if v is not None]
    if not a_labels or not b_labels:
        return {
            "method": "tvd",
            "value": None,
            "p_value": None,
            "old_n": len(a_labels),
            "new_n": len(b_labels),
        }
    classes = set(a_labels) | set(b_labels)
    tvd = 0.5 * sum(
        abs(a_labels.count(c) / len(a_labels) - b_labels.count(c) / len(b_labels)) for c in classes
    )
    return {
        "method": "tvd",
        "value": round(tvd, 6),
        "p_value": None,
        "old_n": len(a_labels),
        "new_n": len(b_labels),
    }


def window_predictions(
    records: Iterable[Mapping[str, Any]], version: str, start: datetime, end: datetime
) -> list[Any]:
    """The ``prediction`` of each served (not shadow) record of ``version`` made in ``[start, end)``."""
    out = []
    for record in records:
        if str(record.get("version")) != str(version) or is_shadow(record):
            continue
        try:
            at = datetime.fromisoformat(str(record.get("time")))
        except ValueError:
            continue
        if start <= at < end:
            out.append(record.get("prediction"))
    return out


def evaluate(
    split: Mapping[str, Any],
    *,
    old_backend: str,
    new_backend: str,
    old_predictions: Sequence[Any],
    new_predictions: Sequence[Any],
    guardrails: Guardrails,
) -> dict[str, Any]:
    """Compare the new version with the old on one step: ``{"old": {...}, "new": {...}, "p99_ratio",
    "prediction_shift": {...}, "breaches": [why, ...], "passed": bool}``."""
    old = backend_figures(split, old_backend)
    new = backend_figures(split, new_backend)
    breaches: list[str] = []
    if new["requests"] < guardrails.min_requests:
        breaches.append(
            f"the new version got {new['requests']} requests, fewer than min_requests={guardrails.min_requests}: "
            "too little traffic to judge"
        )
    error = error_breach(old, new, guardrails)
    if error:
        breaches.append(error)
    ratio = None
    if (
        min(old["latency_samples"], new["latency_samples"]) >= guardrails.min_latency_samples
        and old["p99_ms"]
        and new["p99_ms"] is not None
    ):
        ratio = round(new["p99_ms"] / old["p99_ms"], 4)
        if ratio > guardrails.max_p99_ratio:
            breaches.append(
                f"p99 latency {new['p99_ms']:.1f} ms against {old['p99_ms']:.1f} ms for the old version: "
                f"{ratio:.2f}x, more than max_p99_ratio={guardrails.max_p99_ratio:g}"
            )
    shift = prediction_shift(old_predictions, new_predictions)
    enough = min(shift["old_n"], shift["new_n"]) >= max(
        guardrails.min_predictions, MIN_CLASS_PREDICTIONS if shift["method"] == "tvd" else 0
    )
    shift["judged"] = bool(enough and shift["value"] is not None)
    if shift["judged"] and shift["value"] > guardrails.max_prediction_shift:
        significant = shift["p_value"] is None or shift["p_value"] < SHIFT_ALPHA
        if significant:
            what = "KS statistic" if shift["method"] == "ks" else "total variation distance"
            p = f", p={shift['p_value']:.2g}" if shift["p_value"] is not None else ""
            breaches.append(
                f"predictions shifted: {what} {shift['value']:.3f} between {shift['new_n']} new and "
                f"{shift['old_n']} old predictions{p}, more than max_prediction_shift="
                f"{guardrails.max_prediction_shift:g}"
            )
    return {
        "old": old,
        "new": new,
        "p99_ratio": ratio,
        "prediction_shift": shift,
        "breaches": breaches,
        "passed": not breaches,
    }
