"""Provider registration: what Airflow discovers through the ``apache_airflow_provider`` entry point.

Grows with every subject the package ships. Must stay importable without any ML library.
"""

from __future__ import annotations

from typing import Any

_INTEGRATION = "airflow-mlops"


def _option(description: str, example: str | None, default: str | None) -> dict[str, Any]:
    return {
        "description": description,
        "version_added": "0.1.0",
        "type": "string",
        "example": example,
        "default": default,
    }


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-mlops",
        "name": "MLOps lifecycle",
        "description": "Validation (Great Expectations), features (Feast), tuning (Ray Tune), "
        "serving (BentoML) and drift monitoring (Evidently) as Airflow operators and lifecycle DAGs.",
        "versions": ["0.1.0"],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://github.com/airflow-mlops/airflow-mlops/tree/main/docs",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "airflow_mlops.operators.offline_store",
                    "airflow_mlops.operators.validation",
                    "airflow_mlops.operators.features",
                    "airflow_mlops.operators.tuning",
                    "airflow_mlops.operators.registry",
                    "airflow_mlops.operators.serving",
                    "airflow_mlops.operators.multi_model",
                    "airflow_mlops.operators.shadow",
                    "airflow_mlops.operators.drift",
                    "airflow_mlops.operators.batch_scoring",
                ],
            }
        ],
        "hooks": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.hooks.feast"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.hooks.ray"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.hooks.bentoml"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.hooks.state"]},
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_mlops.hooks.feast.FeastHook",
                "connection-type": "feast",
                "hook-name": "Feast",
                "conn-fields": {
                    "repo_path": {
                        "label": "Feature repository path",
                        "description": "Absolute path of the folder holding feature_store.yaml.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "online_store_type": {
                        "label": "Online store type",
                        "description": "Override the repository's online store, e.g. redis (host, port, "
                        "schema = db number and password are then used).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "registry_conn_id": {
                        "label": "Registry connection",
                        "description": "A postgres connection whose database holds Feast's SQL registry, "
                        "shared by every worker (empty = the repository's registry file on the worker).",
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["login"],
                    "relabeling": {
                        "host": "Online store host (Redis)",
                        "port": "Online store port",
                        "schema": "Redis database number",
                        "password": "Online store password",
                    },
                    "placeholders": {
                        "host": "redis.internal",
                        "port": "6379",
                        "extra": '{"online_store": {"key_ttl_seconds": 604800}}',
                    },
                },
            },
            {
                "hook-class-name": "airflow_mlops.hooks.ray.RayHook",
                "connection-type": "ray",
                "hook-name": "Ray",
                "ui-field-behaviour": {
                    "hidden-fields": ["login"],
                    "relabeling": {
                        "host": "Ray head (empty = local Ray in the task)",
                        "password": "Bearer token",
                    },
                    "placeholders": {
                        "host": "10.0.0.5 or https://ray.example.com (leave empty for local Ray)",
                        "port": "8265",
                        "schema": "http",
                        "extra": '{"runtime_env": {"pip": ["lightgbm"]}, "verify": true}',
                    },
                },
            },
            {
                "hook-class-name": "airflow_mlops.hooks.bentoml.BentoMLHook",
                "connection-type": "bentoml",
                "hook-name": "BentoML",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "port"],
                    "relabeling": {"host": "Endpoint URL (optional)", "password": "API key"},
                    "placeholders": {"extra": '{"home": "/srv/mlops/bentoml"}'},
                },
            },
        ],
        "sensors": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.sensors.landing"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.sensors.serving"]},
        ],
        "triggers": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.triggers.landing"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.triggers.ray"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.triggers.serving"]},
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_mlops.triggers.drift"]},
        ],
        "extra-links": [
            "airflow_mlops.operators.validation.ValidationReportLink",
            "airflow_mlops.operators.drift.DriftReportLink",
        ],
        # no "plugins": the plugin is registered by the airflow.plugins entry point, which Airflow always
        # loads; listing it here too made Airflow register it twice when [core] lazy_discover_providers
        # is off ("Plugin 'airflow_mlops' already registered", a plugin import error)
        "config": {
            "mlops": {
                "description": "Settings of the airflow-mlops provider (also as AIRFLOW__MLOPS__<OPTION>).",
                "options": {
                    "state_dir": _option(
                        "Local folder for state that is not an artifact: landing zone, offline store, "
                        "Feast registry. Empty means $AIRFLOW_HOME/mlops.",
                        "/srv/mlops",
                        "",
                    ),
                    "artifact_root": _option(
                        "Where runs write artifacts: file://, s3:// or gs://. Empty means "
                        "file://<state_dir>/artifacts.",
                        "s3://my-bucket/mlops",
                        "",
                    ),
                    "artifact_conn_id": _option(
                        "Airflow connection used for a remote artifact_root (aws or google_cloud_platform).",
                        "aws_default",
                        "",
                    ),
                    "state_conn_id": _option(
                        "Airflow connection of the SQL database (PostgreSQL) holding the shared state: "
                        "registry metadata, deployments, the retraining gate. When the connection does not "
                        "exist, the SQLite file <state_dir>/mlops-state.db.",
                        "mlops_state",
                        "mlops_state",
                    ),
                    "offline_root": _option(
                        "Root of the offline store (validated tables, one partition per batch). Empty means "
                        "file://<state_dir>/offline.",
                        "file:///srv/mlops/offline",
                        "",
                    ),
                    "landing_root": _option(
                        "Where raw batches land before validation. Empty means file://<state_dir>/landing.",
                        "file:///srv/mlops/landing",
                        "",
                    ),
                    "ray_num_cpus": _option(
                        "CPUs the local Ray started inside a tuning task may use. Empty means all of them.",
                        "2",
                        "",
                    ),
                    "quarantine_root": _option(
                        "Where batches that fail validation are kept (a relative quarantine_uri is taken "
                        "under it). Empty means the folder 'quarantine' beside landing_root, on the same store.",
                        "s3://bucket/quarantine",
                        "",
                    ),
                    "prediction_log_max_rows": _option(
                        "Most prediction-log rows a model server keeps in memory while the store cannot be "
                        "written; past it the oldest are dropped and counted. Empty means 200000.",
                        "200000",
                        "",
                    ),
                    "prediction_log_retention_days": _option(
                        "Prediction-log day partitions older than this many days are removed by the model "
                        "server. Empty or 0 keeps every day.",
                        "90",
                        "",
                    ),
                    "serving_max_rows": _option(
                        "Most rows one /predict_batch request to a served model may carry (more: HTTP 413). "
                        "Empty means 5000.",
                        "5000",
                        "",
                    ),
                    "serving_max_body_bytes": _option(
                        "Largest request body a served model (and its router) reads (more: HTTP 413). Empty "
                        "means 8388608 (8 MiB).",
                        "8388608",
                        "",
                    ),
                    "serving_env_allow": _option(
                        "Further environment variables the model server and router inherit from the worker, "
                        "comma-separated, a trailing * for a prefix (see docs/security.md).",
                        "CORP_*, LD_LIBRARY_PATH",
                        "",
                    ),
                    "shadow_cpu": _option(
                        "CPU priority of a shadow version and of the router's sender of its copies: idle "
                        "(production first; copies the shadow cannot keep up with are dropped and counted) or "
                        "shared (normal priority: every copy answered, competing with production). Empty "
                        "means idle.",
                        "shared",
                        "",
                    ),
                    "multi_model_memory_budget_mb": _option(
                        "Memory budget (MB) of the models loaded on a multi-model endpoint; past it the least "
                        "recently used are unloaded. Empty means 1024.",
                        "512",
                        "",
                    ),
                },
            }
        },
    }
