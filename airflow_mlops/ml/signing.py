"""HMAC-SHA256 signatures of the registry's records and of Ray Tune's saved state.

Pure functions over bytes and JSON, used where Airflow may not be (the model server, a Ray Job): the
key itself is resolved by :func:`airflow_mlops.hooks.bentoml.registry_signing_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

#: the prefix of every signature we write, so a future algorithm can be told apart
ALGORITHM = "hmac-sha256"


def canonical(payload: Any) -> bytes:
    """The bytes that are signed: JSON with sorted keys and no spaces (the same on every machine)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(key: bytes, payload: Any) -> str:
    """``hmac-sha256:<hex>`` of ``payload`` under ``key``."""
    return f"{ALGORITHM}:{hmac.new(key, canonical(payload), hashlib.sha256).hexdigest()}"


def verify(key: bytes, payload: Any, signature: str | None) -> bool:
    """Whether ``signature`` is :func:`sign` of ``payload`` under ``key`` (constant-time compare)."""
    if not signature or not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(key, payload).encode(), signature.encode())


def derive(key: bytes, purpose: str) -> bytes:
    """A key for one ``purpose`` (e.g. one search's tune state): knowing it forges nothing else."""
    return hmac.new(key, f"airflow-mlops:{purpose}".encode(), hashlib.sha256).digest()
