"""FeastHook configuration: paths from the settings and the environment (never the working directory),
online-store overrides from the connection, errors that name what is wrong and never the password."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from airflow_mlops.exceptions import FeatureRepoError
from airflow_mlops.hooks.feast import FeastHook

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "pw-very-secret-42"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
    monkeypatch.delenv("MLOPS_FEAST_DIR", raising=False)
    monkeypatch.delenv("MLOPS_OFFLINE_ROOT", raising=False)
    target = tmp_path / "repo"
    target.mkdir()
    shutil.copy(ROOT / "feature_repo" / "feature_store.yaml", target / "feature_store.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    return target


def _connection(monkeypatch, conn_id: str, **fields) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "feast", **fields}))
    return conn_id


def test_paths_come_from_the_settings_not_the_working_directory(repo, tmp_path):
    config = FeastHook(repo_path=str(repo)).repo_config
    state = tmp_path / "state"
    assert config.registry.path == f"{state}/feast/registry.db"
    assert config.online_store.type == "sqlite"
    assert config.online_store.path == f"{state}/feast/online_store.db"
    # Feast's duckdb store, reading object-store sources through fsspec (no httpfs download)
    assert config.offline_store.type == "airflow_mlops.hooks.feast_offline.FsspecDuckDBOfflineStore"
    assert (state / "feast").is_dir()
    assert not (tmp_path / "elsewhere" / "data").exists()


def test_the_environment_can_move_the_feast_folder(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_FEAST_DIR", str(tmp_path / "custom"))
    assert FeastHook(repo_path=str(repo)).repo_config.registry.path == f"{tmp_path}/custom/registry.db"


def test_the_connection_switches_to_redis_with_its_password(repo, monkeypatch):
    conn_id = _connection(
        monkeypatch,
        "feast_unit",
        host="redis.example",
        port=6380,
        schema="2",
        password=PASSWORD,
        extra={"repo_path": str(repo), "online_store_type": "redis", "online_store": {"key_ttl_seconds": 60}},
    )
    hook = FeastHook(feast_conn_id=conn_id)
    online = hook.repo_config.online_store
    assert hook.repo_path == repo
    assert online.type == "redis"
    assert online.connection_string == f"redis.example:6380,db=2,password={PASSWORD}"
    assert online.key_ttl_seconds == 60
    assert hook.online_store_type == "redis"


def test_an_invalid_override_names_the_file_and_hides_the_password(repo, monkeypatch):
    conn_id = _connection(
        monkeypatch,
        "feast_bad",
        host="redis.example",
        password=PASSWORD,
        extra={"repo_path": str(repo), "online_store": {"type": "redis", "redis_type": "not-a-type"}},
    )
    with pytest.raises(FeatureRepoError) as err:
        _ = FeastHook(feast_conn_id=conn_id).repo_config
    assert f"{repo}/feature_store.yaml" in str(err.value)
    assert "feast_bad" in str(err.value)
    assert PASSWORD not in str(err.value)


def test_a_repository_without_feature_store_yaml_is_named(tmp_path):
    with pytest.raises(FeatureRepoError, match=rf"Feast repository '{tmp_path}' has no feature_store.yaml"):
        _ = FeastHook(repo_path=str(tmp_path)).repo_config


def test_a_relative_repository_path_is_refused():
    with pytest.raises(FeatureRepoError, match="'feature_repo' is relative"):
        _ = FeastHook(repo_path="feature_repo").repo_path


def test_an_undefined_variable_is_named(repo):
    (repo / "feature_store.yaml").write_text("project: p\nregistry: ${NO_SUCH_FEAST_VAR}/registry.db\n")
    with pytest.raises(FeatureRepoError, match="undefined variable\\(s\\) NO_SUCH_FEAST_VAR"):
        _ = FeastHook(repo_path=str(repo)).repo_config


def test_a_yaml_without_project_is_refused(repo):
    (repo / "feature_store.yaml").write_text("provider: local\n")
    with pytest.raises(FeatureRepoError, match="is not a Feast configuration"):
        _ = FeastHook(repo_path=str(repo)).repo_config


def test_connections(repo, monkeypatch):
    # the default id may be absent (the repository's own configuration is used) ...
    assert FeastHook(repo_path=str(repo)).connection is None
    # ... any other id must exist
    with pytest.raises(FeatureRepoError, match="Feast connection 'feast_missing' does not exist"):
        _ = FeastHook(feast_conn_id="feast_missing", repo_path=str(repo)).connection
    with pytest.raises(FeatureRepoError, match="no Feast repository given"):
        _ = FeastHook().repo_path


def test_test_connection_reports_an_unreachable_redis_without_the_password(repo, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    conn_id = _connection(
        monkeypatch,
        "feast_down",
        host="127.0.0.1",
        port=port,
        password=PASSWORD,
        extra={"repo_path": str(repo), "online_store_type": "redis"},
    )
    ok, message = FeastHook(feast_conn_id=conn_id).test_connection()
    assert not ok
    assert "Connection" in message and str(port) in message
    assert PASSWORD not in message


def test_the_hook_is_lazy_and_builds_the_store_once(repo):
    assert (FeastHook.conn_type, FeastHook.default_conn_name, FeastHook.conn_name_attr) == (
        "feast",
        "feast_default",
        "feast_conn_id",
    )
    FeastHook(repo_path="/nowhere")  # constructing does no I/O: the bad path is only seen when used
    hook = FeastHook(repo_path=str(repo))
    store = hook.store
    assert hook.store is store
    assert store.config is hook.repo_config


def test_airflow_registers_the_feast_connection_type_with_its_form():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert manager.hooks["feast"].hook_class_name == "airflow_mlops.hooks.feast.FeastHook"
    assert manager.hooks["feast"].connection_testable
    assert {"extra__feast__repo_path", "extra__feast__online_store_type"} <= set(
        manager.connection_form_widgets
    )
    assert manager.field_behaviours["feast"]["relabeling"]["password"] == "Online store password"


def _registry_connections(monkeypatch, repo: Path, port: int, password: str = PASSWORD) -> str:
    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_PG",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": port,
                "schema": "feast",
                "login": "feast",
                "password": password,
            }
        ),
    )
    return _connection(
        monkeypatch,
        "feast_shared",
        extra={"repo_path": str(repo), "registry_conn_id": "feast_pg", "registry": {"cache_ttl_seconds": 5}},
    )


def test_the_registry_connection_moves_the_registry_to_postgresql(repo, monkeypatch):
    conn_id = _registry_connections(monkeypatch, repo, 5433, password="p@ss/word:1")
    registry = FeastHook(feast_conn_id=conn_id).repo_config.registry
    assert registry.registry_type == "sql"
    assert registry.path == "postgresql+psycopg://feast:p%40ss%2Fword%3A1@127.0.0.1:5433/feast"
    assert registry.cache_ttl_seconds == 5


def test_the_registry_extra_alone_overrides_the_repository_registry(repo, tmp_path, monkeypatch):
    conn_id = _connection(
        monkeypatch,
        "feast_ttl",
        extra={"repo_path": str(repo), "registry": {"cache_ttl_seconds": 7}},
    )
    registry = FeastHook(feast_conn_id=conn_id).repo_config.registry
    assert registry.registry_type == "file"
    assert registry.path == f"{tmp_path}/state/feast/registry.db"
    assert registry.cache_ttl_seconds == 7


def test_an_unreachable_registry_names_the_connection_and_hides_the_password(repo, monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    conn_id = _registry_connections(monkeypatch, repo, port, password="p@ss/word:1")
    hook = FeastHook(feast_conn_id=conn_id)
    with caplog.at_level("DEBUG"), pytest.raises(Exception) as err:
        hook.feature_views()
    message = str(err.value)
    assert "'feast_pg'" in message and "cannot open" in message
    for form in ("p@ss/word:1", "p%40ss%2Fword%3A1"):
        assert form not in message
        assert form not in caplog.text
    ok, reported = hook.test_connection()
    assert not ok and "p%40ss%2Fword%3A1" not in reported and "p@ss/word:1" not in reported


def test_a_registry_connection_of_another_type_is_refused(repo, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_MYSQL", json.dumps({"conn_type": "mysql", "host": "db"}))
    conn_id = _connection(
        monkeypatch, "feast_my", extra={"repo_path": str(repo), "registry_conn_id": "feast_mysql"}
    )
    with pytest.raises(FeatureRepoError, match="type 'postgres'"):
        _ = FeastHook(feast_conn_id=conn_id).repo_config
