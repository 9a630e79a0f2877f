"""The promotion gate, property-tested: a worse candidate is never promoted."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_mlops.ml.promotion import decide

scores = st.floats(allow_nan=True, allow_infinity=False, width=32)
margins = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(
    candidate=scores,
    production=scores,
    min_improvement=margins,
    floor=scores.filter(lambda f: not math.isnan(f)),
    higher_is_better=st.booleans(),
)
def test_a_worse_or_equal_candidate_is_never_promoted(
    candidate, production, min_improvement, floor, higher_is_better
):
    decision = decide(
        candidate, production, min_improvement=min_improvement, floor=floor, higher_is_better=higher_is_better
    )
    if decision.promote:
        better = candidate > production if higher_is_better else candidate < production
        assert better, decision
        assert abs(candidate - production) >= min_improvement
        assert (candidate >= floor) if higher_is_better else (candidate <= floor)


@given(candidate=scores, floor=scores.filter(lambda f: not math.isnan(f)), higher_is_better=st.booleans())
def test_without_production_the_floor_alone_decides(candidate, floor, higher_is_better):
    decision = decide(candidate, None, min_improvement=0.01, floor=floor, higher_is_better=higher_is_better)
    clears = (candidate >= floor) if higher_is_better else (candidate <= floor)
    assert decision.promote == (not math.isnan(candidate) and clears)


def test_a_clear_improvement_is_promoted_and_explained():
    decision = decide(0.74, 0.70, min_improvement=0.01, floor=0.6)
    assert decision.promote
    assert "beats production by 0.04" in decision.reason
    assert decision.to_dict()["production_score"] == 0.70


def test_lower_is_better_metrics():
    assert decide(10.0, 12.0, min_improvement=1.0, floor=20.0, higher_is_better=False).promote
    assert not decide(11.5, 12.0, min_improvement=1.0, floor=20.0, higher_is_better=False).promote


@pytest.mark.parametrize("margin", [-0.01, float("nan"), float("inf")])
def test_a_margin_that_would_let_worse_models_through_is_refused(margin):
    with pytest.raises(ValueError, match="min_improvement"):
        decide(0.7, 0.8, min_improvement=margin, floor=0.5)


def test_without_a_floor_the_first_model_is_promoted_and_the_gate_still_holds():
    assert decide(0.31, None, min_improvement=0.0, floor=None).promote
    assert not decide(0.31, 0.35, min_improvement=0.0, floor=None).promote
    assert decide(9.0, 10.0, min_improvement=0.5, floor=None, higher_is_better=False).promote
