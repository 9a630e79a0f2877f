"""Load a model directory written by the tuning stage, without executing code from the file.

A model directory holds ``model.json`` (format, model file, task, label, classes, features, categories)
and the model file itself: a skops file for scikit-learn pipelines or LightGBM's native text model
(never pickle).

A skops file names the types it needs. skops itself trusts plain data, NumPy/SciPy ufuncs and public
scikit-learn estimators; every other type it lists must be on this module's allow-list
(:func:`refused_skops_types`): scikit-learn classes, NumPy scalar/dtype/array/random-state classes,
SciPy sparse matrices, and ``functools.partial`` only around scikit-learn's own ``check_array``.
Functions, methods and ``operator`` callables are never allowed: they are how a crafted file runs
code (``FunctionTransformer(func=builtins.exec)`` runs at ``predict``). The registry records the exact
list at registration (:func:`model_trusted_types`) and :func:`load_model_dir` passes exactly that list
to ``skops.io.load``; a file needing anything else is refused before any of its objects is built.
The registry also checks the file's sha256 and the record's HMAC before loading (see
:class:`airflow_mlops.hooks.bentoml.BentoMLHook`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_mlops.exceptions import MLOpsInputError

MODEL_DESCRIPTION = "model.json"
#: functions a skops model file may reference, only as the target of a ``functools.partial``:
#: HistGradientBoosting with categorical features keeps ``partial(check_array, ...)`` in its preprocessor
PARTIAL_TARGETS = frozenset({"sklearn.utils.validation.check_array"})
#: plain data types of the standard library a model may hold beyond those skops trusts itself
PLAIN_TYPES = frozenset(
    {"builtins.slice", "builtins.complex", "builtins.bytes", "builtins.bytearray", "builtins.frozenset"}
)
#: module prefixes whose *classes* (never functions) are checked further by :func:`_allowed_class`
_CLASS_MODULES = ("sklearn", "numpy", "scipy.sparse")


class UntrustedModelError(MLOpsInputError):
    """A model file needs a type that could run code when loaded or used; it is never loaded."""


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


def _resolve(name: str) -> Any:
    """The object a dotted type name refers to, importing only modules of scikit-learn, NumPy or SciPy."""
    module_name, _, attr = name.rpartition(".")
    if not any(module_name == m or module_name.startswith(f"{m}.") for m in _CLASS_MODULES):
        return None
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj


def _allowed_class(name: str) -> bool:
    """Whether ``name`` is a class a model may hold: any scikit-learn class (estimators and their parts:
    trees, losses, binners), NumPy scalar, dtype, array and random-state classes, SciPy sparse matrices."""
    obj = _resolve(name)
    if not inspect.isclass(obj):
        return False  # functions, ufunc-like callables, unknown names
    if name.startswith("sklearn."):
        return obj.__module__.startswith("sklearn.")
    if name.startswith("numpy"):
        import numpy as np

        bases = (np.generic, np.dtype, np.ndarray, np.random.RandomState, np.random.Generator)
        return issubclass(obj, bases) and not issubclass(obj, np.memmap)
    from scipy import sparse

    return issubclass(obj, (sparse.spmatrix, sparse.sparray))


def refused_skops_types(types: Iterable[str]) -> list[str]:
    """The types among ``types`` (as ``skops.io.get_untrusted_types`` names them) that a model may not
    need: anything but the allow-list described in the module docstring."""
    refused = []
    for name in types:
        if name in PLAIN_TYPES or name in PARTIAL_TARGETS or name == "functools.partial":
            continue
        if not _allowed_class(name):
            refused.append(name)
    return refused


def _partial_targets(model_file: Path) -> list[str]:
    """What each ``functools.partial`` in the skops file wraps, read from the file's schema."""
    with zipfile.ZipFile(model_file) as archive:
        schema = json.loads(archive.read("schema.json"))
    targets: list[str] = []
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("__loader__") == "PartialNode" or (
                node.get("__module__") == "functools" and node.get("__class__") == "partial"
            ):
                func = (node.get("content") or {}).get("func") or {}
                named = f"{func.get('__module__')}.{func.get('__class__')}"
                targets.append(named if func.get("__loader__") == "FunctionNode" else f"<{named} object>")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return targets


def model_trusted_types(model_file: Path | str) -> list[str]:
    """The exact types beyond skops' own defaults that ``model_file`` needs, after checking each against
    the allow-list; this is what the registry records and what loading passes as ``trusted``.

    :raises UntrustedModelError: naming each refused type (nothing of the file is built).
    """
    import skops.io as sio

    model_file = Path(model_file)
    try:
        needed = sorted(sio.get_untrusted_types(file=model_file))
    except Exception as err:  # not a zip, no schema, unknown protocol
        raise UntrustedModelError(
            f"model file {str(model_file)!r} is not a readable skops file ({type(err).__name__}: {err}).",
            fix="register models written by RayTuneOperator (skops.io.dump of a scikit-learn pipeline).",
        ) from err
    refused = refused_skops_types(needed)
    if "functools.partial" in needed:
        refused += [t for t in _partial_targets(model_file) if t not in PARTIAL_TARGETS]
    if refused:
        raise UntrustedModelError(
            f"model file {str(model_file)!r} needs types that can run code or are not on the model "
            f"allow-list: {sorted(set(refused))}; refusing it before anything in it is built.",
            fix="save models made only of scikit-learn estimators and NumPy/SciPy data (no functions such "
            "as FunctionTransformer(func=...), no other libraries), or LightGBM's text format; the "
            "built-in trainables always do.",
        )
    return needed


def load_model_dir(model_dir: Path | str, trusted_types: Sequence[str] | None = None) -> Predictor:
    """Load the model in ``model_dir`` (skops or LightGBM text; no pickle).

    :param trusted_types: for a skops file, the types recorded at registration; the file must need no
        other, and each must still be on the allow-list. None (a model outside the registry): the types
        the file needs, checked against the allow-list.
    :raises UntrustedModelError: the file needs a type that is not recorded or not allowed.
    """
    model_dir = Path(model_dir)
    description = read_description(model_dir)
    model_format = description.get("format")
    model_file = model_dir / str(description.get("model_file", ""))
    if model_format == "skops":
        import skops.io as sio

        needed = model_trusted_types(model_file)
        if trusted_types is not None:
            unrecorded = sorted(set(needed) - set(trusted_types))
            if unrecorded:
                raise UntrustedModelError(
                    f"model file {str(model_file)!r} needs types {unrecorded} that were not recorded when it "
                    "was registered; refusing to load it.",
                    fix="the file was replaced after registration: re-register the model from its training run.",
                )
            refused = refused_skops_types(trusted_types)
            if refused:
                raise UntrustedModelError(
                    f"the registry record of {str(model_file)!r} trusts types {refused} that are not on the "
                    "model allow-list; refusing to load it.",
                    fix="re-register the model from its training run.",
                )
        model = sio.load(model_file, trusted=list(needed if trusted_types is None else trusted_types))
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
