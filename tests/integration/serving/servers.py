"""Start real ``bentoml serve`` processes of registered models (the deploy operator's local backends) and
wait until they are ready; several start at once, since the imports take most of the time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx


def start_backends(specs: list[dict[str, Any]], timeout: float = 240) -> list[dict[str, Any]]:
    """Start one backend per ``spec`` (``model``, ``version``, optional ``env``) with
    :meth:`LocalDeploymentTarget.start`; returns them once each ``/ready`` says ready (or, for a spec with
    ``refused=True``, once it says why it will not serve).

    :raises AssertionError: a backend died or did not become ready in time (with its log).
    """
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.serving import LocalDeploymentTarget, process_alive, stop_tree

    target = LocalDeploymentTarget(BentoMLHook())
    backends = [target.start({"deployment": s["model"], "bento": None, **s}) for s in specs]
    deadline = time.monotonic() + timeout
    waiting = list(backends)
    try:
        while waiting:
            backend = waiting[0]
            body: dict[str, Any] = {}
            try:
                body = httpx.get(backend["url"] + "/ready", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                pass
            if body.get("ready") or (body.get("error") and backend.get("refused")):
                waiting.pop(0)
                continue
            log = (
                Path(backend["log"]).read_text(errors="replace")[-3000:]
                if Path(backend["log"]).exists()
                else ""
            )
            assert not body.get("error"), f"{backend['model']} is not served: {body['error']}\n{log}"
            assert process_alive(backend), f"{backend['model']} died:\n{log}"
            assert time.monotonic() < deadline, f"{backend['model']} not ready in {timeout} s:\n{log}"
            time.sleep(0.5)
    except BaseException:
        for backend in backends:
            stop_tree(backend, timeout=15)
        raise
    return backends


def stop_backends(backends: list[dict[str, Any]]) -> None:
    from airflow_mlops.operators.serving import stop_tree

    for backend in backends:
        stop_tree(backend, timeout=15)
