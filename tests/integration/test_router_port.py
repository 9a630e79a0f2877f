"""A deployment's router on a port another router holds: the deploy fails naming the port, and never takes
the other router's answers for its own (two state folders, e.g. two demos, once shared port 3900 that way:
the second deploy "succeeded" while the first one's model answered)."""

from __future__ import annotations

import os
import time

import pytest

from airflow_mlops.exceptions import ServingError
from airflow_mlops.net import free_port


@pytest.fixture
def target(monkeypatch, tmp_path):
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.serving import LocalDeploymentTarget

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    return LocalDeploymentTarget(BentoMLHook())


def test_a_router_on_a_port_another_router_holds_fails_the_deploy(target):
    from airflow_mlops.operators.serving import identify, stop_tree

    port = free_port()
    first = {"name": "first_model"}
    router = target.ensure_router(first, port)
    try:
        started = time.monotonic()
        with pytest.raises(ServingError, match=rf"did not start on port {port}") as failed:
            target.ensure_router({"name": "second_model"}, port)
        assert "free the port" in str(failed.value)
        assert time.monotonic() - started < 25  # the second router's exit is seen, not waited out
        # the first router still serves its own routes
        assert target.router_status(router)["pid"] == router["pid"]
        # a live process recorded as a router is not taken for the one answering at its address
        me = {**router, "pid": os.getpid(), "process": identify(os.getpid())}
        assert target.router_status(me) is None
    finally:
        stop_tree(router, timeout=5)
