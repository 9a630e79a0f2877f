"""The UI plugin's JSON API on a state written by the real writers: flight-delay models registered and
gated by the registry operators, drift checks of real weeks by the Evidently operator, batches validated
by the Great Expectations operator (one quarantined), the tuning outputs written by the search's own
writer. The numbers the API answers are the registry's and the operators' own; authorization goes
through Airflow's SimpleAuthManager (admin, viewer) and an auth manager with per-DAG rules. The last test
starts a real ``airflow api-server`` under a ``[api] base_url`` with a path and logs in with passwords.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi.testclient import TestClient
from mlops_testing import ROOT
from serving.models import LABEL, training_frame, write_manifest, write_model

from airflow_mlops.config import load_settings
from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.plugins import api
from airflow_mlops.plugins.mlops_plugin import create_app

pytestmark = pytest.mark.integration

MODEL = "flight_delay"
TRAIN, MONITOR, INGEST = "flights_train", "flights_monitor", "flights_ingest"
#: the DAGs Airflow knows in the TestClient tests
DAGS = {TRAIN, MONITOR, INGEST, "flights_operate"}
SUITE = ROOT / "dags" / "expectations" / "flights_batch.json"
WEATHER = ["temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
WEEKS = {"spring": ("2013-05-01", "2013-05-07"), "july": ("2013-07-15", "2013-07-21")}


class TI(SimpleNamespace):
    """The part of a task instance the operators use: ids and XCom push."""

    def xcom_push(self, key: str, value: Any) -> None:
        self.__dict__.setdefault("xcom", {})[key] = value


def _context(dag_id: str, run_id: str, task_id: str, **more: Any) -> dict[str, Any]:
    return {"run_id": run_id, "ti": TI(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=-1), **more}


def _train_and_gate(tmp: Path) -> dict[str, Any]:
    """Three train runs: a good model (promoted), one that learned nothing (rejected), a better one
    (promoted when it beats the good one), then a rollback when it was."""
    from airflow_mlops.operators.registry import (
        PromoteModelOperator,
        RegisterModelOperator,
        RollbackModelOperator,
    )

    flights = training_frame(months=(1, 2, 3, 4))
    train = flights[flights["month"] <= 3]
    models = {
        "good": write_model(tmp / "good", train, max_iter=40),
        "noise": write_model(tmp / "noise", train, max_iter=10, shuffle_labels=True),
        "better": write_model(tmp / "better", train, max_iter=120),
    }
    manifest, holdout = (
        write_manifest(tmp, "train", train),
        write_manifest(tmp, "holdout", flights[flights["month"] == 4]),
    )
    runs = {}
    for i, which in enumerate(("good", "noise", "better"), start=1):
        run_id = f"train_{i}_{which}"
        version = RegisterModelOperator(
            task_id="register",
            model_name=MODEL,
            model_uri=str(models[which]),
            metrics={"auc": 0.7},
            training_manifest_uri=manifest,
        ).execute(_context(TRAIN, run_id, "register"))["version"]
        decision = PromoteModelOperator(
            task_id="promote",
            model_name=MODEL,
            candidate_version=version,
            holdout_uri=holdout,
            floor=0.0,
            min_improvement=0.0,
        ).execute(_context(TRAIN, run_id, "promote"))
        runs[which] = {"run_id": run_id, "version": version, "decision": decision}
    if runs["better"]["decision"]["promoted"]:
        RollbackModelOperator(task_id="rollback", model_name=MODEL).execute(
            _context("flights_operate", "rollback_1", "rollback")
        )
    return runs


def _tuning_outputs() -> None:
    """The trial table and result of the last train run's tune task, written by the search's writer."""
    from airflow_mlops.artifacts import ArtifactStore
    from airflow_mlops.ml.search import SearchSpec, _write_bytes, _write_trials_csv

    index = BentoMLHook().read_index(MODEL)
    last = max(index["versions"].values(), key=lambda r: r["registered_at"])
    out = ArtifactStore().run_path(TRAIN, last["dag_run_id"], "tune", "tuning")
    spec = SearchSpec(
        training_data_uri="unused",
        trainable="lightgbm_classifier",
        search_space={},
        metric="auc",
        mode="max",
        task="binary",
        storage_path=str(out / "tune_state"),
        output_uri=str(out),
    )
    rows = [
        {
            "trial_id": f"t{i}",
            "status": status,
            "metric": score,
            "best_metric": score,
            "iterations": 3,
            "best_iteration": 2,
            "reports": 3,
            "time_s": 1.5,
            "finished_at": 1.0,
            "config": {"lr": lr, "leaves": 15},
            "error": None,
        }
        for i, (status, score, lr) in enumerate(
            [("completed", 0.71, 0.1), ("stopped_early", 0.64, 0.3), ("completed", 0.73, 0.05)]
        )
    ]
    trials_uri = _write_trials_csv(out / "trials.csv", spec, rows, rows[2])
    result = {
        "metric": "auc",
        "mode": "max",
        "best_trial_id": "t2",
        "trials_uri": trials_uri,
        "plot_uri": str(out / "trials.png"),
    }
    _write_bytes(out / "result.json", json.dumps(result).encode())


def _drift_checks(tmp: Path) -> dict[str, dict]:
    """Two weekly checks of the monitor DAG: a calm spring week and the drifted July week, with quality."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.demo.data import read_table
    from airflow_mlops.lifecycle.spec import load_spec
    from airflow_mlops.operators.drift import EvidentlyDriftOperator

    monitoring = load_spec(ROOT / "dags" / "flights.yaml").monitoring
    flights = read_table("flights")
    weather = read_table("weather")[["origin", "time_hour", *WEATHER]]
    day = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    reference = tmp / "reference.parquet"
    flights[day < "2013-04-01"].merge(weather, on=["origin", "time_hour"], how="left").to_parquet(reference)
    offline = tmp / "offline"
    for start, end in WEEKS.values():
        for date in pd.date_range(start, end).strftime("%Y-%m-%d"):
            part = offline / "flights" / f"date={date}" / "part-0.parquet"
            part.parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(flights[day == date], preserve_index=False), part)
    (offline / "weather").mkdir()
    weather.to_parquet(offline / "weather" / "weather.parquet", index=False)
    results = {}
    for name, (start, end) in WEEKS.items():
        op = EvidentlyDriftOperator(
            task_id="drift",
            model_name=MODEL,
            reference_uri=f"file://{reference}",
            offline_root=f"file://{offline}",
            table="flights",
            joins=[{"uri": "weather/weather.parquet", "on": ["origin", "time_hour"], "columns": WEATHER}],
            columns=dict(monitoring.columns),
            drift_share=monitoring.drift_share,
            window_end=end,
            window_days=7,
            label_column=LABEL,
            label_rule={"column": "arr_delay", "gt": 15},
        )
        interval = pd.Timestamp(start, tz="UTC").to_pydatetime()
        results[name] = op.execute(
            _context(MONITOR, f"monitor_{name}", "drift", data_interval_start=interval, outlet_events={})
        )
    return results


def _validations(landed: Path, tmp: Path) -> dict[str, Any]:
    """The ingest DAG's validation of a good day and of a day delivered with three flights twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.exceptions import DataValidationError
    from airflow_mlops.operators.validation import GXValidateOperator

    out: dict[str, Any] = {}
    for name, day in (("good", "2013-01-02"), ("bad", "2013-01-03")):
        source = landed / f"date={day}" / "flights.parquet"
        data = tmp / "landing" / f"date={day}" / "flights.parquet"
        data.parent.mkdir(parents=True)
        table = pq.read_table(source)
        pq.write_table(pa.concat_tables([table, table.slice(0, 3)]) if name == "bad" else table, data)
        op = GXValidateOperator(
            task_id="validate_batch",
            data_uri=str(data),
            expectation_suite=str(SUITE),
            batch_date=day,
            batch_timezone="America/New_York",
            quarantine_uri=str(tmp / "quarantine" / f"date={day}"),
        )
        try:
            out[name] = op.execute(_context(INGEST, f"ingest_{day}", "validate_batch"))
        except DataValidationError as err:
            out[name] = err
    return out


@pytest.fixture(scope="module")
def written(landed_week, tmp_path_factory) -> dict[str, Any]:
    """The state the writers leave, in a state folder of this module."""
    landed = Path(load_settings().landing_root.removeprefix("file://")) / "flights"
    state = tmp_path_factory.mktemp("ui-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
        tmp = tmp_path_factory.mktemp("ui-data")
        runs = _train_and_gate(tmp)
        _tuning_outputs()
        checks = _drift_checks(tmp)
        validated = _validations(landed, tmp)
        yield {"state": state, "runs": runs, "checks": checks, "validated": validated}


@pytest.fixture
def client(written, monkeypatch):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(written["state"]))

    def as_user(role: str | None, manager: type = SimpleAuthManager) -> TestClient:
        monkeypatch.setattr(api, "_auth_manager", manager)
        app = create_app(dag_lister=lambda ids: set(ids) & DAGS)
        user = SimpleAuthManagerUser(username=role or "nobody", role=role)
        app.dependency_overrides[get_user] = lambda: user
        return TestClient(app)

    return as_user


def test_the_models_page_shows_the_registrys_production_version_and_decisions(written, client):
    index = BentoMLHook().read_index(MODEL)
    viewer = client("viewer").get("/api/models")
    assert viewer.status_code == 200
    [model] = viewer.json()["models"]
    production = index["production"]
    promoted = [h for h in index["history"] if h["action"] == "promote" and h["version"] == production][-1]
    assert model["name"] == MODEL and model["metric"] == "auc"
    assert model["production"] == {"version": production, "score": promoted["candidate_score"]}
    assert model["dag_ids"] == {
        "train": TRAIN,
        "monitor": MONITOR,
        "ingest": INGEST,
        "operate": "flights_operate",
    }
    assert model["serving"] is None  # never deployed
    july = written["checks"]["july"]
    assert model["last_drift_check"]["drifted"] is july["drift_detected"] is True
    assert model["last_drift_check"]["drift_share"] == july["drift_share"]
    assert model["last_drift_check"]["quality"]["value"] == july["quality"]["score"]
    assert model["last_drift_check"]["data_interval_start"].startswith("2013-07-15")
    last = [h for h in index["history"] if h["action"] in ("promote", "reject")][-1]
    assert model["last_retraining"]["decision"] == last["action"]
    assert model["last_retraining"]["reason"] == last["reason"]
    assert model["last_retraining"]["run_id"] == written["runs"]["better"]["run_id"]
    # the viewer reads, the admin may act
    assert model["can_edit"] is False
    assert client("admin").get("/api/models").json()["models"][0]["can_edit"] is True


def test_a_model_page_lists_versions_stages_and_every_decision_with_both_scores(written, client):
    index = BentoMLHook().read_index(MODEL)
    page = client("viewer").get(f"/api/models/{MODEL}").json()
    runs = written["runs"]
    stages = {v["version"]: v["stage"] for v in page["versions"]}
    assert stages == {v: r["stage"] for v, r in index["versions"].items()}
    assert stages[runs["noise"]["version"]] == "rejected"
    assert [v["version"] for v in page["versions"]] == [
        runs[w]["version"] for w in ("better", "noise", "good")
    ]  # newest first
    good = next(v for v in page["versions"] if v["version"] == runs["good"]["version"])
    assert good["dag_id"] == TRAIN and good["run_id"] == runs["good"]["run_id"]
    assert good["training_window"]["start"].startswith("2013-01-01")
    assert good["metrics"] == {"auc": 0.7}
    gated = [d for d in page["decisions"] if d["action"] in ("promote", "reject")]
    assert [(d["version"], d["action"]) for d in gated] == [
        (runs[w]["version"], "promote" if runs[w]["decision"]["promoted"] else "reject")
        for w in ("good", "noise", "better")
    ]
    for d, which in zip(gated, ("good", "noise", "better"), strict=True):
        assert d["candidate_score"] == runs[which]["decision"]["candidate_score"]
        assert d["production_score"] == runs[which]["decision"]["production_score"]
        assert d["reason"] == runs[which]["decision"]["reason"] and d["dag_id"] == TRAIN
        assert d["scores_from"] == "gate"
    if runs["better"]["decision"]["promoted"]:
        assert page["decisions"][-1]["action"] == "rollback"
        # a hand decision scores nothing new: the page says its scores are the registered validation ones
        assert page["decisions"][-1]["scores_from"] == "registration"
        assert page["production_version"] == runs["good"]["version"]
    assert page["pending_approvals"] == [] and page["can_edit"] is False


def test_the_trial_table_is_the_tuning_runs(written, client):
    trials = client("viewer").get(f"/api/models/{MODEL}/trials").json()
    assert trials["dag_id"] == TRAIN and trials["run_id"] == written["runs"]["better"]["run_id"]
    assert (trials["metric"], trials["mode"]) == ("auc", "max")
    assert [(t["trial_id"], t["score"], t["status"], t["params"]) for t in trials["trials"]] == [
        ("t0", 0.71, "completed", {"leaves": 15, "lr": 0.1}),
        ("t1", 0.64, "stopped_early", {"leaves": 15, "lr": 0.3}),
        ("t2", 0.73, "completed", {"leaves": 15, "lr": 0.05}),
    ]
    assert trials["plot_url"].startswith(f"mlops/reports/{TRAIN}/") and trials["plot_url"].endswith(
        "trials.png"
    )
    assert client("viewer").get(f"/api/models/{MODEL}/trials", params={"run_id": "nope"}).status_code == 404


def test_drift_per_column_and_quality_over_time_are_the_checks(written, client):
    drift = client("viewer").get(f"/api/models/{MODEL}/drift").json()
    spring, july = written["checks"]["spring"], written["checks"]["july"]
    assert drift["threshold_share"] == july["drift_share_threshold"]
    assert {c["column"] for c in drift["columns"]} == set(july["columns"])
    for column in drift["columns"]:
        name = column["column"]
        assert column["threshold"] == july["columns"][name]["threshold"]
        assert [p["score"] for p in column["points"]] == [
            spring["columns"][name]["score"],
            july["columns"][name]["score"],
        ]
        assert [p["drifted"] for p in column["points"]] == [
            spring["columns"][name]["drifted"],
            july["columns"][name]["drifted"],
        ]
    assert [q["value"] for q in drift["quality"]] == [spring["quality"]["score"], july["quality"]["score"]]
    metric = july["quality"]["metric"]
    assert drift["quality"][1]["metric"] == metric
    assert drift["quality"][1]["threshold"] == pytest.approx(
        july["quality"]["holdout_score"] - july["quality"]["max_decay"]
    )
    report = drift["columns"][0]["points"][1]["report_url"]
    assert report == f"mlops/reports/{MONITOR}/monitor_july/drift/drift_report.html"
    served = client("viewer").get(report.removeprefix("mlops"))
    assert served.status_code == 200 and "sandbox" in served.headers["content-security-policy"]
    tab = client("viewer").get(f"/api/tasks/{MONITOR}/monitor_july/drift").json()
    assert tab["kind"] == "drift" and tab["report_url"] == report
    assert tab["summary"]["drift_share"] == july["drift_share"]


def test_a_rerun_check_replaces_its_point(written, client, tmp_path):
    """Clearing a monitor task runs the check again: the history keeps one point per check, the last."""
    from airflow_mlops.hooks.history import drift_checks, record_drift_check

    before = client("viewer").get(f"/api/models/{MODEL}/drift").json()
    july = written["checks"]["july"]
    rerun = _context(MONITOR, "monitor_july", "drift", data_interval_start=None)
    record_drift_check(july, rerun)
    after = client("viewer").get(f"/api/models/{MODEL}/drift").json()
    assert [len(c["points"]) for c in after["columns"]] == [len(c["points"]) for c in before["columns"]]
    assert len(drift_checks(MODEL)) == 2


def test_validation_per_batch_names_failed_expectations_and_the_quarantine(written, client):
    batches = client("viewer").get(f"/api/models/{MODEL}/validation").json()["batches"]
    bad_error = written["validated"]["bad"]
    good = written["validated"]["good"]
    assert [(b["batch"], b["passed"]) for b in batches] == [
        ("date=2013-01-03/flights.parquet", False),
        ("date=2013-01-02/flights.parquet", True),
    ]
    bad = batches[0]
    assert bad["quarantined_uri"] and bad["quarantined_uri"] in str(bad_error)
    assert bad["failed_expectations"] and all(
        f["expectation"] in str(bad_error) for f in bad["failed_expectations"]
    )
    assert batches[1]["quarantined_uri"] is None and batches[1]["rows"] == good["rows"]
    assert bad["report_url"].startswith(f"mlops/reports/{INGEST}/ingest_2013-01-03/validate_batch/")
    tab = client("viewer").get(f"/api/tasks/{INGEST}/ingest_2013-01-03/validate_batch").json()
    assert tab["kind"] == "validation" and tab["summary"]["passed"] is False


def test_a_train_runs_tab_shows_the_model_it_produced_and_the_verdict(written, client):
    noise = written["runs"]["noise"]
    run = client("viewer").get(f"/api/runs/{TRAIN}/{noise['run_id']}").json()
    assert run["model"] == MODEL and run["version"] == noise["version"] and run["stage"] == "rejected"
    assert run["decision"]["action"] == "reject" and run["decision"]["reason"] == noise["decision"]["reason"]
    other = client("viewer").get(f"/api/runs/{TRAIN}/not_a_run").json()
    assert other == {
        "model": None,
        "version": None,
        "stage": None,
        "decision": None,
        "pending_approval": None,
    }


class NoMonitor(SimpleAuthManager):
    """Per-DAG rules (FAB, Keycloak): the monitor DAG is hidden from everyone but admins."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if details is not None and details.id == MONITOR and (user.role or "").lower() != "admin":
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )


def test_a_user_who_may_not_read_a_models_dags_does_not_see_it(written, client):
    viewer = client("viewer", NoMonitor)
    assert viewer.get("/api/models").json() == {"models": []}
    for path in ("", "/drift", "/validation", "/trials"):
        assert viewer.get(f"/api/models/{MODEL}{path}").status_code == 403, path
    assert viewer.get(f"/api/tasks/{MONITOR}/monitor_july/drift").status_code == 403
    assert viewer.get(f"/reports/{MONITOR}/monitor_july/drift/drift_report.html").status_code == 403
    assert [m["name"] for m in client("admin", NoMonitor).get("/api/models").json()["models"]] == [MODEL]
    assert client(None).get("/api/models").json() == {"models": []}
    assert client("viewer").get("/api/models/unknown").status_code == 404


# ------------------------------------------------------------------------- a real API server
def _free_port() -> int:
    from airflow_mlops.net import free_port

    return free_port()


def test_a_real_api_server_serves_the_plugin_under_its_base_url_to_logged_in_users(
    written, airflow_db, tmp_path
):
    port = _free_port()
    base = f"http://127.0.0.1:{port}/airflow"
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": "admin-pw", "viewer": "viewer-pw"}))
    env = {
        **os.environ,
        "AIRFLOW__MLOPS__STATE_DIR": str(written["state"]),
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": "ui-api-test-secret-0123456789abcdef",
        "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": "False",
    }
    env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", None)
    log = (tmp_path / "api-server.log").open("w")
    airflow = Path(sys.executable).with_name("airflow")
    server = subprocess.Popen(
        ["nice", "-n", "19", str(airflow), "api-server", "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import httpx

    try:
        http = httpx.Client(base_url=f"{base}/", timeout=30)
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "api-server.log").read_text()[-3000:]
            try:
                if http.get("api/v2/monitor/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "api-server.log").read_text()[-3000:]
            time.sleep(1)

        def token(user: str) -> dict[str, str]:
            answer = http.post("auth/token", json={"username": user, "password": f"{user}-pw"})
            assert answer.status_code in (200, 201), answer.text
            return {"Authorization": f"Bearer {answer.json()['access_token']}"}

        assert http.get("mlops/api/models").status_code == 401
        admin, viewer = token("admin"), token("viewer")
        models = http.get("mlops/api/models", headers=viewer).json()["models"]
        assert [(m["name"], m["can_edit"]) for m in models] == [(MODEL, False)]
        assert http.get("mlops/api/models", headers=admin).json()["models"][0]["can_edit"] is True
        report = http.get(f"mlops/reports/{MONITOR}/monitor_july/drift/drift_report.html", headers=viewer)
        assert report.status_code == 200
        assert report.headers["content-security-policy"].startswith("sandbox")
        assert report.headers["x-content-type-options"] == "nosniff"
        bundle = http.get("mlops/ui/main.js")
        assert bundle.status_code in (200, 404)
        if bundle.status_code == 200:
            assert bundle.headers["content-type"].startswith("text/javascript")
        else:
            assert "make install" in bundle.text
        plugins = http.get("api/v2/plugins", headers=admin).json()["plugins"]
        ours = next(p for p in plugins if p["name"] == "airflow_mlops")
        assert sorted(a["url_route"] for a in ours["react_apps"]) == [
            "mlops-models",
            "mlops-run",
            "mlops-task",
        ]
        errors = http.get("api/v2/plugins/importErrors", headers=admin).json()
        assert errors["total_entries"] == 0, errors
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(10)
        log.close()
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
