"""Real models of each task for the monitor's tests, trained on the Seattle weather of vega_datasets
(one row a day, 2012-2015): ``temp_max`` (regression), ``weather`` (multiclass: drizzle, fog, rain, snow,
sun) and wet or dry (binary, the classes as strings).

:class:`TrainedModel` follows the output convention of :class:`airflow_mlops.ml.model_io.Predictor`
(``task``, ``classes``, ``features``, ``predict``: binary P(classes[-1]), multiclass an (n, K) matrix in
``classes`` order, regression the values), so the monitor scores it exactly as a loaded model.
"""

from __future__ import annotations

from typing import Any

REGRESSION_FEATURES = ["precipitation", "temp_min", "wind", "month"]
CLASS_FEATURES = ["precipitation", "temp_max", "temp_min", "wind"]


def seattle() -> Any:
    """The Seattle weather, with ``day`` (YYYY-MM-DD), ``month`` and ``wet`` (``"wet"``/``"dry"``)."""
    from vega_datasets import data

    frame = data.seattle_weather()
    return frame.assign(
        day=frame["date"].dt.strftime("%Y-%m-%d"),
        month=frame["date"].dt.month,
        wet=(frame["weather"].isin(["rain", "drizzle", "snow"])).map({True: "wet", False: "dry"}),
    )


def between(frame: Any, start: str, end: str) -> Any:
    """Rows of days ``start`` <= day < ``end``."""
    return frame[(frame["day"] >= start) & (frame["day"] < end)].reset_index(drop=True)


class TrainedModel:
    """A fitted scikit-learn estimator behind the Predictor convention."""

    def __init__(self, task: str, estimator: Any, features: list[str], label: str) -> None:
        self.task, self.estimator, self.features, self.label = task, estimator, features, label
        classes = getattr(estimator, "classes_", None)
        self.classes = [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else []

    def predict(self, rows: Any) -> Any:
        import numpy as np
        import pandas as pd

        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        x = frame[self.features].astype(float)
        if self.task == "regression":
            return np.asarray(self.estimator.predict(x), dtype=float)
        proba = np.asarray(self.estimator.predict_proba(x), dtype=float)
        return proba[:, -1] if self.task == "binary" else proba


def regression_model(frame: Any) -> TrainedModel:
    """``temp_max`` from the night's low, rain, wind and month; trained on 2012-2013."""
    from sklearn.linear_model import LinearRegression

    train = between(frame, "2012-01-01", "2014-01-01")
    model = LinearRegression().fit(train[REGRESSION_FEATURES], train["temp_max"])
    return TrainedModel("regression", model, REGRESSION_FEATURES, "temp_max")


def multiclass_model(frame: Any) -> TrainedModel:
    """The weather of the day (five classes); trained on 2012, when every class was recorded."""
    from sklearn.ensemble import RandomForestClassifier

    train = between(frame, "2012-01-01", "2013-01-01")
    model = RandomForestClassifier(n_estimators=50, min_samples_leaf=5, random_state=0)
    return TrainedModel(
        "multiclass", model.fit(train[CLASS_FEATURES], train["weather"]), CLASS_FEATURES, "weather"
    )


def binary_model(frame: Any) -> TrainedModel:
    """Wet or dry (the positive class ``"wet"``, last in order); trained on 2012."""
    from sklearn.linear_model import LogisticRegression

    train = between(frame, "2012-01-01", "2013-01-01")
    model = LogisticRegression(max_iter=2000).fit(train[CLASS_FEATURES], train["wet"])
    return TrainedModel("binary", model, CLASS_FEATURES, "wet")
