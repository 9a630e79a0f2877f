"""Batch scoring: a registered model's answers for every row of a table, as a table.

Task code (no Airflow): :class:`~airflow_mlops.operators.batch_scoring.BatchScoringOperator` reads the
window's partitions of the offline store, loads the model through the registry and calls
:func:`score_frame` on each day, in this process or spread over Ray's workers with
:func:`score_on_ray` when the window is large.

The answers are the service's (:func:`airflow_mlops.ml.signature.answers`), so a row scored here gets the
same prediction as the same row sent to ``/predict``. Columns added to the carried input columns:

* ``binary``: ``prediction`` (the class) and ``probability`` (of the positive class, ``classes[-1]``);
* ``multiclass``: ``prediction`` (the class) and ``probability_<class>`` per class;
* ``regression``: ``prediction`` (the value);
* always ``model`` and ``model_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from airflow_mlops.ml.model_io import Predictor
    from airflow_mlops.ml.signature import ModelSignature


def answer_column_names(signature: ModelSignature) -> list[str]:
    """The columns scoring adds for a model of ``signature``'s task, in order."""
    if signature.task == "regression":
        names = ["prediction"]
    elif signature.task == "binary":
        names = ["prediction", "probability"]
    else:
        names = ["prediction", *(f"probability_{c}" for c in signature.classes)]
    return [*names, "model", "model_version"]


def carried_columns(
    signature: ModelSignature, columns: Sequence[str], extra: Sequence[str] = ()
) -> list[str]:
    """Input columns the scored table keeps: the model's entity keys and request features, then ``extra``
    (e.g. a row id or the event time), each once, in that order; only those the input has."""
    wanted = [*(f.name for f in signature.request_fields), *extra]
    present = set(columns)
    return [c for c in dict.fromkeys(wanted) if c in present]


def score_frame(
    predictor: Predictor,
    signature: ModelSignature,
    frame: pd.DataFrame,
    *,
    carry: Sequence[str],
    model: str,
    version: str,
) -> pd.DataFrame:
    """The model's answers for every row of ``frame`` (which holds the model's features), with the
    ``carry`` columns of ``frame`` in front.

    :raises MLOpsInputError: ``frame`` lacks a feature of the model (from :meth:`Predictor.frame`).
    """
    import numpy as np
    import pandas as pd

    from airflow_mlops.ml.signature import binary_classes

    out = frame[list(carry)].reset_index(drop=True)
    if frame.empty:
        return out.assign(**{c: pd.Series(dtype="object") for c in answer_column_names(signature)})
    # the answers of ml.signature.answers (what the service returns), a column at a time
    output = np.asarray(predictor.predict(frame), dtype="float64")
    columns: dict[str, Any] = {}
    if signature.task == "regression":
        columns["prediction"] = output
    elif signature.task == "binary":
        negative, positive = binary_classes(signature)
        columns["prediction"] = (
            pd.Series([positive, negative], dtype="object").take(np.where(output >= 0.5, 0, 1)).to_list()
        )
        columns["probability"] = output
    else:
        classes = pd.Series(list(signature.classes), dtype="object")
        columns["prediction"] = classes.take(output.argmax(axis=1)).to_list()
        for k, name in enumerate(str(c) for c in signature.classes):
            columns[f"probability_{name}"] = output[:, k]
    columns["model"] = model
    columns["model_version"] = version
    return out.assign(**columns)


def split_rows(frame: pd.DataFrame, chunk_rows: int) -> list[pd.DataFrame]:
    """``frame`` in consecutive pieces of at most ``chunk_rows`` rows."""
    return [frame.iloc[i : i + chunk_rows] for i in range(0, len(frame), max(1, chunk_rows))] or [frame]


def score_on_ray(
    predictor: Predictor,
    signature: ModelSignature,
    frames: Sequence[pd.DataFrame],
    *,
    carry: Sequence[str],
    model: str,
    version: str,
) -> list[pd.DataFrame]:
    """:func:`score_frame` of each of ``frames`` as Ray tasks, in the order given (Ray must be running).

    The loaded model goes to Ray's object store once and every task reads it from there: the workers
    never open a model file, so only the verified model the caller loaded is ever used.
    """
    import ray

    @ray.remote(num_cpus=1)
    def score(predictor: Any, frame: Any) -> Any:
        from threadpoolctl import threadpool_limits

        # one task per CPU: a model's own OpenMP team per task would only fight the other tasks
        with threadpool_limits(limits=1, user_api="openmp"):
            return score_frame(predictor, signature, frame, carry=carry, model=model, version=version)

    shared = ray.put(predictor)
    return ray.get([score.remote(shared, frame) for frame in frames])
