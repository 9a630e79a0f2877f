"""The promotion gate: never put a worse model in front of users.

Pure logic, no I/O, so it can be property-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict with both scores, as recorded in the registry."""

    promote: bool
    reason: str
    candidate_score: float
    production_score: float | None
    min_improvement: float
    floor: float | None
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate_score: float,
    production_score: float | None,
    *,
    min_improvement: float,
    floor: float | None,
    higher_is_better: bool = True,
) -> PromotionDecision:
    """Promote only when the candidate clears the absolute ``floor`` and beats production by at least
    ``min_improvement`` (both scored on the same holdout). With no production model the floor decides.

    :param min_improvement: required margin over production, >= 0 (a negative margin would let a
        worse model through, so it is refused).
    :param floor: the score the candidate must reach (at least when higher is better, at most
        otherwise); None: no absolute floor.
    :param higher_is_better: the metric's direction (:attr:`airflow_mlops.ml.metrics.Metric.higher_is_better`):
        True for AUC, macro-F1, accuracy, R2; False for losses such as RMSE or log loss.
    """
    if not min_improvement >= 0 or math.isinf(min_improvement):
        raise ValueError(f"min_improvement must be a finite number >= 0, got {min_improvement!r}")
    if floor is not None and math.isnan(floor):
        raise ValueError("floor must be a number, got NaN")
    sign = 1.0 if higher_is_better else -1.0

    def verdict(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promote, reason, candidate_score, production_score, min_improvement, floor, higher_is_better
        )

    if math.isnan(candidate_score):
        return verdict(False, "the candidate's score is NaN")
    if floor is not None and sign * (candidate_score - floor) < 0:
        return verdict(False, f"candidate score {candidate_score:.6g} does not clear the floor {floor:.6g}")
    if production_score is None:
        if floor is None:
            return verdict(True, "no production model and no floor: the first model is promoted")
        return verdict(True, f"no production model; candidate clears the floor {floor:.6g}")
    if math.isnan(production_score):
        return verdict(False, "the production model's score is NaN; investigate before replacing it")
    gain = sign * (candidate_score - production_score)
    if gain >= min_improvement and gain > 0:
        return verdict(True, f"candidate beats production by {gain:.6g} (>= {min_improvement:.6g})")
    return verdict(
        False,
        f"candidate {candidate_score:.6g} vs production {production_score:.6g}: improvement {gain:.6g} "
        f"is below the required {min_improvement:.6g}",
    )
