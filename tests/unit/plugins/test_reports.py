"""Reports and the bundle served by the plugin: a report's script cannot act on Airflow's origin, reads are
authorized per DAG by Airflow's auth manager, nothing outside the artifact root (no symlink, no ``..``)
is served, the bundle is JavaScript."""

from __future__ import annotations

import os

import pytest
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi.testclient import TestClient

from airflow_mlops.artifacts import ArtifactStore
from airflow_mlops.plugins import api
from airflow_mlops.plugins.mlops_plugin import artifact_url, create_app

#: the DAGs Airflow knows in these tests
DAGS = {"flights_ingest", "flights_monitor", "secret_train"}
EVIL = b"<html><body><h1>report</h1></script><script>fetch('/api/v2/dags',{method:'DELETE'})</script>"


class OnlyFlights(SimpleAuthManager):
    """An auth manager with per-DAG rules (as FAB or Keycloak give): DAGs starting with ``secret_`` are
    refused to everyone but admins."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if (
            details is not None
            and (details.id or "").startswith("secret_")
            and (user.role or "").lower() != "admin"
        ):
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )


@pytest.fixture
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.setattr(api, "_auth_manager", OnlyFlights)
    store = ArtifactStore()
    store.write_bytes(store.run_path("flights_monitor", "run 1", "drift", "drift_report.html"), EVIL)
    store.write_bytes(store.run_path("secret_train", "run 1", "tune", "trials.csv"), b"trial_id\n1\n")
    (tmp_path / "secret.txt").write_text("outside the artifact root")
    return store


def client_for(role: str | None, *, logged_in: bool = True) -> TestClient:
    app = create_app(dag_lister=lambda ids: set(ids) & DAGS)
    if logged_in:
        user = SimpleAuthManagerUser(username=role or "nobody", role=role)
        app.dependency_overrides[get_user] = lambda: user
    return TestClient(app)


def test_a_report_is_sandboxed_so_its_script_cannot_act_on_airflows_origin(store):
    url = artifact_url(store.run_path("flights_monitor", "run 1", "drift", "drift_report.html").as_uri())
    assert url == "/mlops/reports/flights_monitor/run-1/drift/drift_report.html"
    response = client_for("viewer").get(url.removeprefix("/mlops"))
    assert response.status_code == 200
    assert response.content == EVIL  # served as written, the browser's sandbox is what disarms it
    csp = response.headers["content-security-policy"]
    directives = [d.strip().split()[0] for d in csp.split(";")]
    sandbox = next(d.strip() for d in csp.split(";") if d.strip().startswith("sandbox"))
    # a sandbox without allow-same-origin: the page is an opaque origin, no cookie, no same-origin fetch
    assert "allow-same-origin" not in sandbox and "allow-top-navigation" not in sandbox
    assert "default-src 'none'" in csp and "connect-src" not in csp and directives[0] == "sandbox"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].startswith("text/html")


def test_reports_are_authorized_per_dag(store):
    secret = "/reports/secret_train/run-1/tune/trials.csv"
    assert client_for("viewer").get(secret).status_code == 403
    admin = client_for("admin").get(secret)
    assert admin.status_code == 200 and admin.text == "trial_id\n1\n"
    assert admin.headers["content-type"].startswith("text/csv")
    # the root lists only the DAG folders the user may read
    assert client_for("viewer").get("/reports/").status_code == 200
    listing = client_for("viewer").get("/reports/").text
    assert 'href="flights_monitor/"' in listing and "secret_train" not in listing
    assert "secret_train" in client_for("admin").get("/reports/").text
    # a user without a role reads nothing, and without login nothing is served
    assert client_for("viewer", logged_in=False).get("/reports/flights_monitor/").status_code == 401
    assert client_for(None).get("/reports/flights_monitor/run-1/drift/drift_report.html").status_code == 403


def test_a_folder_redirects_to_its_listing_and_links_stay_relative(store):
    client = client_for("viewer")
    response = client.get("/reports/flights_monitor/run-1", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "run-1/"
    listing = client.get("/reports/flights_monitor/run-1/")
    assert 'href="drift/"' in listing.text  # relative: right under any [api] base_url


def test_paths_outside_the_root_and_symlinks_are_refused(store, tmp_path):
    client = client_for("admin")
    assert client.get("/reports/..%2fsecret.txt").status_code == 400
    escaped = client.get("/reports/flights_monitor/../../secret.txt")
    assert escaped.status_code in (400, 404) and "outside the artifact root" not in escaped.text
    run = store.root.path + "/flights_monitor/run-1"
    os.symlink(tmp_path / "secret.txt", f"{run}/drift/link.txt")
    os.symlink(tmp_path, f"{run}/up")
    for path in ("flights_monitor/run-1/drift/link.txt", "flights_monitor/run-1/up/secret.txt"):
        response = client.get(f"/reports/{path}")
        assert response.status_code == 403, path
        assert "outside the artifact root" not in response.text
    assert client.get("/reports/flights_monitor/nope.html").status_code == 404


def test_the_former_artifacts_url_has_the_same_checks(store):
    old = "/artifacts/flights_monitor/run-1/drift/drift_report.html"
    response = client_for("viewer").get(old)
    assert response.status_code == 200 and "sandbox" in response.headers["content-security-policy"]
    assert client_for("viewer").get("/artifacts/secret_train/run-1/tune/trials.csv").status_code == 403


def test_urls_follow_airflows_base_url(store, monkeypatch):
    from airflow_mlops.plugins.mlops_plugin import model_page_url

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://example.org/airflow")
    report = store.run_path("flights_monitor", "run 1", "drift", "drift_report.html").as_uri()
    assert (
        artifact_url(report)
        == "https://example.org/airflow/mlops/reports/flights_monitor/run-1/drift/drift_report.html"
    )
    assert model_page_url("flight delay") == "https://example.org/airflow/plugin/mlops-models/flight%20delay"
    monkeypatch.delenv("AIRFLOW__API__BASE_URL")
    assert model_page_url("flight_delay") == "/plugin/mlops-models/flight_delay"


def test_the_bundle_is_served_as_javascript_or_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "UI_DIST", tmp_path)
    client = TestClient(create_app(dag_lister=set))
    missing = client.get("/ui/main.js")
    assert missing.status_code == 404 and "make install" in missing.json()["detail"]
    (tmp_path / "main.js").write_text("globalThis.AirflowPlugin = () => null;")
    served = client.get("/ui/main.js?app=run")
    assert served.status_code == 200 and served.text.startswith("globalThis.AirflowPlugin")
    assert served.headers["content-type"].startswith("text/javascript")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/other.js").status_code == 404


def test_an_unreachable_state_database_is_named_not_a_bare_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_STATE", "postgresql://mlops:pw@127.0.0.1:9/mlops")
    monkeypatch.setattr(api, "_auth_manager", SimpleAuthManager)
    response = client_for("viewer").get("/api/models")
    assert response.status_code == 503
    assert "mlops_state" in response.json()["detail"] and response.json()["fix"]
