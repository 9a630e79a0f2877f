"""Model files cannot run code: a skops file needing a callable (``FunctionTransformer`` over
``builtins.exec``) is refused before any of its objects is built, while the models of every built-in
trainable load."""

from __future__ import annotations

import builtins
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airflow_mlops.ml.model_io import (
    UntrustedModelError,
    load_model_dir,
    model_trusted_types,
    refused_skops_types,
)

FEATURES = ["origin", "distance"]


def _frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "origin": pd.Categorical(rng.choice(["EWR", "JFK", "LGA"], n), categories=["EWR", "JFK", "LGA"]),
            "distance": rng.normal(1000, 300, n),
        }
    )


def _model_dir(folder: Path, model, model_file: str = "model.skops") -> Path:
    import skops.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    sio.dump(model, folder / model_file)
    (folder / "model.json").write_text(
        json.dumps(
            {
                "format": "skops",
                "model_file": model_file,
                "task": "binary",
                "label": "delayed",
                "features": FEATURES,
                "categorical": {"origin": ["EWR", "JFK", "LGA"]},
            }
        )
    )
    return folder


def malicious_model(marker: Path):
    """A fitted pipeline whose first step runs ``exec`` on a string of our choosing at ``predict``:
    ``partial(exec, code, {})`` called with the input frame as ``locals``. It passed the old package
    allow-list (``functools.partial`` and ``builtins.*`` were trusted)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

    frame = _frame()
    evil = FunctionTransformer(validate=False)
    pipeline = Pipeline(
        [
            ("evil", evil),
            ("prep", ColumnTransformer([("cat", OrdinalEncoder(), ["origin"])], remainder="passthrough")),
            ("model", LogisticRegression()),
        ]
    ).fit(frame, np.arange(len(frame)) % 2)
    # set after fitting, so building the fixture runs nothing
    evil.func = functools.partial(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')", {})
    return pipeline


def test_a_file_that_runs_exec_at_predict_is_refused_before_any_code_runs(tmp_path):
    marker = tmp_path / "PWNED"
    model_dir = _model_dir(tmp_path / "evil", malicious_model(marker))

    with pytest.raises(UntrustedModelError) as refused:
        load_model_dir(model_dir).predict(_frame(3))

    assert "builtins.exec" in str(refused.value)
    assert "FunctionTransformer(func=...)" in refused.value.fix
    assert not marker.exists()


def test_recorded_types_are_all_that_loading_trusts(tmp_path):
    """A file whose recorded types (from registration) do not cover what it needs now is refused: it was
    swapped after registration, even when the new types would be on the allow-list."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = _frame()
    model = HistGradientBoostingClassifier(max_iter=3, categorical_features="from_dtype").fit(
        frame, np.arange(len(frame)) % 2
    )
    model_dir = _model_dir(tmp_path / "hgb", model)
    needed = model_trusted_types(model_dir / "model.skops")
    assert "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor" in needed

    with pytest.raises(UntrustedModelError, match="not recorded when it was registered"):
        load_model_dir(model_dir, trusted_types=[])
    loaded = load_model_dir(model_dir, trusted_types=needed)
    assert loaded.predict(frame[:5]).shape == (5,)


def test_histgradientboosting_with_categories_keeps_its_check_array_partial_only(tmp_path):
    """HistGradientBoosting with ``categorical_features="from_dtype"`` stores ``partial(check_array, ...)``;
    that partial is allowed because the schema shows it wraps scikit-learn's ``check_array`` and nothing
    else: a partial over another (allowed-looking) scikit-learn function is refused."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer
    from sklearn.utils import validation

    frame = _frame()
    model = HistGradientBoostingClassifier(max_iter=3, categorical_features="from_dtype").fit(
        frame, np.arange(len(frame)) % 2
    )
    needed = model_trusted_types(_model_dir(tmp_path / "hgb", model) / "model.skops")
    assert {"functools.partial", "sklearn.utils.validation.check_array"} <= set(needed)

    other = Pipeline(
        [("f", FunctionTransformer(func=functools.partial(validation.column_or_1d, warn=True))), ("m", model)]
    )
    with pytest.raises(UntrustedModelError, match="column_or_1d"):
        model_trusted_types(_model_dir(tmp_path / "other", other) / "model.skops")


@pytest.mark.parametrize(
    "name",
    [
        "builtins.exec",
        "builtins.eval",
        "builtins.getattr",
        "builtins.type",
        "operator.methodcaller",
        "operator.attrgetter",
        "os.system",
        "subprocess.Popen",
        "numpy.load",
        "numpy.memmap",
        "sklearn.utils.validation.column_or_1d",
        "sklearn.preprocessing._function_transformer._identity",
        "scipy.special.exprel.__call__",
    ],
)
def test_callables_and_types_outside_the_model_allow_list_are_refused(name):
    assert refused_skops_types([name]) == [name]


@pytest.mark.parametrize(
    "name",
    [
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.tree._tree.Tree",
        "numpy.float64",
        "numpy.ndarray",
        "numpy.random.mtrand.RandomState",
        "scipy.sparse._csr.csr_matrix",
    ],
)
def test_model_parts_are_allowed(name):
    assert refused_skops_types([name]) == []
