"""Shadow deploys and the shadow report without servers: the routes file the router reads, the deployment
state, and a report read from prediction-log records written by the real writer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from airflow_mlops.exceptions import MLOpsArgumentError, ServingError
from airflow_mlops.operators import serving
from airflow_mlops.operators.serving import BentoDeployOperator, LocalDeploymentTarget
from airflow_mlops.operators.shadow import ShadowAgreementError, ShadowReportOperator


def _context():
    return {"run_id": "r1", "ti": SimpleNamespace(dag_id="d", run_id="r1", task_id="t")}


@pytest.fixture
def local(tmp_path, monkeypatch):
    """The local target with processes replaced: ``start`` records the server's environment, the router's
    status is what it would read from the routes file the deployer really writes."""
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AIRFLOW__MLOPS__ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    started: list[dict] = []
    router = {"url": "http://127.0.0.1:3000", "pid": None, "port": 3000}

    def start(self, spec):
        started.append(spec)
        url = f"http://127.0.0.1:{4000 + len(started)}"
        return {**spec, "url": url, "pid": None, "port": 0, "log": None, "started_at": "now"}

    def router_status(self, _router):
        path = self.routes_path("m")
        routes = json.loads(path.read_text()) if path.exists() else {"generation": 0}
        return {**routes, "shadow": {"backend": routes.get("shadow"), "sent": 3, "skipped": 0, "failed": 0}}

    for name in ("check_signature",):
        monkeypatch.setattr(serving, name, lambda record, version: None)
    monkeypatch.setattr(serving.BentoMLHook, "read_index", lambda self, name: {"model": name, "versions": {}})
    monkeypatch.setattr(serving.BentoMLHook, "version_record", lambda self, index, version: {})
    monkeypatch.setattr(serving.BentoMLHook, "model_dir", lambda self, name, version, record=None: tmp_path)
    monkeypatch.setattr(LocalDeploymentTarget, "ensure_router", lambda self, state, port: router)
    monkeypatch.setattr(LocalDeploymentTarget, "start", start)
    monkeypatch.setattr(LocalDeploymentTarget, "router_status", router_status)
    monkeypatch.setattr(LocalDeploymentTarget, "drain_and_stop", lambda self, backend, router: None)
    monkeypatch.setattr(LocalDeploymentTarget, "backend_ready", lambda self, backend: True)
    monkeypatch.setattr(LocalDeploymentTarget, "still_serving", lambda self, backend: True)
    monkeypatch.setattr("airflow_mlops.sensors.serving.probe", lambda url: (True, "ready"))
    target = LocalDeploymentTarget(serving.BentoMLHook())
    with target.locked("m") as state:
        state["router"] = router
    return SimpleNamespace(target=target, started=started)


def _deploy(version: str, strategy: str = "blue_green") -> dict:
    return BentoDeployOperator(task_id="t", model_name="m", version=version, strategy=strategy).execute(
        _context()
    )


def _routes(local) -> dict:
    return json.loads(local.target.routes_path("m").read_text())


def test_a_shadow_deploy_mirrors_without_switching_and_blue_green_ends_it(local):
    first = _deploy("v1")
    assert first["version"] == "v1" and first["shadow_version"] is None
    shadowed = _deploy("v2", strategy="shadow")
    # production keeps all traffic; the router copies every request to v2, started in shadow mode
    assert (shadowed["version"], shadowed["shadow_version"], shadowed["switched"]) == ("v1", "v2", False)
    routes = _routes(local)
    assert routes["active"] == first["backend"] and routes["shadow"] == shadowed["shadow_backend"]
    assert (
        local.started[-1]["env"] == {"MLOPS_SERVE_SHADOW": "true"}
        and "MLOPS_SERVE_SHADOW" not in (local.started[0]["env"])
    )
    # the same shadow deploy again does nothing
    assert _deploy("v2", strategy="shadow")["shadow_backend"] == shadowed["shadow_backend"]
    assert len(local.started) == 2
    # promoting v2 blue/green: a new (non-shadow) v2 takes the traffic and the shadow is stopped
    promoted = _deploy("v2")
    assert (promoted["version"], promoted["shadow_version"], promoted["switched"]) == ("v2", None, True)
    assert "shadow" not in _routes(local) and _routes(local)["active"] == promoted["backend"]
    assert promoted["backend"] != shadowed["shadow_backend"]
    actions = [h["action"] for h in local.target.read_state("m")["history"]]
    assert actions == ["deploy", "shadow", "shadow-stopped", "deploy"]


def test_redeploying_the_live_version_blue_green_ends_a_shadow(local):
    _deploy("v1")
    _deploy("v2", strategy="shadow")
    again = _deploy("v1")
    assert (again["switched"], again["shadow_version"]) == (False, None) and "shadow" not in _routes(local)


def test_what_cannot_be_shadowed_is_refused(local):
    with pytest.raises(MLOpsArgumentError, match="unknown deployment strategy 'canary-ish'"):
        BentoDeployOperator(task_id="t", model_name="m", strategy="canary-ish")
    with pytest.raises(ServingError, match="no live version for version v2 to shadow"):
        _deploy("v2", strategy="shadow")
    _deploy("v1")
    with pytest.raises(MLOpsArgumentError, match="only compare it with itself"):
        _deploy("v1", strategy="shadow")
    assert (
        local.target.read_state("m")["shadow"] is None if "shadow" in local.target.read_state("m") else True
    )


def _log(version: str, probabilities: list[float], shadow: bool) -> None:
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record
    from airflow_mlops.ml.signature import ModelSignature, answers, logged_value

    signature = ModelSignature(task="binary", label="delayed", classes=[0, 1], features=["temp"])
    writer = PredictionLogWriter("m", flush_seconds=3600, max_rows=1000, retention_days=0)
    writer.append(
        [
            make_record(
                model="m",
                version=version,
                task="binary",
                request={"id": i},
                features={"temp": float(i)},
                prediction=logged_value(signature, answer),
                answer=answer,
                time=f"2026-03-02T10:{i:02d}:00+00:00",
                request_id=f"r{i}",
                shadow=shadow,
            )
            for i, answer in enumerate(answers(signature, probabilities))
        ]
    )
    writer.close()


def test_the_report_pairs_the_deployments_versions_and_gates_on_agreement(local):
    _deploy("v1")
    _deploy("v2", strategy="shadow")
    _log("v1", [0.9, 0.8, 0.2, 0.1], shadow=False)
    _log("v2", [0.9, 0.3, 0.2, 0.1], shadow=True)
    window = {"window_end": "2026-03-02T12:00:00+00:00", "window_hours": 6}
    report = ShadowReportOperator(task_id="r", model_name="m", **window).execute(_context())
    assert (report["production_version"], report["shadow_version"], report["paired"]) == ("v1", "v2", 4)
    assert report["agreement"]["label_agreement"] == 0.75
    assert report["agreement"]["probability_mean_abs_diff"] == pytest.approx(0.125)
    assert report["router"] == {"sent": 3, "skipped": 0, "failed": 0}
    with pytest.raises(ShadowAgreementError, match=r"label_agreement 0.75, wanted >= 0.9"):
        ShadowReportOperator(task_id="r", model_name="m", min_label_agreement=0.9, **window).execute(
            _context()
        )
    with pytest.raises(ShadowAgreementError, match="fewer than min_rows=10"):
        ShadowReportOperator(
            task_id="r", model_name="m", min_label_agreement=0.5, min_rows=10, **window
        ).execute(_context())
    # a window before the records pairs nothing
    early = ShadowReportOperator(task_id="r", model_name="m", window_end="2026-03-01T00:00:00+00:00")
    assert early.execute(_context())["paired"] == 0
