"""Load a model directory written by the tuning stage, without executing code from the file.

A model directory holds ``model.json`` (format, model file, task, label, features, categories) and the
model file itself: a skops file for scikit-learn pipelines (loaded with an allowlist of scikit-learn,
NumPy and SciPy types, never pickle) or LightGBM's native text model. Callers check the file's
sha256 before loading (see :class:`airflow_mlops.hooks.bentoml.BentoMLHook`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_mlops.exceptions import MLOpsInputError

MODEL_DESCRIPTION = "model.json"
#: module prefixes whose types a skops model file may contain
TRUSTED_SKOPS_MODULES = ("sklearn.", "numpy", "scipy.", "builtins", "collections")


@dataclass
class Predictor:
    """A loaded model with the feature contract it was trained on."""

    task: str
    label: str
    features: list[str]
    categorical: dict[str, list[Any]]
    model_format: str
    model: Any
    description: dict[str, Any] = field(default_factory=dict)

    def frame(self, rows: Any) -> Any:
        """The model's input frame from a DataFrame or a list of dicts: its features, in order,
        categories typed as at training time (unknown values become missing)."""
        import pandas as pd

        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise MLOpsInputError(
                f"input lacks the model's feature columns {missing}.",
                fix="pass every feature the model was trained on (see its model.json).",
            )
        frame = frame[self.features].copy()
        for column in self.features:
            if column in self.categorical:
                frame[column] = pd.Categorical(frame[column], categories=self.categorical[column])
            else:  # features missing online arrive as None: numbers, with NaN for missing
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        return frame

    def predict(self, rows: Any) -> Any:
        """P(class 1) for classification, the predicted value for regression, as a NumPy array."""
        import numpy as np

        frame = self.frame(rows)
        if self.model_format == "lightgbm":
            return np.asarray(self.model.predict(frame), dtype=float)
        if self.task == "classification":
            return np.asarray(self.model.predict_proba(frame)[:, 1], dtype=float)
        return np.asarray(self.model.predict(frame), dtype=float)


def read_description(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_DESCRIPTION
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MLOpsInputError(
            f"model description {str(path)!r} is missing or not JSON ({err}).",
            fix="register models written by RayTuneOperator (they carry model.json).",
        ) from err


def load_model_dir(model_dir: Path | str) -> Predictor:
    """Load the model in ``model_dir`` (skops or LightGBM text; no pickle)."""
    model_dir = Path(model_dir)
    description = read_description(model_dir)
    model_format = description.get("format")
    model_file = model_dir / str(description.get("model_file", ""))
    if model_format == "skops":
        import skops.io as sio

        untrusted = sio.get_untrusted_types(file=model_file)
        refused = [t for t in untrusted if not t.startswith(TRUSTED_SKOPS_MODULES)]
        if refused:
            raise MLOpsInputError(
                f"model file {str(model_file)!r} contains types outside scikit-learn/NumPy/SciPy: {refused}.",
                fix="refusing to load it; retrain with a built-in trainable.",
            )
        model = sio.load(model_file, trusted=untrusted)
    elif model_format == "lightgbm":
        import lightgbm as lgb

        model = lgb.Booster(model_str=model_file.read_text())
    else:
        raise MLOpsInputError(
            f"model in {str(model_dir)!r} has format {model_format!r}; known: skops, lightgbm.",
            fix="register models written by RayTuneOperator.",
        )
    return Predictor(
        task=description.get("task", "classification"),
        label=description.get("label", ""),
        features=list(description.get("features", [])),
        categorical={k: list(v) for k, v in (description.get("categorical") or {}).items()},
        model_format=model_format,
        model=model,
        description=description,
    )
