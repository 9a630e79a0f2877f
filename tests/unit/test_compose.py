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


# ------------------------------------------------------------------------------------ security
SECRET_WORDS = ("PASSWORD", "SECRET", "FERNET", "TOKEN", "_KEY")


def _ports(service: dict) -> list[tuple[str, str]]:
    """(host address, container port) of each published port; no address means 0.0.0.0."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((port.get("host_ip", "0.0.0.0"), str(port["target"])))
            continue
        parts = str(port).split(":")
        host = parts[0] if len(parts) == 3 else "0.0.0.0"
        published.append((host, parts[-1]))
    return published


def test_internal_services_publish_no_port_and_the_others_only_on_localhost():
    services = COMPOSE["services"]
    # Ray's Jobs API runs code for whoever reaches it: the host sees it on this machine only
    assert _ports(services["ray-head"]) == [("127.0.0.1", "8265")]
    for name in ("redis", "postgres", "ray-worker"):
        assert _ports(services[name]) == [], name
    for name, service in services.items():
        for host, port in _ports(service):
            assert host == "127.0.0.1", f"{name} publishes {port} on {host}"


def _environments():
    for name, service in COMPOSE["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        yield name, env


def test_no_secret_is_written_in_the_file():
    for name, env in _environments():
        for key, value in env.items():
            if key.startswith("AIRFLOW_CONN_"):
                conn = json.loads(value)
                assert not conn.get("password"), f"{name}: {key} holds a password"
                assert "secret" not in json.dumps(conn.get("extra", {})).lower(), f"{name}: {key}"
            elif any(word in key.upper() for word in SECRET_WORDS):
                # secrets come from files: Airflow's _CMD options, the images' _FILE variables
                from_file = key.endswith(("_CMD", "_FILE")) or str(value).startswith("/run/secrets/")
                # Airflow's secrets backend: a class, and the generated file it reads
                backend = key == "AIRFLOW__SECRETS__BACKEND" and str(value).startswith("airflow.secrets.")
                kwargs = key == "AIRFLOW__SECRETS__BACKEND_KWARGS" and all(
                    str(v).startswith("/run/secrets/") for v in json.loads(value).values()
                )
                from_file = from_file or backend or kwargs
                assert from_file, f"{name}: {key}={value!r} is a literal secret"
    # and no URL carries credentials
    for name, env in _environments():
        for key, value in env.items():
            assert "@" not in str(value), f"{name}: {key}={value!r} carries credentials"


def _run_secrets_init(folder) -> dict[str, str]:
    import os
    import subprocess
    import sys

    service = COMPOSE["services"]["secrets-init"]
    command = service["command"]
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, **service["environment"], "SECRETS_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", command[2]], env=env, check=True, timeout=60)
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_secrets_are_generated_at_first_start_and_kept_on_the_next(tmp_path):
    first = _run_secrets_init(tmp_path / "a")
    again = _run_secrets_init(tmp_path / "a")
    other = _run_secrets_init(tmp_path / "b")
    assert again == first  # a restart keeps them (the database was initialised with them)
    for name in ("postgres-password", "minio-password", "jwt-secret", "api-secret-key", "fernet-key"):
        assert len(first[name]) >= 32 and first[name] != other[name], name
    assert first["postgres-password"] in first["sql-alchemy-conn"]
    assert first["postgres-password"] in first["celery-result-backend"]
    assert first["minio-password"] in first["aws-credentials"]
    assert len(json.loads(first["passwords.json"])["admin"]) >= 32
    from cryptography.fernet import Fernet

    Fernet(first["fernet-key"].encode())  # a valid key


def test_the_registry_signing_key_is_a_generated_connection_every_airflow_component_reads(tmp_path):
    """The artifact root is on S3, so every worker and model server needs the same registry signing key
    (connection mlops_registry); it is generated, read through Airflow's local-file secrets backend."""
    generated = _run_secrets_init(tmp_path)
    registry = json.loads(generated["connections.json"])["mlops_registry"]
    assert registry["conn_type"] == "generic" and len(registry["password"]) >= 32
    assert (
        registry["password"]
        != json.loads(_run_secrets_init(tmp_path / "b")["connections.json"])["mlops_registry"]["password"]
    )
    from airflow.secrets.local_filesystem import LocalFilesystemBackend

    env = COMPOSE["x-airflow"]["environment"]
    backend = env["AIRFLOW__SECRETS__BACKEND"]
    assert backend == f"{LocalFilesystemBackend.__module__}.{LocalFilesystemBackend.__name__}"
    path = json.loads(env["AIRFLOW__SECRETS__BACKEND_KWARGS"])["connections_file_path"]
    (tmp_path / "secrets").mkdir(exist_ok=True)
    copy = tmp_path / "secrets" / "connections.json"
    copy.write_text(generated["connections.json"])
    assert path == "/run/secrets/mlops/connections.json"
    conn = LocalFilesystemBackend(connections_file_path=str(copy)).get_connection("mlops_registry")
    assert conn.password == registry["password"]


def test_every_secret_file_a_service_reads_is_generated(tmp_path):
    generated = set(_run_secrets_init(tmp_path))
    text = (ROOT / "docker-compose.yaml").read_text()
    import re

    read = set(re.findall(r"/run/secrets/mlops/([A-Za-z0-9_.-]+)", text))
    assert read and read <= generated, read - generated
    for name, service in COMPOSE["services"].items():
        if "/run/secrets/mlops/" in json.dumps(service.get("environment", {})) + json.dumps(
            service.get("entrypoint", "")
        ):
            assert any(_mounts_secrets(v) for v in service.get("volumes", [])), name


def _mounts_secrets(volume: str | dict) -> bool:
    if isinstance(volume, dict):
        return volume.get("source") == "secrets" and volume.get("target") == "/run/secrets/mlops"
    return "secrets:/run/secrets/mlops" in volume


def test_ray_nodes_run_the_project_image_that_the_tuning_job_imports():
    # the job RayTuneOperator submits imports airflow_mlops and the locked ML libraries; a stock Ray image
    # has neither, and its Ray may differ from the client's
    airflow = COMPOSE["services"]["airflow-worker"]
    for name in ("ray-head", "ray-worker"):
        node = COMPOSE["services"][name]
        assert node["image"] == airflow["image"] == "airflow-mlops:local", name
        assert node["build"] == airflow["build"], name
        assert node["command"][:2] == ["ray", "start"] and "--block" in node["command"], name
    lock = (ROOT / "requirements.lock").read_text()
    assert "\nray==" in lock  # the image installs the lock, so the nodes run the client's Ray


def test_the_landing_zone_and_offline_store_on_s3_go_to_the_compose_object_store():
    # landing_root and offline_root take no connection: boto's own endpoint setting must point at MinIO,
    # or the scaled setup would read and write real AWS
    env = _airflow_env()
    s3_roots = [
        k
        for k in ("AIRFLOW__MLOPS__LANDING_ROOT", "AIRFLOW__MLOPS__OFFLINE_ROOT")
        if env[k].startswith("s3://")
    ]
    assert s3_roots
    minio = json.loads(env["AIRFLOW_CONN_MLOPS_S3"])["extra"]["endpoint_url"]
    assert env["AWS_ENDPOINT_URL_S3"] == minio


def test_every_store_one_task_writes_for_another_is_on_the_object_store():
    # landing zone, offline store, artifacts and quarantine: a worker's disk goes with its container
    roots = {o for o in get_provider_info()["config"]["mlops"]["options"] if o.endswith("_root")}
    env = _airflow_env()
    assert {"landing_root", "offline_root", "artifact_root", "quarantine_root"} <= roots
    for option in roots:
        assert env.get(f"AIRFLOW__MLOPS__{option.upper()}", "").startswith("s3://mlops/"), option


def test_feast_shares_one_registry_and_materializes_on_the_ray_cluster(tmp_path):
    env = _airflow_env()
    feast = json.loads(env["AIRFLOW_CONN_FEAST_DEFAULT"])
    extra = feast["extra"]
    assert (feast["host"], extra["online_store_type"]) == ("redis", "redis")
    assert feast["schema"] != "0"  # db 0 is Celery's broker
    # the registry: a generated connection (it holds the database password) to a database created at start
    registry = json.loads(_run_secrets_init(tmp_path)["connections.json"])[extra["registry_conn_id"]]
    assert registry["conn_type"] == "postgres" and registry["host"] == "postgres"
    creates = " ".join(COMPOSE["services"]["mlops-db-init"]["entrypoint"])
    assert f"for db in mlops {registry['schema']};" in creates
    # materialization on the cluster the tuning uses
    assert f"AIRFLOW_CONN_{extra['ray_conn_id'].upper()}" in env
    assert extra["repo_path"] in {v.split(":")[1] for v in COMPOSE["x-airflow"]["volumes"]}


def test_ray_nodes_reach_the_artifact_store_as_the_workers_do_and_get_no_database_password(tmp_path):
    airflow = _airflow_env()
    generated = _run_secrets_init(tmp_path)
    for name in ("ray-head", "ray-worker"):
        node = COMPOSE["services"][name]
        env = node["environment"]
        for key in (
            "AIRFLOW__MLOPS__ARTIFACT_ROOT",
            "AIRFLOW__MLOPS__ARTIFACT_CONN_ID",
            "AIRFLOW__MLOPS__OFFLINE_ROOT",
            "AIRFLOW_CONN_MLOPS_S3",
            "AWS_ENDPOINT_URL_S3",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AIRFLOW__SECRETS__BACKEND",
            "AIRFLOW__SECRETS__BACKEND_KWARGS",
        ):
            assert env[key] == airflow[key], (name, key)
        assert env["GRPC_ENABLE_FORK_SUPPORT"] == "false", name  # the Ray Client proxy (docs/scaling.md)
        [mount] = node["volumes"]
        assert mount["volume"]["subpath"] == "ray" and mount["read_only"], name
    # what the subpath holds: the S3 keys and the registry signing key of the workers, nothing else
    assert generated["ray/aws-credentials"] == generated["aws-credentials"]
    assert json.loads(generated["ray/connections.json"]) == {
        "mlops_registry": json.loads(generated["connections.json"])["mlops_registry"]
    }
    assert not any(
        generated["postgres-password"] in text for key, text in generated.items() if key.startswith("ray/")
    )


def test_a_serving_host_runs_the_serving_queue_and_its_router_is_reached_by_the_others():
    service = COMPOSE["services"]["airflow-serving-worker"]
    assert service["image"] == "airflow-mlops:local"
    assert service["command"] == "celery worker --queues serving"
    env = service["environment"]
    assert env["AIRFLOW__MLOPS__SERVING_ROUTER_HOST"] == "0.0.0.0"
    assert {k: v for k, v in env.items() if k != "AIRFLOW__MLOPS__SERVING_ROUTER_HOST"} == _airflow_env()
    assert _ports(service) == []  # the compose network only


def test_a_worker_that_dies_has_its_task_retried():
    # the lifecycle factory's DAGs take Airflow's default retries (0 unless set)
    assert int(_airflow_env()["AIRFLOW__CORE__DEFAULT_TASK_RETRIES"]) >= 1
