"""docker-compose.yaml (the scaled-out topology) stays consistent with what the package ships.

No Docker engine runs on the test machines, so the file is checked for what can drift silently: the
connections it defines use connection types Airflow knows, and every [mlops] option it sets exists.
"""

from __future__ import annotations

import json

import yaml
from mlops_testing import ROOT

from airflow_mlops.get_provider_info import get_provider_info

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def _airflow_env() -> dict[str, str]:
    return COMPOSE["services"]["airflow-scheduler"]["environment"]


def test_every_airflow_component_runs_from_the_same_image_and_settings():
    components = [
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    ]
    for name in components:
        service = COMPOSE["services"][name]
        assert service["image"] == "airflow-mlops:local", name
        assert service["environment"] == _airflow_env(), name
    assert _airflow_env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_mlops_options_exist_and_the_artifact_root_has_its_connection():
    options = get_provider_info()["config"]["mlops"]["options"]
    env = _airflow_env()
    used = {k.removeprefix("AIRFLOW__MLOPS__").lower() for k in env if k.startswith("AIRFLOW__MLOPS__")}
    assert used and used <= set(options), used - set(options)
    conn_id = env["AIRFLOW__MLOPS__ARTIFACT_CONN_ID"]
    assert f"AIRFLOW_CONN_{conn_id.upper()}" in env


def test_connections_use_types_the_providers_register():
    ours = {c["connection-type"] for c in get_provider_info().get("connection-types", [])}
    known = ours | {"aws", "google_cloud_platform"}
    for key, value in _airflow_env().items():
        if key.startswith("AIRFLOW_CONN_"):
            assert json.loads(value)["conn_type"] in known, key
