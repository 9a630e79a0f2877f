"""Send real rows of a data set to a served model: the reference train DAG's last step and the demo use it."""

from __future__ import annotations

from typing import Any

from airflow_mlops.artifacts import as_path


def _plain(value: Any) -> Any:
    """A JSON value: NumPy scalars to Python, missing to None, timestamps to ISO 8601."""
    import pandas as pd

    if value is None or (not isinstance(value, str | bytes) and pd.isna(value)):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else value


def request_rows(data_uri: str, signature: Any, model: str, rows: int) -> list[dict[str, Any]]:
    """``rows`` rows of the data set at ``data_uri`` (a training or holdout set), spread over it, as request
    rows of ``signature`` with their true label (``actual``, None when the set has no label column).

    Only rows the model's request schema accepts are taken: every non-nullable request field present, and
    values the schema allows (a category unseen in training would be refused with a 400).
    """
    import pandas as pd
    from pydantic import ValidationError

    from airflow_mlops.exceptions import MLOpsInputError
    from airflow_mlops.ml.signature import request_model

    fields = signature.request_fields
    names = [f.name for f in fields]
    with as_path(data_uri).open("rb") as handle:
        frame = pd.read_parquet(handle)
    absent = [n for n in names if n not in frame.columns]
    if absent:
        raise MLOpsInputError(
            f"{data_uri!r} lacks the request fields {absent} of model {model!r}.",
            fix="send rows of the model's training or holdout set.",
        )
    frame = frame.dropna(subset=[f.name for f in fields if not f.nullable])
    schema = request_model(signature, model)
    step = max(1, len(frame) // max(1, rows))
    order = list(range(0, len(frame), step)) + [i for i in range(len(frame)) if i % step]
    label = signature.label if signature.label in frame.columns else None
    chosen: list[dict[str, Any]] = []
    for i in order:
        record = frame.iloc[i]
        row = {n: _plain(record[n]) for n in names}
        try:
            schema.model_validate(row)
        except ValidationError:
            continue
        chosen.append({"row": row, "actual": _plain(record[label]) if label else None})
        if len(chosen) >= rows:
            break
    if not chosen:
        raise MLOpsInputError(
            f"no row of {data_uri!r} is a valid request of model {model!r} (fields {names}).",
            fix="send rows of the model's training or holdout set.",
        )
    return chosen


def sample_predictions(
    url: str,
    data_uri: str,
    model: str,
    rows: int = 20,
    api_key: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """POST ``rows`` real rows of ``data_uri`` to ``<url>/predict`` as ``{"row": {...}}``.

    The request fields come from the signature of ``model`` in the registry (``version``, default its
    production version). Returns the answers with the versions that gave them; each answer carries the row
    sent (``row``) and its true label (``actual``) when the data set has one.

    :param url: the deployment's address.
    :param data_uri: a training or holdout set (parquet) of the model.
    :param model: registry name of the served model.
    :param rows: how many rows to send.
    :param api_key: the endpoint's API key, if it has one.
    :param version: registered version whose signature to use; default the production version.
    """
    import httpx

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.signature import signature_of

    hook = BentoMLHook()
    version, record = hook.served_record(model, version)
    signature = signature_of(record, tag=record.get("tag"))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers = []
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        for request in request_rows(data_uri, signature, model, int(rows)):
            response = client.post("/predict", json={"row": request["row"]})
            response.raise_for_status()
            answers.append({**response.json(), "row": request["row"], "actual": request["actual"]})
    versions = sorted({a.get("model_version") for a in answers})
    return {
        "url": url,
        "model": model,
        "task": signature.task,
        "label": signature.label,
        "requests": len(answers),
        "versions": versions,
        "answers": answers,
    }
