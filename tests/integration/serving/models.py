"""Real flight-delay models for the serving tests: scikit-learn pipelines trained on the flights data,
written as skops model folders (model file + model.json) and registered through the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FEATURES = ["carrier", "origin", "hour", "distance", "month"]
CATEGORICAL = ["carrier", "origin"]
LABEL = "is_delayed"


def training_frame(months: tuple[int, ...] = (1, 2, 3)) -> Any:
    from airflow_mlops.demo.data import read_table

    frame = read_table("flights").dropna(subset=["arr_delay"])
    frame = frame[frame["month"].isin(months)].copy()
    frame[LABEL] = (frame["arr_delay"] > 15).astype(int)
    return frame


def write_model(
    folder: Path,
    train: Any,
    *,
    max_iter: int,
    features: list[str] | None = None,
    categorical: list[str] | None = None,
    shuffle_labels: bool = False,
) -> Path:
    """Fit a HistGradientBoosting pipeline on ``train`` and write it as a skops model folder;
    ``shuffle_labels`` makes a model that learned nothing (a candidate the gate must refuse)."""
    import numpy as np
    import skops.io as sio
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    features = features or FEATURES
    categorical = categorical or CATEGORICAL
    categories = {c: sorted(train[c].dropna().unique().tolist()) for c in categorical}
    prep = ColumnTransformer(
        [
            (
                "cat",
                OrdinalEncoder(
                    categories=[categories[c] for c in categorical],
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                ),
                categorical,
            )
        ],
        remainder="passthrough",
        verbose_feature_names_out=False,
    )
    model = Pipeline(
        [("prep", prep), ("model", HistGradientBoostingClassifier(max_iter=max_iter, random_state=0))]
    )
    labels = train[LABEL].to_numpy()
    if shuffle_labels:
        labels = np.random.default_rng(0).permutation(labels)
    model.fit(train[features], labels)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.skops").write_bytes(sio.dumps(model))
    (folder / "model.json").write_text(
        json.dumps(
            {
                "format": "skops",
                "model_file": "model.skops",
                "task": "classification",
                "label": LABEL,
                "features": features,
                "categorical": categories,
            }
        )
    )
    return folder


def register(name: str, folder: Path, feature_service: str | None = None) -> str:
    """Register ``folder`` as a candidate of ``name``; returns its version."""
    from airflow_mlops.hooks.bentoml import BentoMLHook

    record = BentoMLHook().register(
        name, folder, {"metrics": {}, "feature_service": feature_service, "dag_run_id": "test"}
    )
    return record["version"]


#: weather at the departure airport and hour: the Feast feature view ``weather_hourly`` serves them online
WEATHER = ["temp", "wind_speed", "visib", "precip", "humid"]


def weather_training_frame(months: tuple[int, ...] = (1, 2, 3)) -> Any:
    """``training_frame`` joined with the real hourly weather at the departure airport (what Feast's
    point-in-time join of ``weather_hourly`` gives for the same flights)."""
    from airflow_mlops.demo.data import read_table

    weather = read_table("weather")[["origin", "time_hour", *WEATHER]]
    return training_frame(months).merge(weather, on=["origin", "time_hour"], how="left")
