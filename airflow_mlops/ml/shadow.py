"""Shadow traffic: pair production's and the shadow's logged answers to the same requests and compare them.

A version deployed with ``strategy="shadow"`` answers copies of live requests (sent by the deployment's
router, :mod:`airflow_mlops.ml.router`) and logs its answers to the same prediction log as production,
marked ``"shadow": true``; the router gives both the same ``request_id``
(:mod:`airflow_mlops.ml.prediction_log`). :func:`pair_records` matches them by that id and
:func:`agreement` says how far the shadow's answers are from production's, per task:

binary
    ``label_agreement`` (share of requests with the same label) and ``probability_mean_abs_diff``
    (mean absolute difference of the positive class's probability).
multiclass
    ``label_agreement``.
regression
    ``correlation`` (Pearson, of the predicted values; ``None`` below 2 pairs or when either side is
    constant) and ``value_mean_abs_diff``.

Pure Python: it runs in a task's process on a day of records without pandas.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from airflow_mlops.ml.prediction_log import is_shadow, read_records

#: the tasks :func:`agreement` compares
TASKS = ("binary", "multiclass", "regression")


def _time(record: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return None


def pair_records(
    records: Iterable[Mapping[str, Any]],
    *,
    production_version: str | None = None,
    shadow_version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], dict[str, int]]:
    """Pairs ``(production record, shadow record)`` with the same ``request_id``, in production's order.

    Only records made in ``[start, end)`` (when given) of the versions asked for count; records without a
    request id cannot be paired (``/predict_batch``, requests that did not come through the router). When
    a request id occurs more than once on one side (a request the router retried), its first record counts.

    :returns: the pairs and the counts ``production_rows``, ``shadow_rows`` (records with a request id in
        the window), ``paired``, ``production_unpaired`` and ``shadow_unpaired``.
    """
    production: dict[str, Mapping[str, Any]] = {}
    shadow: dict[str, Mapping[str, Any]] = {}
    for record in records:
        request_id = record.get("request_id")
        if not request_id:
            continue
        at = _time(record) if start is not None or end is not None else None
        if (start is not None and (at is None or at < start)) or (
            end is not None and (at is None or at >= end)
        ):
            continue
        side, version = (shadow, shadow_version) if is_shadow(record) else (production, production_version)
        if version is not None and str(record.get("version")) != str(version):
            continue
        side.setdefault(str(request_id), record)
    pairs = [(record, shadow[rid]) for rid, record in production.items() if rid in shadow]
    counts = {
        "production_rows": len(production),
        "shadow_rows": len(shadow),
        "paired": len(pairs),
        "production_unpaired": len(production) - len(pairs),
        "shadow_unpaired": len(shadow) - len(pairs),
    }
    return pairs, counts


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _mean_abs_diff(pairs: Sequence[tuple[float | None, float | None]]) -> float | None:
    diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return round(sum(diffs) / len(diffs), 6) if diffs else None


def _correlation(pairs: Sequence[tuple[float | None, float | None]]) -> float | None:
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(both) < 2:
        return None
    try:
        return round(statistics.correlation([a for a, _ in both], [b for _, b in both]), 6)
    except statistics.StatisticsError:  # a constant side
        return None


def agreement(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    """How the shadow's answers compare with production's on the paired requests (see the module
    docstring): ``task``, ``rows`` and the task's figures; figures are ``None`` without pairs.

    :raises ValueError: the two sides answer different tasks (they are not versions of one model).
    """
    tasks = {str(p.get("task")) for pair in pairs for p in pair}
    if len(tasks) > 1:
        raise ValueError(f"production and shadow answer different tasks: {sorted(tasks)}")
    task = next(iter(tasks), None)
    answers = [(dict(p.get("answer") or {}), dict(s.get("answer") or {})) for p, s in pairs]
    figures: dict[str, Any] = {"task": task, "rows": len(pairs)}
    if task in ("binary", "multiclass"):
        labels = [(a.get("label"), b.get("label")) for a, b in answers]
        figures["label_agreement"] = (
            round(sum(a == b for a, b in labels) / len(labels), 6) if labels else None
        )
    if task == "binary":
        probabilities = [(_number(a.get("probability")), _number(b.get("probability"))) for a, b in answers]
        figures["probability_mean_abs_diff"] = _mean_abs_diff(probabilities)
    if task == "regression":
        values = [(_number(a.get("value")), _number(b.get("value"))) for a, b in answers]
        figures["correlation"] = _correlation(values)
        figures["value_mean_abs_diff"] = _mean_abs_diff(values)
    return figures


def shadow_report(
    root: str,
    dates: Sequence[str],
    *,
    production_version: str | None = None,
    shadow_version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> dict[str, Any]:
    """Pair the prediction log under ``root`` on ``dates`` (see :func:`pair_records`) and compare
    (:func:`agreement`): the counts of :func:`pair_records` plus ``agreement``."""
    pairs, counts = pair_records(
        read_records(root, dates),
        production_version=production_version,
        shadow_version=shadow_version,
        start=start,
        end=end,
    )
    return {**counts, "agreement": agreement(pairs)}
