"""Scale-out figures from one run (``python benchmarks/bench_scale.py --parts materialize,tune,ingest``).

``materialize``: a synthetic feature view (``--entities`` string keys, 3 versions each, 6 features) in a
parquet offline store, materialized into Feast's SQLite online store, in online rows (one per entity key)
per second:

- ``local``: Feast's local engine (it reads every row of the interval and keeps the latest per key);
- ``local, pull_latest``: the same with Feast's ``materialization: pull_latest_features: true`` (the latest
  row per key comes from the offline store's query, DuckDB): the cheap fix tried;
- ``ray``: the Ray engine the ``feast`` connection selects (``ray_conn_id``) on a 2-node Ray cluster (a head
  and a worker started here with ``ray start``, like the test suite's ``ray_cluster`` fixture); ``cold``
  is the first materialization (the cluster starts its Python workers and imports Feast), then a second
  one into a fresh online store;
- ``direct``: the same latest rows, converted to Feast's online format beforehand (not timed), written with
  the online store's own ``online_write_batch``: the store's practical limit, the baseline of the ratios;
- ``executemany``: the rows Feast stored in SQLite, byte for byte, written with ``sqlite3.executemany``
  into a fresh table (the issue's baseline; counted here in entity keys, like the others).

``tune``: the same search (``RayTuneOperator``, HistGradientBoosting on ``--tune-rows`` Jan-Mar flights,
``--trials`` ASHA-free FIFO trials) on local Ray in the process (``[mlops] ray_num_cpus`` = ``--cpus``)
and as a Ray Job on the 2-node cluster: wall times and their ratio.

``ingest`` (root: network namespaces): the scaled topology of the test suite (``tests/system/
scaled_topology.py``, imported, not copied: PostgreSQL from ``tests/pg_server.py``, Redis, moto's S3,
Airflow with the CeleryExecutor, Celery workers in network namespaces, concurrency 1 each), the reference
``flights_ingest`` DAG (``dags/``, weekly batches: wait, Great Expectations validation, publish to the
offline store on S3). Two backfills of ``--ingest-batches`` weekly batches (default 13), ``max_active_runs``
= ``--ingest-runs`` (default 3, so that two workers have work at once), one with only worker ``w1``
running (``w2`` killed before it; the serving host's worker takes only the ``serving`` queue), one with
``w1`` and ``w2``. Each backfill runs on batches never ingested before: the first (``--ingest-order``,
default one worker first) takes the weeks from 2013-01-01, the second the next as many weeks (13: 81,759
vs 85,365 flights, so rows per second are printed beside the wall times). Both sets are landed on S3
before either is timed. Timed: from the backfill's request until the API reports its last run finished
(polled every second). Printed: batches, rows published (the publish tasks' XCom), wall time, the task
instances by worker (their ``hostname``), retries, and the ratios two workers / one worker; also as a JSON
line (and the whole run's figures in ``--json``'s file).

Everything lives in a temporary folder; the clusters and the topology are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("executemany", "direct", "local", "local, pull_latest", "ray (2 nodes)")
WORK = Path(tempfile.mkdtemp(prefix="bench-scale-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(WORK / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__MLOPS__STATE_DIR": str(WORK / "mlops"),
        "MLOPS_OFFLINE_ROOT": f"file://{WORK / 'offline'}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
)
for key in ("AIRFLOW__MLOPS__ARTIFACT_ROOT", "AIRFLOW__MLOPS__OFFLINE_ROOT", "AIRFLOW__MLOPS__LANDING_ROOT"):
    os.environ.pop(key, None)
sys.path.insert(0, str(ROOT / "benchmarks"))

START, END = "2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00"
FEATURES = ["f0", "f1", "f2", "f3", "f4", "n"]
STORE_YAML = """project: bench
provider: local
registry:
  registry_type: file
  path: ${MLOPS_FEAST_DIR}/registry.db
offline_store:
  type: duckdb
online_store:
  type: sqlite
  path: ${MLOPS_FEAST_DIR}/online_store.db
entity_key_serialization_version: 3
"""
DEFINITIONS = """import os
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64
from feast.value_type import ValueType

item = Entity(name="item", join_keys=["item"], value_type=ValueType.STRING)
items = FeatureView(
    name="items",
    entities=[item],
    ttl=timedelta(days=3),
    schema=[Field(name=f"f{i}", dtype=Float64) for i in range(5)] + [Field(name="n", dtype=Int64)],
    source=FileSource(
        name="items_source",
        path=os.environ["MLOPS_OFFLINE_ROOT"].removeprefix("file://") + "/items/*.parquet",
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
    ),
    online=True,
)
"""


def _context(task_id: str) -> dict:
    return {
        "ti": SimpleNamespace(
            dag_id="bench_scale", run_id=f"run-{time.time_ns()}", task_id=task_id, try_number=1, map_index=-1
        ),
        "outlet_events": {},
    }


def _quiet() -> None:
    import logging

    for name in ("feast", "airflow", "py.warnings", "ray", "airflow_mlops"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def ray_cluster() -> Iterator[dict]:
    """A head (2 CPUs, dashboard = Jobs API) and a worker node (1 CPU) on 127.0.0.1, as the test suite's
    ``ray_cluster`` fixture starts them; yields the GCS address and the dashboard port."""
    from airflow_mlops.net import free_port

    ray = str(Path(sys.executable).parent / "ray")
    gcs, dashboard = free_port(), free_port()
    temp = f"/tmp/ray-bench-{os.getpid()}"
    logs = WORK / "ray-logs"
    logs.mkdir(exist_ok=True)

    def ports() -> list[str]:
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def start(name: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [
                ray,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                *ports(),
                *args,
            ],
            cwd=logs,
            stdout=open(logs / f"{name}.log", "wb"),  # noqa: SIM115 - the process keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    processes = [
        start(
            "head",
            [
                "--head",
                f"--port={gcs}",
                f"--ray-client-server-port={free_port()}",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--temp-dir={temp}",
            ],
        )
    ]
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dashboard}").get_version()
                break
            except Exception:
                if processes[0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start; see {logs}") from None
                time.sleep(1)
        processes.append(start("worker", [f"--address=127.0.0.1:{gcs}", "--num-cpus=1"]))
        import ray as ray_api

        ray_api.init(address=f"127.0.0.1:{gcs}", log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 120
        while ray_api.cluster_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        nodes = len([n for n in ray_api.nodes() if n["Alive"]])
        ray_api.shutdown()
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": dashboard, "nodes": nodes}
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------------------- materialize


def write_items(entities: int) -> int:
    """The offline store's table: ``entities`` keys x 3 versions in January 2013; the rows written."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(13)
    versions = 3
    keys = np.repeat([f"E{i:07d}" for i in range(entities)], versions)
    days = np.tile(np.arange(versions) * 9 + 1, entities)
    frame = pd.DataFrame(
        {
            "item": keys,
            **{f"f{i}": rng.normal(size=len(keys)) for i in range(5)},
            "n": rng.integers(0, 1000, size=len(keys)),
            "event_timestamp": pd.Timestamp("2013-01-01", tz="UTC") + pd.to_timedelta(days, unit="D"),
        }
    )
    folder = WORK / "offline" / "items"
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "part-0.parquet", index=False)
    return len(frame)


def repository(name: str, extra_yaml: str = "") -> Path:
    repo = WORK / f"repo-{name}"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(STORE_YAML + extra_yaml)
    (repo / "definitions.py").write_text(DEFINITIONS)
    return repo


def _hook(name: str, repo: Path, extra: dict | None = None):
    from airflow_mlops.hooks.feast import FeastHook

    os.environ["MLOPS_FEAST_DIR"] = str(WORK / f"feast-{name}")
    conn = {"conn_type": "feast", "extra": {"repo_path": str(repo), **(extra or {})}}
    os.environ["AIRFLOW_CONN_FEAST_BENCH"] = json.dumps(conn)
    hook = FeastHook(feast_conn_id="feast_bench")
    hook.apply()
    return hook


def _online_rows(hook) -> int:
    with sqlite3.connect(hook.repo_config.online_store.path) as con:
        return con.execute('select count(*) from "bench_items"').fetchone()[0]


def materialize(name: str, repo: Path, extra: dict | None = None) -> dict:
    from airflow_mlops.operators.features import parse_timestamp

    hook = _hook(name, repo, extra)
    start, end = parse_timestamp(START, "start"), parse_timestamp(END, "end")
    began = time.perf_counter()
    hook.store.materialize(start_date=start, end_date=end, feature_views=["items"])
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "online_rows": _online_rows(hook) // len(FEATURES)}


def direct(repo: Path, name: str = "direct") -> dict:
    """The latest row per key, converted beforehand, written with the online store's online_write_batch."""
    import pyarrow.parquet as pq
    from feast.utils import _convert_arrow_to_proto

    hook = _hook(name, repo)
    table = pq.read_table(WORK / "offline" / "items" / "part-0.parquet")
    frame = table.to_pandas().sort_values("event_timestamp").groupby("item", sort=False).tail(1)
    import pyarrow as pa

    latest = pa.Table.from_pandas(frame, preserve_index=False)
    view = hook.store.get_feature_view("items")
    rows = _convert_arrow_to_proto(
        latest, view, {e.name: e.dtype.to_value_type() for e in view.entity_columns}
    )
    online = hook.store._get_provider().online_store
    began = time.perf_counter()
    online.online_write_batch(config=hook.repo_config, table=view, data=rows, progress=None)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "online_rows": _online_rows(hook) // len(FEATURES)}


def executemany(db: Path) -> dict:
    """The rows Feast stored, byte for byte, into a fresh table with one ``executemany``."""
    with sqlite3.connect(db) as source:
        rows = source.execute('select * from "bench_items"').fetchall()
        schema = source.execute("select sql from sqlite_master where name='bench_items'").fetchone()[0]
    target = db.with_name("executemany.db")
    con = sqlite3.connect(target)
    con.execute(schema)
    began = time.perf_counter()
    con.executemany(f'insert or replace into "bench_items" values ({",".join("?" * len(rows[0]))})', rows)
    con.commit()
    seconds = time.perf_counter() - began
    con.close()
    return {"seconds": seconds, "online_rows": len(rows) // len(FEATURES)}


# ---------------------------------------------------------------------------------------------- tune


def tune(data_path: Path, trials: int, ray_conn_id: str | None) -> dict:
    from airflow_mlops.operators.tuning import RayTuneOperator

    op = RayTuneOperator(
        task_id=f"tune_{ray_conn_id or 'local'}",
        training_data_uri=str(data_path),
        label="delayed",
        time_column="sched_dep_utc",
        trainable="hist_gradient_boosting_classifier",
        search_space={
            "learning_rate": {"loguniform": [0.03, 0.3]},
            "max_leaf_nodes": {"randint": [15, 64]},
            "min_samples_leaf": {"choice": [20, 100]},
            "max_iter": 100,
            "report_every": 10,
        },
        metric="auc",
        num_samples=trials,
        scheduler="fifo",
        seed=0,
        ray_conn_id=ray_conn_id,
        deferrable=False,
        poll_interval=1,
        progress_interval=60,
    )
    began = time.perf_counter()
    result = op.execute(_context(op.task_id))
    return {
        "seconds": time.perf_counter() - began,
        "best_auc": result["best_metric"],
        "counts": result["counts"],
    }


# -------------------------------------------------------------------------------------------- ingest

INGEST_DAG = "flights_ingest"
PUBLISH_TASK = "publish_to_offline_store"
#: the reference spec's ingest runs weekly batches counted from its start date (dags/flights.yaml)
FIRST_WEEK = "2013-01-01"
WORKER_HOSTS = {"one": ("w1",), "two": ("w1", "w2")}


def _topology_modules() -> None:
    """The test suite's helpers on sys.path, as its conftests put them: ``tests/`` (``mlops_testing``,
    ``pg_server``, ``s3_server``) and ``tests/system`` (``scaled_topology``)."""
    for folder in (ROOT / "tests", ROOT / "tests" / "system"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def ingest_weeks(batches: int, offset: int = 0) -> list[str]:
    """The starts of ``batches`` weekly batches, the first ``offset`` weeks after 2013-01-01."""
    from datetime import date, timedelta

    first = date.fromisoformat(FIRST_WEEK)
    return [str(first + timedelta(weeks=offset + w)) for w in range(batches)]


def _ready_lines(topology, host: str) -> int:
    """How often the host's Celery worker logged ``<its hostname> ready.`` (once per start)."""
    name = f"mlops-{host}@{topology.worker_address(host)} ready."
    path = topology.logs / f"worker-{host}.log"
    return path.read_text(errors="replace").count(name) if path.exists() else 0


def _wait_ready(topology, host: str, starts: int, timeout: float = 300) -> None:
    """Wait until the host's worker has consumed the broker ``starts`` times (Celery's ``ready.``)."""
    topology.stack.client.wait(
        f"the Celery worker of {host} to be ready",
        lambda: _ready_lines(topology, host) >= starts,
        timeout,
        detail=lambda: topology.worker_log(host),
    )


def ingest_backfill(topology, weeks: list[str], parallel: int, timeout: float = 3600) -> dict:
    """Backfill ``flights_ingest`` over the batches starting on ``weeks`` (``max_active_runs`` =
    ``parallel``); the wall time from the backfill's request until its last run finished (the API
    polled every second), the rows published and the task instances by worker."""
    from collections import Counter
    from datetime import datetime

    client = topology.stack.client
    wanted = set(weeks)
    # one backfill per DAG at a time: the scheduler marks the previous one complete a few seconds late
    client.wait("the previous backfill to complete", lambda: not client.active_backfills(INGEST_DAG), 180)

    def mine() -> list[dict]:
        return [
            r
            for r in client.runs(INGEST_DAG, run_type="backfill")
            if (r.get("data_interval_start") or "")[:10] in wanted
        ]

    load = os.getloadavg()[0]
    began = time.monotonic()
    client.backfill(INGEST_DAG, weeks[0], weeks[-1], max_active_runs=parallel)
    last_note = began
    while True:
        runs = mine()
        done = [r for r in runs if r["state"] in ("success", "failed")]
        if len(runs) == len(weeks) and len(done) == len(weeks):
            break
        now = time.monotonic()
        if now - began > timeout:
            raise RuntimeError(f"the backfill of {weeks[0]}..{weeks[-1]} did not finish in {timeout:.0f} s")
        if now - last_note > 60:
            print(f"    ... {len(done)}/{len(weeks)} runs finished ({now - began:.0f} s)", flush=True)
            last_note = now
        time.sleep(1)
    wall = time.monotonic() - began
    failed = [r["dag_run_id"] for r in runs if r["state"] != "success"]
    if failed:
        raise RuntimeError(
            f"{len(failed)} ingest run(s) failed:\n"
            + "\n".join(client.failure_report(INGEST_DAG, r)[-1500:] for r in failed)
        )
    hosts = {topology.worker_address(h): h for h in topology.worker_hosts}
    tasks: Counter[str] = Counter()
    tries = 0
    for run in runs:
        for ti in client.task_instances(INGEST_DAG, run["dag_run_id"]):
            tasks[hosts.get(ti["hostname"], ti["hostname"] or "-")] += 1
            tries += max(0, (ti.get("try_number") or 1) - 1)
    rows = sum(int(client.xcom(INGEST_DAG, r["dag_run_id"], PUBLISH_TASK)["rows"]) for r in runs)
    starts = [datetime.fromisoformat(r["start_date"]) for r in runs]
    ends = [datetime.fromisoformat(r["end_date"]) for r in runs]
    return {
        "weeks": [weeks[0], weeks[-1]],
        "batches": len(runs),
        "rows": rows,
        "seconds": wall,
        # the runs' own times in the metadata database: the first run's start to the last one's end
        "runs_span_seconds": (max(ends) - min(starts)).total_seconds(),
        "tasks_by_worker": dict(sorted(tasks.items())),
        "retries": tries,
        "load_average": [load, os.getloadavg()[0]],
    }


def ingest(batches: int, parallel: int, order: list[str]) -> dict:
    """The ingest part: the scaled topology of the test suite, the two backfills, one per worker set."""
    import tempfile

    _topology_modules()
    from pg_server import PgServer
    from scaled_topology import scaled_topology

    saved = dict(os.environ)
    # the topology's components inherit this process's environment: none of the other parts' settings
    for key in (
        "MLOPS_OFFLINE_ROOT",
        "MLOPS_FEAST_DIR",
        "AIRFLOW_CONN_FEAST_BENCH",
        "AIRFLOW_CONN_BENCH_RAY",
    ):
        os.environ.pop(key, None)
    # a folder of its own, not under WORK (mkdtemp's 0700): the server runs as the postgres account
    pg_root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    server = PgServer(pg_root)
    out: dict = {"parallel_runs": parallel, "order": order}
    try:
        pg = server.start()
        began = time.monotonic()
        with scaled_topology(pg, WORK / "topology") as topology:
            print(f"scaled topology up in {time.monotonic() - began:.0f} s", flush=True)
            os.environ.update(topology.settings_env)  # this process lands the batches on moto's S3
            from airflow_mlops.demo.data import land

            sets = {name: ingest_weeks(batches, i * batches) for i, name in enumerate(order)}
            for name, weeks in sets.items():
                landed = land(start=weeks[0], end=str(_last_day(weeks[-1])), cadence="weekly")
                print(
                    f"landed {landed['flights_rows']} flights of {weeks[0]} .. {weeks[-1]} for {name} worker(s)"
                )
            client = topology.stack.client
            client.wait(f"the DAG processor to serve {INGEST_DAG}", lambda: client.dag(INGEST_DAG), 300)
            client.unpause(INGEST_DAG)
            for name in order:
                running = WORKER_HOSTS[name]
                for host in topology.worker_hosts:
                    if host in running and topology.workers[host].poll() is not None:
                        starts = _ready_lines(topology, host) + 1
                        topology.start_worker(host)
                        _wait_ready(topology, host, starts)
                    elif host in running:
                        _wait_ready(topology, host, 1)
                    elif topology.workers[host].poll() is None:
                        topology.kill_worker(host)
                print(
                    f"backfill of {INGEST_DAG}, {batches} weekly batches from {sets[name][0]}, "
                    f"{parallel} runs at a time, Celery workers on {', '.join(running)} ...",
                    flush=True,
                )
                out[name] = ingest_backfill(topology, sets[name], parallel)
                print(f"    {out[name]['seconds']:.0f} s", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
    one, two = out["one"], out["two"]
    out["ratio_wall"] = two["seconds"] / one["seconds"]
    out["ratio_rows_per_second"] = (two["rows"] / two["seconds"]) / (one["rows"] / one["seconds"])
    return out


def _last_day(week: str):
    from datetime import date, timedelta

    return date.fromisoformat(week) + timedelta(days=6)


def print_ingest(figures: dict) -> None:
    print(f"\ningest backfill of {INGEST_DAG}, {figures['parallel_runs']} runs at a time (max_active_runs)")
    print(
        f"  {'workers':<9}{'weeks':<25}{'batches':>8}{'rows':>8}{'wall s':>8}{'rows/s':>8}   tasks by worker"
    )
    for name in ("one", "two"):
        r = figures[name]
        hosts = ", ".join(f"{h} {n}" for h, n in r["tasks_by_worker"].items())
        retried = f", {r['retries']} retries" if r["retries"] else ""
        print(
            f"  {name:<9}{' .. '.join(r['weeks']):<25}{r['batches']:>8}{r['rows']:>8}{r['seconds']:>8.1f}"
            f"{r['rows'] / r['seconds']:>8.0f}   {hosts}{retried}"
        )
    print(f"  two workers / one worker, wall time: {figures['ratio_wall']:.2f}")
    print(f"  two workers / one worker, rows per second: {figures['ratio_rows_per_second']:.2f}")


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default="materialize,tune", help="comma-separated: materialize, tune, ingest"
    )
    parser.add_argument("--entities", type=int, default=50_000, help="entity keys of the synthetic view")
    parser.add_argument("--trials", type=int, default=6, help="trials of the tuning search")
    parser.add_argument("--tune-rows", type=int, default=20_000, help="flights in the tuning training set")
    parser.add_argument("--repeat", type=int, default=3, help="materializations per variant (median)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray ([mlops] ray_num_cpus)")
    parser.add_argument(
        "--ingest-batches", type=int, default=13, help="weekly batches of each ingest backfill"
    )
    parser.add_argument("--ingest-runs", type=int, default=3, help="max_active_runs of the ingest backfills")
    parser.add_argument(
        "--ingest-order",
        default="one,two",
        help="which worker set backfills first (the earlier weeks): one,two or two,one",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"materialize", "tune", "ingest"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from materialize, tune, ingest")
    order = [o.strip() for o in args.ingest_order.split(",")]
    if sorted(order) != ["one", "two"]:
        parser.error("--ingest-order: one,two or two,one")
    if not 1 <= args.ingest_batches <= 26:
        parser.error("--ingest-batches: 1 to 26 (two sets of weeks inside 2013)")
    if "ingest" in parts and os.geteuid() != 0:
        parser.error("the ingest part starts network namespaces: run it as root")
    os.environ["AIRFLOW__MLOPS__RAY_NUM_CPUS"] = str(args.cpus)
    _quiet()
    print(f"work folder {WORK}; {os.cpu_count()} cores on this machine", flush=True)
    results: dict = {}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    try:
        if "ingest" in parts:
            results["ingest"] = ingest(args.ingest_batches, args.ingest_runs, order)
        if "tune" in parts:
            from bench_tuning import build_training_set

            data_path = build_training_set(WORK, args.tune_rows)
            results["tune local"] = tune(data_path, args.trials, None)
        with ray_cluster() if parts & {"materialize", "tune"} else contextlib.nullcontext() as cluster:
            if cluster:
                print(f"Ray cluster: {cluster['nodes']} nodes, GCS {cluster['gcs']}", flush=True)
                os.environ["AIRFLOW_CONN_BENCH_RAY"] = json.dumps(
                    {
                        "conn_type": "ray",
                        "host": "127.0.0.1",
                        "port": cluster["dashboard"],
                        "extra": {"cluster_address": cluster["gcs"]},
                    }
                )
            if "materialize" in parts:
                written = write_items(args.entities)
                print(
                    f"offline table: {written} rows, {args.entities} keys x 3 versions, 6 features",
                    flush=True,
                )
                plain = repository("local")
                latest = repository("latest", "materialization:\n  pull_latest_features: true\n")
                ray_conn = {"ray_conn_id": "bench_ray"}
                results["ray (2 nodes), cold"] = materialize("ray-cold", plain, ray_conn)
                # interleaved, so that what else runs on the machine weighs on every variant alike
                for i in range(args.repeat):
                    runs["direct"].append(direct(plain, f"direct-{i}"))
                    runs["local"].append(materialize(f"local-{i}", plain))
                    runs["executemany"].append(executemany(WORK / f"feast-local-{i}" / "online_store.db"))
                    runs["local, pull_latest"].append(materialize(f"latest-{i}", latest))
                    runs["ray (2 nodes)"].append(materialize(f"ray-{i}", plain, ray_conn))
                import ray

                ray.shutdown()
            if "tune" in parts:
                results["tune cluster"] = tune(data_path, args.trials, "bench_ray")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)

    if "materialize" in parts:
        import statistics

        for name, done in runs.items():
            results[name] = {
                "seconds": statistics.median(r["seconds"] for r in done),
                "online_rows": min(r["online_rows"] for r in done),
                "spread": (min(r["seconds"] for r in done), max(r["seconds"] for r in done)),
            }
        base = results["direct"]  # the ratios' baseline: the online store's own online_write_batch
        base_rate = base["online_rows"] / base["seconds"]
        print(
            f"\nmaterialize {args.entities} keys into SQLite (online rows = one per key; median of "
            f"{args.repeat}, cold = the cluster's first)"
        )
        print(f"  {'engine':<28}{'s':>8}{'rows':>9}{'rows/s':>10}{'vs direct':>11}   s min-max")
        for name in (
            "executemany",
            "direct",
            "local",
            "local, pull_latest",
            "ray (2 nodes), cold",
            "ray (2 nodes)",
        ):
            r = results[name]
            rate = r["online_rows"] / r["seconds"]
            spread = "   {:.2f}-{:.2f}".format(*r["spread"]) if "spread" in r else ""
            print(
                f"  {name:<28}{r['seconds']:>8.2f}{r['online_rows']:>9}{rate:>10.0f}{rate / base_rate:>10.2f}x{spread}"
            )
    if "tune" in parts:
        local, cluster = results["tune local"], results["tune cluster"]
        print(f"\ntuning search, {args.trials} trials, {args.tune_rows} flights")
        print(f"  local Ray ({args.cpus} CPUs) {local['seconds']:.1f} s, best AUC {local['best_auc']:.4f}")
        print(f"  2-node cluster (3 CPUs) {cluster['seconds']:.1f} s, best AUC {cluster['best_auc']:.4f}")
        print(f"  cluster / local wall time: {cluster['seconds'] / local['seconds']:.2f}")
    if "ingest" in parts:
        print_ingest(results["ingest"])
        print(json.dumps({"ingest": results["ingest"]}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
