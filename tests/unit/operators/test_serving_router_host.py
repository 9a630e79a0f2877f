"""``[mlops] serving_router_host``: the address a deployment's router (its stable endpoint) listens on and
is announced at. By default 127.0.0.1 (this host only, as before); on a serving host of its own
(docs/scaling.md) its address, so that other hosts reach the endpoint."""

from __future__ import annotations

import socket

import httpx
import pytest

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.net import free_port
from airflow_mlops.operators.serving import LocalDeploymentTarget, stop_tree


@pytest.fixture
def target(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    routers = []
    local = LocalDeploymentTarget(BentoMLHook())

    def start(name: str) -> dict:
        router = local.ensure_router({"name": name}, free_port())
        routers.append(router)
        return router

    yield start
    for router in routers:
        stop_tree(router, timeout=5)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_the_router_listens_on_this_host_only_by_default(target, monkeypatch):
    monkeypatch.delenv("AIRFLOW__MLOPS__SERVING_ROUTER_HOST", raising=False)
    router = target("m")
    assert router["url"] == f"http://127.0.0.1:{router['port']}"
    assert httpx.get(router["url"] + "/__router__", timeout=5).status_code == 200


def test_the_router_listens_on_and_announces_the_configured_address(target, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__SERVING_ROUTER_HOST", "127.0.0.2")  # another loopback address
    router = target("m")
    assert router["url"] == f"http://127.0.0.2:{router['port']}"
    assert httpx.get(router["url"] + "/__router__", timeout=5).status_code == 200
    assert not _accepts("127.0.0.1", router["port"])  # that address only
