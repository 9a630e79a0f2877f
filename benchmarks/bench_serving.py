"""Serving throughput: the generic Bento service vs a minimal FastAPI/uvicorn app with the same model and lookups.

For each task asked for (default a binary delay classifier and a regression of the arrival delay), trains a
HistGradientBoosting model on real 2013 flights, registers it with its signature in a throw-away state folder
under /tmp, starts ``bentoml serve`` of :mod:`airflow_mlops.ml.service` (request and answer schemas from the
signature) and a baseline FastAPI app (one model call per request, same registry load, same request schema,
feature lookup and answers), then drives each from a load
generator in separate processes on loopback (aiohttp on uvloop, N concurrent closed-loop clients, one
connection each; the ``load`` subcommand and :func:`run_load` also drive an open loop at a fixed ``--rate``,
latencies counted from each request's scheduled send time) and prints req/s, p50, p99 for single-row requests and rows/s through the batch endpoint,
with the CPU the server and the load generator used (a saturated generator would cap the figures).

Both servers cap a model call at ``MLOPS_SERVE_MODEL_THREADS`` (default 1) OpenMP threads, with the same
function (:func:`airflow_mlops.ml.service.limit_model_threads`).

With ``--features feast`` the model also needs the weather at the departure airport, read per request
(baseline) or per batch (service) from Feast's SQLite online store of the real feature repository.

Targets (issue 13): single-row req/s >= 5x the baseline, p99 <= 60 ms at 32 clients, batch endpoint rows/s
>= 10x single-row rows/s.

Run: ``.venv/bin/python benchmarks/bench_serving.py [--clients 32] [--seconds 15] [--features request|feast]
[--tasks binary,regression]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


# ------------------------------------------------------------------------------------------ load generator
async def _load(
    url: str,
    path: str,
    bodies: list[dict],
    clients: int,
    start_at: float,
    warmup: float,
    seconds: float,
    rate: float | None = None,
) -> dict:
    """Closed loop (``rate`` None): ``clients`` clients, each sending its next request when the last one was
    answered, over one aiohttp session with a connection per client. Open loop (``rate`` requests/s): one
    request every ``1 / rate`` s on a fixed schedule whatever the answers, over at most ``max(clients, 64)``
    connections, each latency counted from the request's *scheduled* send time, so a slow answer that delays
    later sends is charged to them too (no coordinated omission). Latencies of the requests sent inside the
    window; ``send_lag_p99_ms``: how late the generator itself sent (a saturated generator shows here)."""
    import aiohttp

    payloads = [json.dumps(b).encode() for b in bodies]
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    connector = aiohttp.TCPConnector(limit=clients if rate is None else max(clients, 64), force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as http:

        async def send(n: int, began: float) -> None:
            """One request, its latency counted from ``began`` (when it was sent, or due)."""
            nonlocal errors
            try:
                async with http.post(path, data=payloads[n % len(payloads)]) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if began >= measure_from:
                if ok:
                    latencies.append(time.time() - began)
                else:
                    errors += 1

        async def client(i: int) -> None:
            n = i
            while (began := time.time()) < stop_at:
                await send(n, began)
                n += clients

        async def scheduled() -> None:
            pending: set[asyncio.Task[None]] = set()
            n = 0
            while (due := start_at + n / rate) < stop_at:
                if (wait := due - time.time()) > 0:
                    await asyncio.sleep(wait)
                if due >= measure_from:
                    lags.append(time.time() - due)
                task = asyncio.create_task(send(n, due))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            await asyncio.gather(*pending)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu = time.process_time()
        if rate is None:
            await asyncio.gather(*(client(i) for i in range(clients)))
        else:
            await scheduled()
        cpu = time.process_time() - cpu
    lags.sort()
    lag = lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1000 if lags else 0.0
    return {"latencies": latencies, "errors": errors, "cpu_s": cpu, "send_lag_p99_ms": lag}


def load_main(args: argparse.Namespace) -> None:
    import uvloop

    bodies = json.loads(Path(args.bodies).read_text())
    result = uvloop.run(
        _load(args.url, args.path, bodies, args.clients, args.start_at, args.warmup, args.seconds, args.rate)
    )
    print(json.dumps(result))


def _cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and its children (the server's worker processes)."""
    import psutil

    total = 0.0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def run_load(
    url: str,
    path: str,
    bodies: list[dict],
    clients: int,
    seconds: float,
    procs: int,
    server_pid: int,
    rate: float | None = None,
    watch: dict[str, int] | None = None,
) -> dict:
    """Drive ``url`` from ``procs`` load-generator processes (``clients`` connections in all) on loopback:
    closed loop, or open loop at ``rate`` requests/s in all when given (see :func:`_load`). ``watch``: more
    processes (name: pid, children included) whose CPU over the window is reported under ``cpu``."""
    warmup = 3.0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(bodies, handle)
    start_at = time.time() + 3  # the generators start together once they have imported
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    watch = {"server": server_pid, **(watch or {})}
    try:
        generators = [
            subprocess.Popen(
                [sys.executable, str(HERE), "load", "--url", url, "--path", path, "--bodies", handle.name]
                + ["--clients", str(n), "--seconds", str(seconds), "--warmup", str(warmup)]
                + ["--start-at", repr(start_at)]
                + (["--rate", repr(rate / procs)] if rate else []),
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in per_proc
        ]
        time.sleep(max(0.0, start_at + warmup - time.time()))
        cpu = {name: _cpu_seconds(pid) for name, pid in watch.items()}
        time.sleep(seconds)
        cpu = {name: (_cpu_seconds(pid) - cpu[name]) / seconds for name, pid in watch.items()}
        load_average = os.getloadavg()[0]
        outputs = [g.communicate(timeout=seconds + 120)[0] for g in generators]
    finally:
        os.unlink(handle.name)
    parts = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    latencies = sorted(x for part in parts for x in part["latencies"])

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "requests": len(latencies),
        "errors": sum(part["errors"] for part in parts),
        "req_per_s": len(latencies) / seconds,
        "rate": rate,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "server_cpu": cpu["server"],
        "cpu": cpu,
        "loadgen_cpu": sum(part["cpu_s"] for part in parts) / (seconds + warmup),
        "send_lag_p99_ms": max(part.get("send_lag_p99_ms", 0.0) for part in parts),
        "load_average": load_average,
    }


# ------------------------------------------------------------------------------------------ baseline app
def baseline_main(args: argparse.Namespace) -> None:
    """Minimal FastAPI app: the same registry load (sha256 checked), request features and feature lookup as
    the service, one feature lookup and one model call per request, no batching."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import create_model

    from airflow_mlops.ml.service import ServeSettings, limit_model_threads, load_model, served_schema
    from airflow_mlops.ml.signature import answers

    settings = ServeSettings.from_env()
    schema = served_schema(settings)
    loaded = load_model(settings, schema)
    Answer = schema.response
    Body = create_model("Body", row=(schema.request, ...))
    app = FastAPI()

    def predict(body):
        limit_model_threads(settings.model_threads)  # the service's thread cap, in each worker thread
        row = body.row.model_dump(mode="json")
        extra = loaded.lookup.fetch([row])[0]
        features = {f: {**row, **extra}.get(f) for f in loaded.predictor.features}
        answer = answers(loaded.signature, loaded.predictor.predict([features]))[0]
        return Answer(**answer, model=loaded.name, model_version=loaded.version)

    predict.__annotations__.update(body=Body, **{"return": Answer})  # resolved here, not as strings
    app.post("/predict")(predict)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------------------ orchestration
def _wait(url: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _batch_sizes(url: str) -> float:
    """Mean number of single-row requests per model call so far, from the service's ``/metrics``."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("mlops_single_row_batch_size_")
    }
    count = values.get("mlops_single_row_batch_size_count", 0.0)
    return values.get("mlops_single_row_batch_size_sum", 0.0) / count if count else float("nan")


def _rows(n: int, model: str, version: str) -> list[dict]:
    """``n`` real May flights as request rows of ``model``'s registered signature (rows its schema refuses,
    e.g. a carrier unseen in training, are left out)."""
    from pydantic import ValidationError

    from airflow_mlops.demo.data import read_table
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.signature import request_model, signature_of

    index = BentoMLHook().read_index(model)
    signature = signature_of(index["versions"][version])
    schema = request_model(signature, model)
    frame = read_table("flights")
    frame = frame[frame["month"] == 5].sample(n * 2, random_state=0)
    rows = []
    for record in frame.to_dict("records"):
        row = {f.name: record[f.name] for f in signature.request_fields}
        row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
        try:
            schema.model_validate(row)
        except ValidationError:
            continue
        rows.append(row)
    return rows[:n]


def _feast_store(state: Path) -> dict[str, str]:
    """The real feature repository over an offline store of this run's own (the 2013 weather), with the
    weather of 2013-05-01 materialized into its SQLite online store; returns the serving environment."""
    from datetime import UTC, datetime

    from airflow_mlops.config import load_settings
    from airflow_mlops.demo.data import land
    from airflow_mlops.hooks.feast import FeastHook
    from airflow_mlops.operators.features import FeastApplyOperator, FeatureSourceSnapshotOperator

    settings = load_settings()
    env = {"MLOPS_FEAST_DIR": str(state / "feast"), "MLOPS_OFFLINE_ROOT": settings.offline_root}
    os.environ.update(env)
    land(settings, start="2013-05-01", end="2013-05-01")
    context = {"ti": SimpleNamespace(dag_id="bench", run_id="bench", task_id="feast"), "outlet_events": {}}
    FeatureSourceSnapshotOperator(
        task_id="weather",
        source_uri=f"{settings.landing_root}/weather/weather.parquet",
        table="weather",
        timestamp_column="time_hour",
        columns=["origin", "temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
        + ["time_hour"],
        offline_root=settings.offline_root,
    ).execute(context)
    repo = ROOT / "feature_repo"
    FeastApplyOperator(task_id="apply", repo_path=str(repo)).execute(context)
    FeastHook(repo_path=str(repo)).materialize(
        datetime(2013, 5, 1, tzinfo=UTC), datetime(2013, 5, 1, 12, tzinfo=UTC), ["weather_hourly"]
    )
    return {**env, "feast_repo": str(repo)}


def bench_task(args: argparse.Namespace, task: str, state: Path, feast: dict[str, str] | None) -> dict:
    """Register a ``task`` model with its signature, serve it with the service and the baseline, drive both."""
    from serving.models import (
        FEATURES,
        WEATHER,
        register,
        training_frame,
        weather_training_frame,
        write_model,
    )

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.net import free_port
    from airflow_mlops.operators.serving import serving_env, stop_tree

    name = f"bench_{task}"
    hook = BentoMLHook()
    if feast:  # the weather at the departure airport comes from Feast's online store
        train = weather_training_frame().sample(20000, random_state=0)
        folder = write_model(state / name, train, max_iter=100, features=[*FEATURES, *WEATHER], task=task)
        version = register(
            name, folder, train, feature_service="delay_model", entity_keys=["origin"], store_features=WEATHER
        )
        env = serving_env(hook, model=name, version=version, feast_repo=feast["feast_repo"])
    else:  # the model needs only what a request carries: no feature store
        train = training_frame().sample(20000, random_state=0)
        version = register(name, write_model(state / name, train, max_iter=100, task=task), train)
        env = serving_env(hook, model=name, version=version)
    service_port, baseline_port = free_port(), free_port()
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    procs = [
        subprocess.Popen(
            [
                str(Path(sys.executable).with_name("bentoml")),
                "serve",
                "airflow_mlops.ml.service:ModelService",
                "--host",
                "127.0.0.1",
                "--port",
                str(service_port),
            ],
            env=env,
            stdout=open(logs / f"service-{task}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, str(HERE), "baseline", "--port", str(baseline_port)],
            env=env,
            stdout=open(logs / f"baseline-{task}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
    ]
    try:
        service, baseline = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{baseline_port}"
        _wait(service + "/readyz")
        _wait(baseline + "/docs")
        rows = _rows(2000, name, version)
        singles = [{"row": r} for r in rows]
        batches = [{"rows": rows[i : i + args.batch_rows]} for i in range(0, len(rows), args.batch_rows)]
        service_pid, baseline_pid = procs[0].pid, procs[1].pid
        results = {
            "baseline_single": run_load(
                baseline, "/predict", singles, args.clients, args.seconds, args.load_procs, baseline_pid
            ),
            "service_single": run_load(
                service, "/predict", singles, args.clients, args.seconds, args.load_procs, service_pid
            ),
            "service_batch_sizes": _batch_sizes(service),
            "service_batch": run_load(
                service, "/predict_batch", batches, args.batch_clients, args.seconds, 1, service_pid
            ),
        }
    finally:
        for proc in procs:
            stop_tree(proc.pid, timeout=20)
    sizes = results.pop("service_batch_sizes")
    results["service_single"]["mean_batch"] = sizes
    results["service_batch"]["rows_per_s"] = results["service_batch"]["req_per_s"] * args.batch_rows
    return results


def report(args: argparse.Namespace, task: str, results: dict) -> dict:
    """Print one task's table and its figures against the targets; returns the figures."""
    single = results["service_single"]["req_per_s"]
    figures = {
        "ratio": single / results["baseline_single"]["req_per_s"],
        "p99_ms": results["service_single"]["p99_ms"],
        "batch_x": results["service_batch"]["rows_per_s"] / single,
    }
    print(f"\n== {task} model ({args.features} features)")
    print(
        f"{'run':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
        f"{'server CPU':>12}{'loadgen CPU':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<18}{r['req_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['errors']:>8}"
            f"{r['server_cpu']:>11.0%}{r['loadgen_cpu']:>12.0%}"
        )
    print(
        "single-row requests per feature lookup + model call in the service: "
        f"{results['service_single']['mean_batch']:.1f} on average"
    )
    print(
        f"single-row req/s, service / baseline: {figures['ratio']:.2f}x (target >= 5x), "
        f"service p99 {figures['p99_ms']:.0f} ms at {args.clients} clients (target <= 60 ms)"
    )
    print(
        f"batch rows/s {results['service_batch']['rows_per_s']:.0f} ({args.batch_rows} rows/request, "
        f"{args.batch_clients} clients) = {figures['batch_x']:.1f}x single-row rows/s (target >= 10x)"
    )
    return figures


def bench_main(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="mlops-bench-serving-"))
    os.environ["AIRFLOW__MLOPS__STATE_DIR"] = str(state)
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    feast = _feast_store(state) if args.features == "feast" else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = {task: bench_task(args, task, state, feast) for task in tasks}
    figures = {task: report(args, task, results[task]) for task in tasks}
    print(f"\n(CPU: share of one core over the window; {os.cpu_count()} cores; ", end="")
    print(f"load average after the run: {os.getloadavg()[0]:.1f})")
    print(json.dumps({"figures": figures, "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--path", required=True)
    load.add_argument("--bodies", required=True)
    load.add_argument("--clients", type=int, default=32)
    load.add_argument("--seconds", type=float, default=15)
    load.add_argument("--warmup", type=float, default=3)
    load.add_argument("--start-at", type=float, required=True)
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: requests/s on a fixed schedule (default: closed loop)",
    )
    base = sub.add_parser("baseline")
    base.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--batch-rows", type=int, default=100)
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--load-procs", type=int, default=1, help="load-generator processes (single rows)")
    parser.add_argument("--tasks", default="binary,regression", help="comma-separated: binary, regression")
    parser.add_argument(
        "--features",
        choices=["request", "feast"],
        default="request",
        help="request: the model uses request features only; feast: also the weather from Feast's online store",
    )
    args = parser.parse_args()
    {"load": load_main, "baseline": baseline_main}.get(args.command, bench_main)(args)


if __name__ == "__main__":
    main()
