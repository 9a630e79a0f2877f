"""System test of the scaled topology (issue 14, first slice), every process native and started here.

Airflow 3.3 with the CeleryExecutor on PostgreSQL 15, a Redis broker, moto's S3 for the landing zone,
offline store, artifacts and quarantine, and two Celery workers each in a network namespace of its own
(a separate host, with its own ``[mlops] state_dir``): see :mod:`scaled_topology` and
docs/scaling.md. The reference DAG ``flights_ingest`` (``dags/``, weekly batches) runs through
it: the outcome is the embedded run's (every day published on S3 with the landed rows, one Asset event per
run), the task instances ran on both workers, and a worker killed (SIGKILL of its whole session) while it
runs a task loses nothing: Airflow fails the silent task instance after
``[scheduler] task_instance_heartbeat_timeout``, retries it on the other worker and the run succeeds with
the same data.

Feast's registry (SQL, on the PostgreSQL) and online store (the Redis) are shared through the
``feast_default`` connection: each worker reaches both from its namespace. Not in this slice:
``flights_features`` (its DuckDB offline store cannot read ``s3://`` without the ``httpfs`` extension:
see docs/scaling.md), the Ray cluster, training, monitoring, retraining and the serving host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
]

DAG_ID = "flights_ingest"
WEEKS = ["2013-01-01", "2013-01-08", "2013-01-15"]


def _week_days(first: str) -> list[str]:
    start = datetime.fromisoformat(first)
    return [(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(7)]


@pytest.fixture(scope="module")
def topology(postgres_server):
    from scaled_topology import scaled_topology

    root = Path(tempfile.mkdtemp(prefix="mlops-scaled-"))
    saved = dict(os.environ)
    try:
        with scaled_topology(postgres_server, root) as topology:
            # this process lands the batches and reads the results on S3 with the topology's settings
            os.environ.update(topology.settings_env)
            from airflow_mlops.demo.data import land

            land(start=WEEKS[0], end=_week_days(WEEKS[-1])[-1], cadence="weekly")
            client = topology.stack.client
            client.wait(f"the DAG processor to serve {DAG_ID}", lambda: client.dag(DAG_ID), 180)
            client.unpause(DAG_ID)
            yield topology
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)


def _flights_by_day() -> dict[str, int]:
    from airflow_mlops.demo.data import read_table

    flights = read_table("flights")
    days = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    return days.value_counts().to_dict()


def _published(day: str) -> pd.DataFrame:
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.config import load_settings

    settings = load_settings()
    assert settings.offline_root.startswith("s3://")
    path = as_path(
        f"{settings.offline_root}/flights/date={day}/part-0.parquet", conn_id=settings.artifact_conn_id
    )
    with path.open("rb") as handle:
        return pd.read_parquet(handle)


def _backfill(topology, first: str, last: str) -> list[dict]:
    """Backfill the weeks starting in [first, last]; their runs once all were created."""
    client = topology.stack.client
    weeks = [w for w in WEEKS if first <= w <= last]
    # one backfill per DAG at a time: the scheduler marks the previous one complete a few seconds late
    client.wait("the previous backfill to complete", lambda: not client.active_backfills(DAG_ID), 120)
    client.backfill(DAG_ID, first, last, max_active_runs=2)

    def runs() -> list[dict]:
        found = [
            r
            for r in client.runs(DAG_ID, run_type="backfill")
            if (r.get("data_interval_start") or "")[:10] in weeks
        ]
        return found if len(found) == len(weeks) else []

    return client.wait(f"the backfill of {first}..{last} to create its runs", runs, 120)


def _hostnames(topology, run_ids: list[str]) -> dict[str, set[str]]:
    client = topology.stack.client
    return {
        run_id: {ti["hostname"] for ti in client.task_instances(DAG_ID, run_id) if ti["hostname"]}
        for run_id in run_ids
    }


def _check_published(weeks: list[str]) -> None:
    counts = _flights_by_day()
    for week in weeks:
        for day in _week_days(week):
            published = _published(day)
            assert len(published) == counts[day] > 600, day
            assert published["flight"].notna().all()


def test_ingest_runs_on_both_workers_and_publishes_every_day_on_s3(topology):
    client = topology.stack.client
    runs = _backfill(topology, WEEKS[0], WEEKS[1])
    for run in runs:
        client.wait_run(DAG_ID, run["dag_run_id"], timeout=420)

    _check_published(WEEKS[:2])
    workers = {topology.worker_address(h) for h in topology.worker_hosts}
    seen = set().union(*_hostnames(topology, [r["dag_run_id"] for r in runs]).values())
    assert seen == workers, f"task instances ran on {seen}, the workers are {workers}"
    for run in runs:
        validated = client.xcom(DAG_ID, run["dag_run_id"], "validate_batch")
        assert validated["success"] is True and validated["failed"] == 0, validated


def test_a_worker_killed_mid_task_loses_nothing(topology):
    client = topology.stack.client
    (run,) = _backfill(topology, WEEKS[2], WEEKS[2])
    run_id = run["dag_run_id"]
    addresses = {topology.worker_address(h): h for h in topology.worker_hosts}

    def running_on_a_worker() -> dict | None:
        for ti in client.task_instances(DAG_ID, run_id):
            if ti["state"] == "running" and ti["hostname"] in addresses:
                return ti
        if client.run(DAG_ID, run_id)["state"] in ("success", "failed"):
            pytest.fail(
                f"the run finished before a task could be caught running: {client.task_states(DAG_ID, run_id)}"
            )
        return None

    victim = client.wait("a task of the run to run on a worker", running_on_a_worker, 300, interval=0.3)
    dead = addresses[victim["hostname"]]
    topology.kill_worker(dead)
    killed_at = time.monotonic()
    try:
        finished = client.wait_run(DAG_ID, run_id, timeout=420, check=False)
        assert finished["state"] == "success", client.failure_report(DAG_ID, run_id)
        retried = next(
            ti for ti in client.task_instances(DAG_ID, run_id) if ti["task_id"] == victim["task_id"]
        )
        survivor = next(a for a, h in addresses.items() if h != dead)
        assert retried["try_number"] > victim["try_number"], retried
        assert retried["hostname"] == survivor, retried
        _check_published(WEEKS)
        print(
            f"{victim['task_id']} retried on {survivor} and done {time.monotonic() - killed_at:.0f} s after the kill"
        )
    finally:
        with contextlib.suppress(Exception):
            topology.start_worker(dead)  # the host comes back for later tests of the module


CONNECTIONS_CHECK = """
from airflow_mlops.hooks.feast import FeastHook
from airflow_mlops.hooks.ray import RayHook
hook = FeastHook()
ok, message = hook.test_connection()
print(message)
print("registry:", hook.repo_config.registry.registry_type)
ray_ok, ray_message = RayHook().test_connection()
print("ray:", RayHook().address, ray_message)
raise SystemExit(0 if ok and ray_ok else 1)
"""


def test_every_worker_reaches_feasts_shared_registry_online_store_and_the_ray_cluster(topology):
    """The topology's ``feast_default`` and ``ray_default`` connections (docs/scaling.md): from its own
    namespace each worker opens the SQL registry on PostgreSQL, pings Redis and reaches the Ray Jobs API
    on the bridge, so an apply on one worker is seen on the other (tests/integration/test_feast_sql_registry.py
    shows that part) and any worker can submit the tuning."""
    import subprocess
    import sys

    for host in (*topology.worker_hosts, topology.serving_host):
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                topology.network.namespace(host),
                sys.executable,
                "-c",
                CONNECTIONS_CHECK,
            ],
            env=topology.worker_env[host],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{host}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        assert "redis online store reachable" in result.stdout and "registry: sql" in result.stdout
        assert f"ray: {topology.ray.dashboard_url}" in result.stdout, result.stdout


RAY_JOB = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=1)
def read(uri):
    from airflow_mlops.artifacts import ArtifactStore
    from ray.util import get_node_ip_address
    store = ArtifactStore()
    return get_node_ip_address(), store.read_json(uri)

ray.init()
nodes = [n for n in ray.nodes() if n["Alive"]]
answers = ray.get([
    read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(sys.argv[1])
    for n in nodes
])
print("ANSWERS", json.dumps(sorted(answers)))
"""


def test_a_ray_job_runs_on_both_nodes_and_reads_the_artifact_store(topology):
    """The Ray cluster (docs/scaling.md): the head on the main host and a worker node on a host of its own;
    a Ray Job submitted to the Jobs API on the bridge runs a task on each node, and each reads an object of
    the artifact store (``s3://mlops/artifacts``, moto) through the settings the Ray processes were
    started with, as the tuning job does with its training set."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from airflow_mlops.artifacts import ArtifactStore

    started = time.monotonic()
    nodes = topology.ray.alive_nodes()
    assert nodes == sorted([topology.network.main_ip, topology.network.address("ray")]), nodes
    store = ArtifactStore()
    target = store.path("topology", "probe.json")
    store.write_json(target, {"written_by": "the test"})
    client = JobSubmissionClient(topology.ray.dashboard_url)
    job = client.submit_job(
        entrypoint=f"python -c {shlex.quote(RAY_JOB)} {shlex.quote(str(target))}",
        submission_id=f"topology-probe-{os.getpid()}",
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    answers = json.loads(logs.split("ANSWERS ", 1)[1].splitlines()[0])
    assert sorted(ip for ip, _ in answers) == nodes
    assert all(body == {"written_by": "the test"} for _, body in answers), answers
    print(f"Ray Job on both nodes in {time.monotonic() - started:.0f} s")
