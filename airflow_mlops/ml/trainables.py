"""Built-in Ray Tune trainables for tabular models: binary, multiclass and regression.

Each trainable is a function ``(config, data)`` run by Tune inside a trial: ``config`` is one sample
of the search space, ``data`` a :class:`~airflow_mlops.ml.dataset.TrainingSet` (train and time-based
validation frames) shipped once through Ray's object store. A trainable reports its validation metrics
with :func:`report`; the boosting trainables report every ``report_every`` boosting rounds so the ASHA
scheduler can stop bad trials early. The last report carries ``final=1`` and a checkpoint holding the
model in a format that does not execute code on load (skops for scikit-learn, LightGBM's native text
model) and a ``model.json`` describing it.

The boosting trainables keep the model of their best iteration, not of their last: they evaluate the
search's metric (``TrainingSet.metric``) on the time-based validation rows every ``report_every``
rounds, report the metrics of the best iteration so far (with ``iterations`` trained and
``best_iteration``), stop when it has not improved for ``early_stopping_rounds`` rounds, and save the
model cut at the best iteration.

Each trainable declares ``tasks`` (the classifiers ``("binary", "multiclass")``, the regressors
``("regression",)``) and ``reported_metrics``; the operator checks that the requested metric fits the
task (:mod:`airflow_mlops.ml.metrics`) and that the trainable reports it before any trial starts. Your
own trainables can do the same. Labels arrive as ``TrainingSet.y_*``: binary 0/1, multiclass the codes
``0..K-1`` of ``TrainingSet.classes``, regression numbers; the metrics are
:func:`airflow_mlops.ml.metrics.scores` (binary ``auc``, ``logloss``, ``accuracy``, ``macro_f1``;
multiclass the same without ``auc``; regression ``rmse``, ``mae``, ``r2``).

Config keys understood by all: ``seed``. Per trainable:

- ``hist_gradient_boosting_*``: ``max_iter`` (200), ``learning_rate`` (0.1), ``max_leaf_nodes`` (31),
  ``min_samples_leaf`` (20), ``l2_regularization`` (0.0), ``max_bins`` (255), ``report_every`` (10),
  ``early_stopping_rounds`` (30; 0 or null: train all ``max_iter``)
- ``lightgbm_*``: ``num_boost_round`` (200), ``learning_rate`` (0.1), ``num_leaves`` (31),
  ``min_child_samples`` (20), ``feature_fraction`` (1.0), ``bagging_fraction`` (1.0), ``lambda_l2`` (0.0),
  ``report_every`` (10), ``early_stopping_rounds`` (30; 0 or null: train all ``num_boost_round``)
- ``logistic_regression``: ``C`` (1.0), ``max_iter`` (1000); ``linear_regression``: ``alpha`` (ridge, 0.0)
- ``random_forest_*``: ``n_estimators`` (100), ``max_depth`` (None), ``min_samples_leaf`` (1),
  ``max_features`` ("sqrt")
- ``sleep``: ``seconds`` (1.0), ``score`` (0.0): no model, for measuring Tune's per-trial overhead
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_mlops.ml.metrics import DEFAULT_METRIC, METRIC_MODES, METRICS

if TYPE_CHECKING:
    from airflow_mlops.ml.dataset import TrainingSet

#: the metrics the classifiers report (binary: all four; multiclass: all but auc)
CLASSIFICATION_METRICS = ("auc", "logloss", "accuracy", "macro_f1")
#: the metrics the regressors report
REGRESSION_METRICS = ("rmse", "mae", "r2")
#: the tasks the classifiers train
CLASSIFICATION_TASKS = ("binary", "multiclass")
#: default patience of the boosting trainables, in boosting rounds
EARLY_STOPPING_ROUNDS = 30


def _declare(tasks: tuple[str, ...], metrics: tuple[str, ...]) -> Callable[[Callable], Callable]:
    def mark(fn: Callable) -> Callable:
        fn.tasks = tasks  # type: ignore[attr-defined]
        fn.reported_metrics = metrics  # type: ignore[attr-defined]
        return fn

    return mark


def declared_tasks(fn: Any) -> tuple[str, ...] | None:
    """The tasks a trainable declares (``fn.tasks``, or the older single ``fn.task``); None: any task."""
    from airflow_mlops.ml.metrics import normalize_task

    tasks = getattr(fn, "tasks", None)
    if tasks is None:
        single = getattr(fn, "task", None)
        tasks = (single,) if single else None
    if not tasks or "any" in tasks:
        return None
    return tuple(dict.fromkeys(normalize_task(t) for t in tasks))


def scores(task: str, y_true: Any, prediction: Any, *, n_classes: int | None = None) -> dict[str, float]:
    """Validation metrics of ``task`` (see :func:`airflow_mlops.ml.metrics.scores`)."""
    from airflow_mlops.ml import metrics

    return metrics.scores(task, y_true, prediction, n_classes=n_classes)


def report(
    metrics: dict[str, Any], *, model_files: dict[str, bytes] | None = None, meta: dict | None = None
) -> None:
    """Report one result to Tune; with ``model_files`` it is the final one and carries a checkpoint."""
    from ray import tune

    if model_files is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="mlops-ckpt-") as folder:
        for name, blob in model_files.items():
            (Path(folder) / name).write_bytes(blob)
        (Path(folder) / "model.json").write_text(json.dumps(meta or {}, indent=2, default=str))
        tune.report({**metrics, "final": 1}, checkpoint=tune.Checkpoint.from_directory(folder))


class BestIteration:
    """The best validation result of a boosting run so far, and when to stop it (early stopping).

    The metric is the search's (``data.metric``) when it is a built-in metric of the task, else the
    task's default (``auc`` / ``macro_f1`` / ``rmse``).
    """

    def __init__(self, data: TrainingSet, config: dict) -> None:
        metric = data.metric
        if metric not in METRICS or data.task not in METRICS[metric].tasks:
            metric = DEFAULT_METRIC[data.task]
        self.metric = metric
        self.sign = 1.0 if METRIC_MODES[metric] == "max" else -1.0
        patience = config.get("early_stopping_rounds", EARLY_STOPPING_ROUNDS)
        self.patience = int(patience) if patience else 0
        self.best: dict[str, float] | None = None
        self.best_iteration = 0

    def update(self, metrics: dict[str, float], iteration: int) -> bool:
        """Record the metrics after ``iteration`` rounds; True when they are the best so far."""
        if self.best is not None and self.sign * metrics[self.metric] <= self.sign * self.best[self.metric]:
            return False
        self.best, self.best_iteration = dict(metrics), iteration
        return True

    def should_stop(self, iteration: int) -> bool:
        return bool(self.patience) and iteration - self.best_iteration >= self.patience

    def result(self, iteration: int) -> dict[str, Any]:
        """What to report: the best iteration's metrics, the rounds trained, the best iteration."""
        return {**(self.best or {}), "iterations": iteration, "best_iteration": self.best_iteration}


def _meta(data: TrainingSet, library: str, model_file: str, config: dict) -> dict[str, Any]:
    import importlib.metadata as md

    return {
        "format": library,
        "model_file": model_file,
        "task": data.task,
        "label": data.label,
        "classes": list(data.classes),
        # the model was fitted on class codes 0..K-1 of ``classes`` (binary: 1 = classes[1])
        **({"label_encoding": "codes"} if data.classes else {}),
        "features": data.features,
        "categorical": {c: data.categories[c] for c in data.categorical},
        "config": config,
        "library_version": md.version("lightgbm" if library == "lightgbm" else "scikit-learn"),
    }


def _skops_report(model: Any, data: TrainingSet, config: dict, metrics: dict[str, Any]) -> None:
    import skops.io as sio

    report(
        metrics,
        model_files={"model.skops": sio.dumps(model)},
        meta={
            **_meta(data, "skops", "model.skops", config),
            **({"iterations": metrics["best_iteration"]} if "best_iteration" in metrics else {}),
        },
    )


def _predict(data: TrainingSet, model: Any, x: Any) -> Any:
    """What :func:`scores` takes: P(class 1) (binary), the ``(n, K)`` class probabilities (multiclass,
    a column of zeros for a class the training rows lacked), the values (regression)."""
    import numpy as np

    if data.task == "regression":
        return model.predict(x)
    proba = model.predict_proba(x)
    matrix = np.zeros((proba.shape[0], len(data.classes)))
    matrix[:, np.asarray(model.classes_, dtype=int)] = proba
    return matrix[:, 1] if data.task == "binary" else matrix


def _score(data: TrainingSet, prediction: Any) -> dict[str, float]:
    return scores(data.task, data.y_valid, prediction, n_classes=len(data.classes) or None)


def _encoder(data: TrainingSet, one_hot: bool):
    """Column preprocessing fitted on the training frame: categories encoded, numbers imputed."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    categories = [data.categories[c] for c in data.categorical]
    if one_hot:
        cat = OneHotEncoder(categories=categories, handle_unknown="ignore")
        num: Any = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    else:
        cat = OrdinalEncoder(
            categories=categories,
            handle_unknown="use_encoded_value",
            unknown_value=np.nan,
            encoded_missing_value=np.nan,
        )
        num = "passthrough"
    steps = []
    if data.categorical:
        steps.append(("cat", cat, list(data.categorical)))
    numeric = [c for c in data.features if c not in data.categorical]
    if numeric:
        steps.append(("num", num, numeric))
    return ColumnTransformer(steps, sparse_threshold=0.0, verbose_feature_names_out=False)


def _hist_gradient_boosting(config: dict, data: TrainingSet) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.pipeline import Pipeline

    prep = _encoder(data, one_hot=False)
    x_train = prep.fit_transform(data.x_train)
    x_valid = prep.transform(data.x_valid)
    cls = HistGradientBoostingRegressor if data.task == "regression" else HistGradientBoostingClassifier
    model = cls(
        max_iter=1,
        learning_rate=float(config.get("learning_rate", 0.1)),
        max_leaf_nodes=int(config.get("max_leaf_nodes", 31)),
        min_samples_leaf=int(config.get("min_samples_leaf", 20)),
        l2_regularization=float(config.get("l2_regularization", 0.0)),
        max_bins=int(config.get("max_bins", 255)),
        categorical_features=[i < len(data.categorical) for i in range(x_train.shape[1])],
        early_stopping=False,
        warm_start=True,
        random_state=config.get("seed"),
    )
    total = int(config.get("max_iter", 200))
    every = max(1, int(config.get("report_every", 10)))
    tracker = BestIteration(data, config)
    best_model = model
    done = 0
    while done < total:
        done = min(total, done + every)
        model.set_params(max_iter=done)
        model.fit(x_train, data.y_train)
        if tracker.update(_score(data, _predict(data, model, x_valid)), done):
            best_model = copy.deepcopy(model)  # warm start keeps adding trees to `model`
        if done >= total or tracker.should_stop(done):
            break
        report(tracker.result(done))
    best_model.set_params(warm_start=False)
    _skops_report(Pipeline([("prep", prep), ("model", best_model)]), data, config, tracker.result(done))


@_declare(CLASSIFICATION_TASKS, CLASSIFICATION_METRICS)
def hist_gradient_boosting_classifier(config: dict, data: TrainingSet) -> None:
    """scikit-learn HistGradientBoostingClassifier, reporting every ``report_every`` iterations."""
    _hist_gradient_boosting(config, data)


@_declare(("regression",), REGRESSION_METRICS)
def hist_gradient_boosting_regressor(config: dict, data: TrainingSet) -> None:
    """scikit-learn HistGradientBoostingRegressor, reporting every ``report_every`` iterations."""
    _hist_gradient_boosting(config, data)


def _lightgbm(config: dict, data: TrainingSet) -> None:
    import lightgbm as lgb

    objective = {"binary": "binary", "multiclass": "multiclass", "regression": "regression"}[data.task]
    params = {
        "objective": objective,
        **({"num_class": len(data.classes)} if data.task == "multiclass" else {}),
        "metric": "None",
        "learning_rate": float(config.get("learning_rate", 0.1)),
        "num_leaves": int(config.get("num_leaves", 31)),
        "min_child_samples": int(config.get("min_child_samples", 20)),
        "feature_fraction": float(config.get("feature_fraction", 1.0)),
        "bagging_fraction": float(config.get("bagging_fraction", 1.0)),
        "bagging_freq": 1 if float(config.get("bagging_fraction", 1.0)) < 1.0 else 0,
        "lambda_l2": float(config.get("lambda_l2", 0.0)),
        "num_threads": 1,
        "verbosity": -1,
        "seed": int(config.get("seed") or 0),
    }
    total = int(config.get("num_boost_round", 200))
    every = max(1, int(config.get("report_every", 10)))
    train = lgb.Dataset(
        data.x_train,
        label=data.y_train,
        categorical_feature=list(data.categorical) or "auto",
        free_raw_data=False,
    )
    tracker = BestIteration(data, config)
    trained = [0]

    def evaluate(env: Any) -> None:
        done = trained[0] = env.iteration + 1
        if done % every and done < total:
            return
        prediction = env.model.predict(data.x_valid, num_iteration=done)
        tracker.update(_score(data, prediction), done)
        if done >= total:
            return
        if tracker.should_stop(done):
            # lgb.train ends here; the model is cut at the best iteration below
            raise lgb.callback.EarlyStopException(tracker.best_iteration - 1, [])
        report(tracker.result(done))

    booster = lgb.train(params, train, num_boost_round=total, callbacks=[evaluate])
    report(
        tracker.result(trained[0]),
        model_files={"model.txt": booster.model_to_string(num_iteration=tracker.best_iteration).encode()},
        meta={**_meta(data, "lightgbm", "model.txt", config), "iterations": tracker.best_iteration},
    )


@_declare(CLASSIFICATION_TASKS, CLASSIFICATION_METRICS)
def lightgbm_classifier(config: dict, data: TrainingSet) -> None:
    """LightGBM classifier (``binary`` objective, or ``multiclass`` with ``num_class``), reporting every
    ``report_every`` boosting rounds."""
    _lightgbm(config, data)


@_declare(("regression",), REGRESSION_METRICS)
def lightgbm_regressor(config: dict, data: TrainingSet) -> None:
    """LightGBM regressor, reporting every ``report_every`` boosting rounds."""
    _lightgbm(config, data)


def _fit_once(model: Any, config: dict, data: TrainingSet, one_hot: bool) -> None:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    steps = [("prep", _encoder(data, one_hot=one_hot))]
    if not one_hot:
        steps.append(("impute", SimpleImputer(strategy="median", keep_empty_features=True)))
    pipeline = Pipeline([*steps, ("model", model)])
    pipeline.fit(data.x_train, data.y_train)
    metrics = {
        **_score(data, _predict(data, pipeline, data.x_valid)),
        "iterations": 1,
    }
    _skops_report(pipeline, data, config, metrics)


@_declare(CLASSIFICATION_TASKS, CLASSIFICATION_METRICS)
def logistic_regression(config: dict, data: TrainingSet) -> None:
    """Logistic regression (multinomial for three or more classes) on one-hot categories and standardised
    numbers."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=float(config.get("C", 1.0)), max_iter=int(config.get("max_iter", 1000)))
    _fit_once(model, config, data, one_hot=True)


@_declare(("regression",), REGRESSION_METRICS)
def linear_regression(config: dict, data: TrainingSet) -> None:
    """Linear regression (ridge with ``alpha``; 0 is ordinary least squares)."""
    from sklearn.linear_model import LinearRegression, Ridge

    alpha = float(config.get("alpha", 0.0))
    _fit_once(Ridge(alpha=alpha) if alpha > 0 else LinearRegression(), config, data, one_hot=True)


def _forest(cls: Any, config: dict, data: TrainingSet) -> None:
    depth = config.get("max_depth")
    model = cls(
        n_estimators=int(config.get("n_estimators", 100)),
        max_depth=int(depth) if depth is not None else None,
        min_samples_leaf=int(config.get("min_samples_leaf", 1)),
        max_features=config.get("max_features", "sqrt"),
        random_state=config.get("seed"),
        n_jobs=1,
    )
    _fit_once(model, config, data, one_hot=False)


@_declare(CLASSIFICATION_TASKS, CLASSIFICATION_METRICS)
def random_forest_classifier(config: dict, data: TrainingSet) -> None:
    """scikit-learn RandomForestClassifier."""
    from sklearn.ensemble import RandomForestClassifier

    _forest(RandomForestClassifier, config, data)


@_declare(("regression",), REGRESSION_METRICS)
def random_forest_regressor(config: dict, data: TrainingSet) -> None:
    """scikit-learn RandomForestRegressor."""
    from sklearn.ensemble import RandomForestRegressor

    _forest(RandomForestRegressor, config, data)


@_declare(("any",), ("score",))
def sleep(config: dict, data: TrainingSet) -> None:
    """Sleep ``seconds`` and report ``score``: no model; measures Tune's per-trial overhead."""
    time.sleep(float(config.get("seconds", 1.0)))
    from ray import tune

    tune.report({"score": float(config.get("score", 0.0)), "iterations": 1, "final": 1})


BUILTINS = (
    "hist_gradient_boosting_classifier",
    "hist_gradient_boosting_regressor",
    "lightgbm_classifier",
    "lightgbm_regressor",
    "logistic_regression",
    "linear_regression",
    "random_forest_classifier",
    "random_forest_regressor",
    "sleep",
)
