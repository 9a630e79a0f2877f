"""Real models for the serving tests, trained on the 2013 flights: a binary delay classifier and a
regression of the arrival delay (scikit-learn pipelines written as skops model folders), a multiclass
departure-airport classifier (LightGBM, whose multiclass booster answers the (n, K) probability matrix of
the model-output convention), each registered through the registry with the signature inferred from its
training frame."""

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


def write_manifest(folder: Path, name: str, frame: Any) -> str:
    """``frame`` (flights of :func:`training_frame`) as a training snapshot, the way the feature step writes
    one: ``<name>.parquet`` with the model's features, label and ``event_timestamp``, and ``<name>.json``
    its manifest; returns the manifest's ``file://`` URI."""
    data = folder / f"{name}.parquet"
    frame.assign(event_timestamp=frame["time_hour"])[FEATURES + [LABEL, "event_timestamp"]].to_parquet(data)
    manifest = folder / f"{name}.json"
    span = {"start": str(frame["time_hour"].min()), "end": str(frame["time_hour"].max())}
    manifest.write_text(
        json.dumps(
            {
                "data_uri": f"file://{data}",
                "label": LABEL,
                "event_timestamp_column": "event_timestamp",
                "rows": len(frame),
                "time_range": span,
            }
        )
    )
    return f"file://{manifest}"


def write_model(
    folder: Path,
    train: Any,
    *,
    max_iter: int,
    features: list[str] | None = None,
    categorical: list[str] | None = None,
    shuffle_labels: bool = False,
    task: str = "binary",
    label: str | None = None,
) -> Path:
    """Fit a HistGradientBoosting pipeline on ``train`` and write it as a skops model folder;
    ``shuffle_labels`` makes a model that learned nothing (a candidate the gate must refuse);
    ``task="regression"`` fits a regressor of ``label`` (default ``arr_delay``)."""
    import numpy as np
    import skops.io as sio
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
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
    regression = task == "regression"
    label = label or ("arr_delay" if regression else LABEL)
    estimator = (HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier)(
        max_iter=max_iter, random_state=0
    )
    model = Pipeline([("prep", prep), ("model", estimator)])
    labels = train[label].to_numpy()
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
                # "classification" is the binary task in model.json files written before the task names
                # binary/multiclass/regression: read the same by the old and the new Predictor
                "task": "regression" if regression else "classification",
                "label": label,
                "classes": [] if regression else [0, 1],
                "features": features,
                "categorical": categories,
            }
        )
    )
    return folder


def write_erroring_model(folder: Path, train: Any, refused: list[str]) -> Path:
    """A deliberately bad candidate for the canary tests: its carrier encoder knows only the carriers not in
    ``refused`` and fails on the others (``handle_unknown="error"``), so it answers the service's warm-up row
    (the signature's first carrier, 9E) and fails every request with a refused carrier with a 500. Its
    signature (from ``train``) allows every carrier, so those requests pass validation first."""
    import numpy as np
    import skops.io as sio
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    known = train[~train["carrier"].isin(refused)]
    write_model(folder, known, max_iter=30)  # model.json (features, task, classes) as the others
    origins = sorted(train["origin"].unique().tolist())
    prep = ColumnTransformer(
        [
            ("carrier", OrdinalEncoder(handle_unknown="error"), ["carrier"]),
            (
                "origin",
                OrdinalEncoder(
                    categories=[origins], handle_unknown="use_encoded_value", unknown_value=np.nan
                ),
                ["origin"],
            ),
        ],
        remainder="passthrough",
        verbose_feature_names_out=False,
    )
    model = Pipeline([("prep", prep), ("model", HistGradientBoostingClassifier(max_iter=30, random_state=0))])
    model.fit(known[["carrier", "origin", "hour", "distance", "month"]], known["is_delayed"])
    (folder / "model.skops").write_bytes(sio.dumps(model))
    return folder


MULTICLASS_FEATURES = ["carrier", "dest", "hour", "distance", "month"]
MULTICLASS_LABEL = "origin"


def write_multiclass_model(folder: Path, train: Any, *, rounds: int = 30) -> Path:
    """Fit a LightGBM multiclass booster predicting the departure airport (EWR, JFK, LGA) and write it as
    a LightGBM model folder."""
    import lightgbm as lgb
    import pandas as pd

    categorical = ["carrier", "dest"]
    categories = {c: sorted(train[c].dropna().unique().tolist()) for c in categorical}
    classes = sorted(train[MULTICLASS_LABEL].unique().tolist())
    x = train[MULTICLASS_FEATURES].copy()
    for column in categorical:
        x[column] = pd.Categorical(x[column], categories=categories[column])
    y = train[MULTICLASS_LABEL].map({c: i for i, c in enumerate(classes)}).to_numpy()
    params = {"objective": "multiclass", "num_class": len(classes), "verbosity": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, label=y, categorical_feature=categorical), rounds)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.txt").write_text(booster.model_to_string())
    (folder / "model.json").write_text(
        json.dumps(
            {
                "format": "lightgbm",
                "model_file": "model.txt",
                "task": "multiclass",
                "label": MULTICLASS_LABEL,
                "classes": classes,
                "features": MULTICLASS_FEATURES,
                "categorical": categories,
            }
        )
    )
    return folder


def signature_metadata(
    folder: Path,
    train: Any,
    *,
    entity_keys: list[str] | None = None,
    store_features: list[str] | None = None,
    feature_service: str | None = None,
) -> dict[str, Any]:
    """The registry metadata of the model in ``folder``: its signature inferred from its training frame
    ``train`` (as RegisterModelOperator records it), task and classes."""
    from airflow_mlops.ml.metrics import normalize_task
    from airflow_mlops.ml.signature import infer_signature

    description = json.loads((folder / "model.json").read_text())
    task = normalize_task(description["task"])
    signature = infer_signature(
        train,
        task=task,
        label=description["label"],
        classes=description.get("classes") or [],
        features=description["features"],
        entity_keys=entity_keys,
        store_features=store_features,
        feature_service=feature_service,
    )
    return {"signature": signature.model_dump(mode="json"), "task": task, "classes": signature.classes}


def register(
    name: str,
    folder: Path,
    train: Any = None,
    *,
    feature_service: str | None = None,
    entity_keys: list[str] | None = None,
    store_features: list[str] | None = None,
) -> str:
    """Register ``folder`` as a candidate of ``name``, with the signature inferred from ``train`` (none when
    ``train`` is None); returns its version."""
    from airflow_mlops.hooks.bentoml import BentoMLHook

    metadata: dict[str, Any] = {"metrics": {}, "feature_service": feature_service, "dag_run_id": "test"}
    if train is not None:
        metadata.update(
            signature_metadata(
                folder,
                train,
                entity_keys=entity_keys,
                store_features=store_features,
                feature_service=feature_service,
            )
        )
    return BentoMLHook().register(name, folder, metadata)["version"]


#: weather at the departure airport and hour: the Feast feature view ``weather_hourly`` serves them online
WEATHER = ["temp", "wind_speed", "visib", "precip", "humid"]


def weather_training_frame(months: tuple[int, ...] = (1, 2, 3)) -> Any:
    """``training_frame`` joined with the real hourly weather at the departure airport (what Feast's
    point-in-time join of ``weather_hourly`` gives for the same flights)."""
    from airflow_mlops.demo.data import read_table

    weather = read_table("weather")[["origin", "time_hour", *WEATHER]]
    return training_frame(months).merge(weather, on=["origin", "time_hour"], how="left")
