"""Canary guardrails: the figures a canary step is judged on and the verdicts a user gets from them."""

from __future__ import annotations

import random

import pytest

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.ml.canary import Guardrails, evaluate, ks_statistic, prediction_shift, window_predictions

OLD, NEW = "http://old", "http://new"


def _split(old: dict, new: dict) -> dict:
    return {"generation": 2, "backends": {OLD: old, NEW: new}}


def _backend(requests: int, errors: int = 0, p99: float = 10.0, n: int | None = None) -> dict:
    return {
        "requests": requests,
        "errors_5xx": errors,
        "errors_connection": 0,
        "fallbacks": errors,
        "latency_ms": {"n": requests - errors if n is None else n, "p50": p99 / 2, "p99": p99},
    }


def _predictions(seed: int, n: int, shift: float = 0.0) -> list[float]:
    rng = random.Random(seed)
    return [min(1.0, max(0.0, rng.betavariate(2, 5) + shift)) for _ in range(n)]


def test_a_healthy_canary_passes():
    verdict = evaluate(
        _split(_backend(900), _backend(100, p99=12.0)),
        old_backend=OLD,
        new_backend=NEW,
        old_predictions=_predictions(1, 900),
        new_predictions=_predictions(2, 100),
        guardrails=Guardrails(),
    )
    assert verdict["passed"] and verdict["breaches"] == []
    assert verdict["p99_ratio"] == pytest.approx(1.2)
    assert verdict["prediction_shift"]["method"] == "ks" and verdict["prediction_shift"]["judged"]


def test_an_error_rate_increase_is_a_breach_naming_both_rates():
    verdict = evaluate(
        _split(_backend(900, errors=9), _backend(100, errors=30)),
        old_backend=OLD,
        new_backend=NEW,
        old_predictions=[],
        new_predictions=[],
        guardrails=Guardrails(max_error_rate_increase=0.05),
    )
    assert not verdict["passed"]
    assert "error rate 30.00% (30 of 100 requests) against 1.00%" in verdict["breaches"][0]
    assert verdict["new"]["error_rate"] == 0.3 and verdict["old"]["error_rate"] == 0.01


def test_a_slower_p99_is_a_breach_only_with_enough_samples():
    slow = _split(_backend(900, p99=10.0), _backend(100, p99=35.0))
    verdict = evaluate(
        slow,
        old_backend=OLD,
        new_backend=NEW,
        old_predictions=[],
        new_predictions=[],
        guardrails=Guardrails(),
    )
    assert verdict["p99_ratio"] == 3.5 and "3.50x, more than max_p99_ratio=2" in verdict["breaches"][0]
    few = _split(_backend(900, p99=10.0), _backend(10, p99=35.0))
    assert evaluate(
        few, old_backend=OLD, new_backend=NEW, old_predictions=[], new_predictions=[], guardrails=Guardrails()
    )["passed"]


def test_shifted_predictions_are_a_breach_and_noise_of_a_small_sample_is_not():
    shifted = evaluate(
        _split(_backend(900), _backend(100)),
        old_backend=OLD,
        new_backend=NEW,
        old_predictions=_predictions(1, 900),
        new_predictions=_predictions(2, 100, shift=0.3),
        guardrails=Guardrails(),
    )
    assert not shifted["passed"] and "predictions shifted: KS statistic" in shifted["breaches"][0]
    assert shifted["prediction_shift"]["p_value"] < 0.01
    # 25 draws of the same distribution: D may pass 0.2 by chance, but it is not significant
    same = [
        evaluate(
            _split(_backend(900), _backend(25)),
            old_backend=OLD,
            new_backend=NEW,
            old_predictions=_predictions(seed, 900),
            new_predictions=_predictions(seed + 1000, 25),
            guardrails=Guardrails(),
        )["passed"]
        for seed in range(100)
    ]
    assert sum(same) >= 97


def test_the_ks_statistic_is_the_largest_gap_between_the_distribution_functions():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0
    assert ks_statistic([1, 2], [3, 4]) == 1
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)


def test_class_predictions_compare_by_total_variation_distance():
    shift = prediction_shift(["EWR"] * 50 + ["JFK"] * 50, ["EWR"] * 90 + ["JFK"] * 10)
    assert shift["method"] == "tvd" and shift["value"] == pytest.approx(0.4) and shift["p_value"] is None


def test_too_little_traffic_is_a_breach_only_when_asked():
    split = _split(_backend(100), _backend(3))
    kwargs = {"old_backend": OLD, "new_backend": NEW, "old_predictions": [], "new_predictions": []}
    assert evaluate(split, guardrails=Guardrails(), **kwargs)["passed"]
    verdict = evaluate(split, guardrails=Guardrails(min_requests=10), **kwargs)
    assert "got 3 requests, fewer than min_requests=10" in verdict["breaches"][0]


def test_window_predictions_keep_the_versions_served_answers_in_the_window():
    from datetime import UTC, datetime

    records = [
        {"version": "2", "time": "2026-01-01T00:00:05+00:00", "prediction": 0.1},
        {"version": "2", "time": "2026-01-01T00:00:05+00:00", "prediction": 0.9, "shadow": True},
        {"version": "1", "time": "2026-01-01T00:00:05+00:00", "prediction": 0.5},
        {"version": "2", "time": "2026-01-01T00:01:05+00:00", "prediction": 0.3},
    ]
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    assert window_predictions(records, "2", start, end) == [0.1]


@pytest.mark.parametrize(
    "given, message",
    [
        ({"max_p99": 2}, "unknown canary guardrail(s) ['max_p99']"),
        ({"max_p99_ratio": "fast"}, "max_p99_ratio='fast' is not a number >= 0"),
        ({"max_error_rate_increase": -0.1}, "max_error_rate_increase=-0.1 is not a number >= 0"),
    ],
)
def test_bad_guardrails_are_refused_naming_the_key(given, message):
    with pytest.raises(
        MLOpsArgumentError,
        match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        Guardrails.parse(given)
