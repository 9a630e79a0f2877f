"""A registered model's signature: what a request to it carries and what it answers.

Recorded at registration (:class:`~airflow_mlops.operators.registry.RegisterModelOperator`) from the
model's description (task, label, classes, features) and its training snapshot (types, allowed values and
ranges); the Bento service builds its request and response schemas from it, so the OpenAPI document shows
the model's own fields, and the sample client and the monitor read it too.

A request carries the **entity keys** (the Feast join keys of the model's feature service; the online
store is looked up by them) and the **request features** (model features that the feature service does
not provide). The feature service fills in the rest (``store_features``).

The answer, by task: ``binary`` ``{"probability", "label"}`` (probability of the positive class, the last of
``classes``), ``multiclass`` ``{"label", "probabilities": {class: p}}``, ``regression`` ``{"value"}``; always
``model`` and ``model_version``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from airflow_mlops.exceptions import MLOpsInputError

SIGNATURE_VERSION = 1
#: string features with more distinct values than this are recorded without an allowed list
MAX_ALLOWED_VALUES = 200
FieldType = Literal["number", "integer", "string", "boolean"]


class SignatureError(MLOpsInputError):
    """A model has no signature, or one that cannot describe its requests."""


class FieldSpec(BaseModel):
    """One field of a request: its type and, from the training snapshot, its allowed values or range."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: FieldType
    nullable: bool = False
    allowed: list[str] | None = Field(default=None, description="the values seen in training (strings)")
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def accepted_range(self) -> tuple[float, float] | None:
        """The range a request value must fall in: the training range widened by its own width on each
        side (a plausibility check that refuses garbage such as 1e12, not ordinary new values)."""
        if self.minimum is None or self.maximum is None:
            return None
        span = max(self.maximum - self.minimum, abs(self.maximum), abs(self.minimum), 1.0)
        return self.minimum - span, self.maximum + span


class ModelSignature(BaseModel):
    """What a model takes and answers; stored with the registered version (``record["signature"]``)."""

    model_config = ConfigDict(extra="forbid")

    signature_version: int = SIGNATURE_VERSION
    task: Literal["binary", "multiclass", "regression"]
    label: str
    classes: list[Any] = Field(default_factory=list, description="class labels, in the model's order")
    features: list[str] = Field(min_length=1, description="the model's input columns, in order")
    entity_keys: list[FieldSpec] = Field(default_factory=list)
    request_features: list[FieldSpec] = Field(default_factory=list)
    store_features: list[str] = Field(default_factory=list, description="features the feature service fills")
    feature_service: str | None = None

    @field_validator("classes")
    @classmethod
    def _plain(cls, value: list[Any]) -> list[Any]:
        return [v.item() if hasattr(v, "item") else v for v in value]

    @property
    def request_fields(self) -> list[FieldSpec]:
        """Entity keys, then request features (a feature that is also a key appears once)."""
        keys = {f.name for f in self.entity_keys}
        return [*self.entity_keys, *(f for f in self.request_features if f.name not in keys)]

    @property
    def positive_class(self) -> Any:
        return self.classes[-1] if self.classes else 1


def signature_of(record: dict[str, Any], *, tag: str | None = None) -> ModelSignature:
    """The signature recorded with a registry version.

    :raises SignatureError: the version was registered without one (or with one that does not validate).
    """
    raw = record.get("signature")
    name = tag or record.get("tag") or "the model"
    if not raw:
        raise SignatureError(
            f"{name} was registered without a signature, so its requests cannot be described.",
            fix="register it again with RegisterModelOperator and its training_manifest_uri "
            "(the signature is recorded from the training snapshot).",
        )
    try:
        return ModelSignature.model_validate(raw)
    except ValidationError as err:
        raise SignatureError(
            f"the signature recorded with {name} is not valid ({err.error_count()} errors: "
            f"{err.errors(include_url=False)[0]['msg']}).",
            fix="register the model again with RegisterModelOperator.",
        ) from None


def _field_type(series: Any) -> FieldType:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_integer_dtype(series):
        return "integer"
    if pd.api.types.is_numeric_dtype(series):
        return "number"
    return "string"


def field_spec(name: str, series: Any, *, with_allowed: bool = True) -> FieldSpec:
    """A request field described from the training snapshot's column ``series``."""
    kind = _field_type(series)
    nullable = bool(series.isna().any())
    spec: dict[str, Any] = {"name": name, "type": kind, "nullable": nullable}
    non_null = series.dropna()
    if kind in ("number", "integer") and len(non_null):
        low, high = float(non_null.min()), float(non_null.max())
        if math.isfinite(low) and math.isfinite(high):
            spec.update(minimum=low, maximum=high)
    elif kind == "string" and with_allowed:
        values = sorted({str(v) for v in non_null.unique()})
        if len(values) <= MAX_ALLOWED_VALUES:
            spec["allowed"] = values
    return FieldSpec(**spec)


def infer_signature(
    frame: Any,
    *,
    task: str,
    label: str,
    classes: list[Any],
    features: list[str],
    entity_keys: list[str] | None = None,
    store_features: list[str] | None = None,
    feature_service: str | None = None,
) -> ModelSignature:
    """The signature of a model trained on ``frame`` (its training snapshot).

    :param features: the model's input columns (from its ``model.json``).
    :param entity_keys: join keys of the feature service (request fields, looked up in the online store).
    :param store_features: model features the feature service provides; every other feature is a
        request feature.
    :raises SignatureError: a request field is not a column of the snapshot.
    """
    from airflow_mlops.ml.metrics import normalize_task

    keys = list(entity_keys or [])
    provided = set(store_features or [])
    request = [f for f in features if f not in provided and f not in keys]
    absent = [c for c in [*keys, *request] if c not in frame.columns]
    if absent:
        raise SignatureError(
            f"the training snapshot lacks the request fields {absent} (it has {sorted(frame.columns)[:30]}).",
            fix="register the model with the training set it was trained on (training_manifest_uri=).",
        )
    return ModelSignature(
        task=normalize_task(task),
        label=label,
        classes=list(classes),
        features=list(features),
        entity_keys=[field_spec(k, frame[k], with_allowed=False) for k in keys],
        request_features=[field_spec(f, frame[f]) for f in request],
        store_features=[f for f in features if f in provided],
        feature_service=feature_service,
    )


# ------------------------------------------------------------------------------------------ schemas
def _annotation(spec: FieldSpec) -> Any:
    from typing import Annotated

    from pydantic import StringConstraints

    if spec.type == "string":
        base: Any = Annotated[str, StringConstraints(min_length=1, max_length=256)]
        if spec.allowed:
            base = Literal[tuple(spec.allowed)]  # type: ignore[valid-type]
    elif spec.type == "boolean":
        base = bool
    else:
        bounds = spec.accepted_range()
        kwargs: dict[str, Any] = {"allow_inf_nan": False}
        if bounds:
            kwargs.update(ge=bounds[0], le=bounds[1])
        number: type = int if spec.type == "integer" else float
        base = Annotated[number, Field(**kwargs)]
    return base | None if spec.nullable else base


def _describe(spec: FieldSpec, role: str) -> str:
    parts = [spec.description or role]
    if spec.minimum is not None and spec.maximum is not None:
        parts.append(f"training range {spec.minimum:g}..{spec.maximum:g}")
    if spec.nullable:
        parts.append("may be null")
    return "; ".join(parts)


def _openapi_30(schema: dict[str, Any]) -> None:
    """BentoML publishes OpenAPI 3.0: say "nullable" instead of JSON Schema's ``{"type": "null"}``."""
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf")
        if options and {"type": "null"} in options and len(options) == 2:
            prop.pop("anyOf")
            prop.update(next(o for o in options if o != {"type": "null"}), nullable=True)


def _model_name(model: str, suffix: str) -> str:
    return (
        "".join(part.capitalize() for part in model.replace("-", "_").replace(".", "_").split("_")) + suffix
    )


def request_model(signature: ModelSignature, model: str) -> type[BaseModel]:
    """The pydantic model of one request row: the entity keys and request features, typed and bounded."""
    fields: dict[str, Any] = {}
    keys = {f.name for f in signature.entity_keys}
    for spec in signature.request_fields:
        role = "entity key (looked up in the feature store)" if spec.name in keys else "request feature"
        default = None if spec.nullable else ...
        fields[spec.name] = (_annotation(spec), Field(default, description=_describe(spec, role)))
    return create_model(  # type: ignore[call-overload]
        _model_name(model, "Request"),
        __config__=ConfigDict(extra="forbid", json_schema_extra=_openapi_30),
        __doc__=f"One row to score with model {model!r} ({signature.task}).",
        **fields,
    )


def response_model(signature: ModelSignature, model: str) -> type[BaseModel]:
    """The pydantic model of one answer, by task (see the module docstring)."""
    common: dict[str, Any] = {
        "model": (str, Field(description="registry name of the model")),
        "model_version": (str, Field(description="registered version of the model that answered")),
    }
    if signature.task == "binary":
        fields = {
            "probability": (
                float,
                Field(description=f"probability that {signature.label} is {signature.positive_class!r}"),
            ),
            "label": (
                Any,
                Field(
                    description=f"predicted {signature.label} (the positive class when probability >= 0.5)"
                ),
            ),
        }
    elif signature.task == "multiclass":
        fields = {
            "label": (Any, Field(description=f"predicted {signature.label}: the most probable class")),
            "probabilities": (dict[str, float], Field(description="probability of each class")),
        }
    else:
        fields = {"value": (float, Field(description=f"predicted {signature.label}"))}
    return create_model(  # type: ignore[call-overload]
        _model_name(model, "Prediction"),
        __doc__=f"The answer of model {model!r} for one row.",
        **fields,
        **common,
    )


def binary_classes(signature: ModelSignature) -> tuple[Any, Any]:
    """``(negative, positive)`` class of a binary model: its two classes, else 0 and 1. The answer's
    ``label`` is the positive class when its probability is at least 0.5."""
    classes = list(signature.classes)
    negative, positive = (classes + [0, 1])[:2] if len(classes) < 2 else classes[:2]
    return negative, positive


def answers(signature: ModelSignature, prediction: Any) -> list[dict[str, Any]]:
    """The task's answer fields for each row of a model output (see :meth:`Predictor.predict`)."""
    import numpy as np

    if signature.task == "regression":
        return [{"value": float(v)} for v in np.asarray(prediction, dtype=float)]
    classes = list(signature.classes)
    if signature.task == "binary":
        negative, positive = binary_classes(signature)
        return [
            {"probability": float(p), "label": positive if p >= 0.5 else negative}
            for p in np.asarray(prediction, dtype=float)
        ]
    matrix = np.asarray(prediction, dtype=float)
    names = [str(c) for c in classes]
    return [
        {"label": classes[int(row.argmax())], "probabilities": dict(zip(names, map(float, row), strict=True))}
        for row in matrix
    ]


def logged_value(signature: ModelSignature, answer: dict[str, Any]) -> Any:
    """The one value of an answer that prediction drift compares: the probability (binary), the class
    (multiclass), the value (regression)."""
    if signature.task == "binary":
        return answer["probability"]
    if signature.task == "multiclass":
        return answer["label"]
    return answer["value"]
