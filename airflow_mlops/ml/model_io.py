"""Load a model directory written by the tuning stage, without executing code from the file.

A model directory holds ``model.json`` (format, model file, task, label, classes, features, categories)
and the model file itself: a skops file for scikit-learn pipelines (loaded with an allowlist of scikit-learn,
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
#: single types a skops model file may contain besides those modules: HistGradientBoosting with
#: categorical features keeps ``functools.partial(sklearn.utils.validation.check_array, ...)``; skops
#: lists the wrapped function as a type of its own, so it is checked against the modules above too
TRUSTED_SKOPS_TYPES = ("functools.partial",)


@dataclass
class Predictor:
    """A loaded model with the feature contract it was trained on.

    ``task`` is ``binary``, ``multiclass`` or ``regression`` (an older ``model.json`` saying
    ``classification`` is read as binary); ``classes`` the class labels in the model's order (binary:
    ``[negative, positive]``, ``[0, 1]`` when ``model.json`` names none; empty for regression).
    """

    task: str
    label: str
    features: list[str]
    categorical: dict[str, list[Any]]
    model_format: str
    model: Any
    description: dict[str, Any] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from airflow_mlops.ml.metrics import normalize_task

        self.task = normalize_task(self.task)
        if self.task == "binary" and len(self.classes) != 2:
            self.classes = [0, 1]
        if self.task == "regression":
            self.classes = []

    def frame(self, rows: Any) -> Any:
        """The model's input frame from a DataFrame or a list of dicts: its features, in order,
        categories typed as at training time (unknown values become missing)."""
        import pandas as pd

        if not isinstance(rows, pd.DataFrame):
            return self._frame_of_records(list(rows))
        missing = [c for c in self.features if c not in rows.columns]
        if missing:
            raise self._missing(missing)
        return pd.DataFrame(
            {column: self._column(column, rows[column]) for column in self.features}, index=rows.index
        )

    def _frame_of_records(self, rows: list[dict[str, Any]]) -> Any:
        """:meth:`frame` of a list of dicts, built column by column from the rows' values: no intermediate
        frame of every key (the service calls this for each micro-batch, on the thread all requests wait for)."""
        import pandas as pd

        missing = [c for c in self.features if not any(c in row for row in rows)]
        if missing:
            raise self._missing(missing)
        return pd.DataFrame(
            {column: self._column(column, [row.get(column) for row in rows]) for column in self.features},
            index=pd.RangeIndex(len(rows)),
        )

    def _column(self, name: str, values: Any) -> Any:
        """One feature's values as the model saw them at training: the training categories for a
        categorical one (unknown values become missing), float64 for the others (missing and unparseable
        values become NaN)."""
        import numpy as np
        import pandas as pd

        if name in self.categorical:
            return pd.Categorical(values, categories=self.categorical[name])
        if not isinstance(values, pd.Series):
            try:  # numbers and None: straight to float64, None as NaN
                return np.array(values, dtype="float64")
            except (TypeError, ValueError):
                values = pd.Series(values, dtype="object")
        return pd.to_numeric(values, errors="coerce").astype("float64")

    @staticmethod
    def _missing(missing: list[str]) -> MLOpsInputError:
        return MLOpsInputError(
            f"input lacks the model's feature columns {missing}.",
            fix="pass every feature the model was trained on (see its model.json).",
        )

    def predict(self, rows: Any) -> Any:
        """The model's output for ``rows``, as a NumPy array: ``binary`` P(positive class =
        ``classes[-1]``) per row (1-D); ``multiclass`` an ``(n, K)`` matrix of class probabilities in the
        order of ``classes``; ``regression`` the predicted values (1-D)."""
        import numpy as np

        frame = self.frame(rows)
        if self.task == "regression":
            return np.asarray(self.model.predict(frame), dtype=float)
        if self.model_format == "lightgbm":
            output = np.asarray(self.model.predict(frame), dtype=float)
            if self.task == "binary":
                return output if output.ndim == 1 else output[:, -1]
            return output.reshape(len(frame), len(self.classes))
        proba = np.asarray(self.model.predict_proba(frame), dtype=float)
        matrix = np.zeros((proba.shape[0], len(self.classes)))
        matrix[:, self._columns()] = proba
        return matrix[:, 1] if self.task == "binary" else matrix

    def _columns(self) -> list[int]:
        """Where each of the scikit-learn model's ``classes_`` goes among ``classes``: the built-in
        trainables fit class codes ``0..K-1``; a model fitted on the labels themselves is matched by value."""
        import numpy as np

        fitted = [c.item() if isinstance(c, np.generic) else c for c in getattr(self.model, "classes_", [])]
        k = len(self.classes)
        if not fitted:
            return list(range(k))
        as_codes = self.description.get("label_encoding") == "codes" or all(
            type(c) is int and 0 <= c < k for c in fitted
        )
        if as_codes:
            return [int(c) for c in fitted]
        lookup = {str(c): i for i, c in enumerate(self.classes)}
        missing = [c for c in fitted if str(c) not in lookup]
        if missing:
            raise MLOpsInputError(
                f"the model predicts classes {missing} that its model.json does not list ({self.classes}).",
                fix="write the model's classes into model.json, or retrain with a built-in trainable.",
            )
        return [lookup[str(c)] for c in fitted]


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
        refused = [
            t for t in untrusted if not t.startswith(TRUSTED_SKOPS_MODULES) and t not in TRUSTED_SKOPS_TYPES
        ]
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
        task=description.get("task", "binary"),
        classes=list(description.get("classes") or []),
        label=description.get("label", ""),
        features=list(description.get("features", [])),
        categorical={k: list(v) for k, v in (description.get("categorical") or {}).items()},
        model_format=model_format,
        model=model,
        description=description,
    )
