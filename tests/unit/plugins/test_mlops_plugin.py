"""The artifact browser served by the API server: login required, read-only, never outside the root."""

from __future__ import annotations

import subprocess
import sys

import pytest
from airflow.api_fastapi.core_api.security import get_user
from fastapi.testclient import TestClient

from airflow_mlops.artifacts import ArtifactStore
from airflow_mlops.plugins.mlops_plugin import MLOpsPlugin, artifact_url, create_app


@pytest.fixture
def artifacts(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    store = ArtifactStore()
    written = store.write_bytes(
        store.run_path("flights_ingest", "run 1", "validate", "report.html"), b"<h1>ok</h1>"
    )
    (tmp_path / "secret.txt").write_text("outside the artifact root")
    return written


@pytest.fixture
def client():
    app = create_app()
    app.dependency_overrides[get_user] = lambda: object()
    return TestClient(app)


def test_the_plugin_registers_the_app_and_a_menu_entry():
    plugin = MLOpsPlugin()
    assert plugin.fastapi_apps[0]["url_prefix"] == "/mlops"
    assert plugin.fastapi_apps[0]["app"] is MLOpsPlugin().fastapi_apps[0]["app"]  # one app, mounted once
    assert MLOpsPlugin.external_views[0]["href"] == "/mlops/artifacts/"


def test_loading_the_plugins_as_a_task_process_does_not_build_the_api_server():
    """Every task process loads the plugins for their listeners: the API server's modules (~1 s to
    import) are loaded only where the plugin's app is asked for."""
    script = (
        "import sys\n"
        "from airflow.listeners.listener import get_listener_manager\n"
        "get_listener_manager()\n"
        "from airflow import plugins_manager\n"
        "assert 'airflow_mlops' in [p.name for p in plugins_manager._get_plugins()[0]], 'plugin not loaded'\n"
        "print('RESULT', 'airflow.api_fastapi.app' in sys.modules)\n"
        "apps, _ = plugins_manager.get_fastapi_plugins()\n"
        "print('RESULT', [a['name'] for a in apps], 'airflow.api_fastapi.app' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    out = [line.removeprefix("RESULT ") for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert out == ["False", "['MLOps artifacts'] True"]


def test_without_login_nothing_is_served(artifacts):
    response = TestClient(create_app()).get("/artifacts/")
    assert response.status_code == 401


def test_serves_an_artifact_at_the_url_the_extra_links_use(artifacts, client):
    url = artifact_url(artifacts.uri)
    assert url == "/mlops/artifacts/flights_ingest/run-1/validate/report.html"
    response = client.get(url.removeprefix("/mlops"))
    assert response.status_code == 200
    assert response.text == "<h1>ok</h1>"
    assert response.headers["content-type"].startswith("text/html")


def test_lists_folders(artifacts, client):
    response = client.get("/artifacts/flights_ingest/run-1/")
    assert response.status_code == 200
    assert 'href="/mlops/artifacts/flights_ingest/run-1/validate/"' in response.text


def test_refuses_paths_outside_the_root_and_reports_missing_ones(artifacts, client):
    assert client.get("/artifacts/..%2fsecret.txt").status_code == 400
    escaped = client.get("/artifacts/flights_ingest/../../secret.txt")
    assert escaped.status_code in (400, 404)
    assert "outside the artifact root" not in escaped.text
    missing = client.get("/artifacts/flights_ingest/nope.html")
    assert missing.status_code == 404
    assert artifact_url("file:///somewhere/else.html") is None
