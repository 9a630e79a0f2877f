"""Serving throughput: the Bento service vs a minimal FastAPI/uvicorn app with the same model and lookups.

Trains a HistGradientBoosting model on real 2013 flights, registers it in a throw-away state folder under
/tmp, starts ``bentoml serve`` of :mod:`airflow_mlops.ml.service` and a baseline FastAPI app (one model call
per request, same registry load, same request features and feature lookup), then drives each from a load
generator in a separate process (asyncio + httpx, N concurrent clients, loopback) and prints req/s, p50, p99
for single-row requests and rows/s through the batch endpoint.

Run: ``.venv/bin/python benchmarks/bench_serving.py [--clients 32] [--seconds 15]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ load generator
async def _load(url: str, path: str, bodies: list[dict], clients: int, seconds: float, warmup: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client(i: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            n = i
            while (now := time.perf_counter()) < stop_at:
                began = now
                try:
                    answer = await http.post(path, json=bodies[n % len(bodies)])
                    ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                if began >= measure_from:
                    if ok:
                        latencies.append(done - began)
                    else:
                        errors += 1
                n += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def load_main(args: argparse.Namespace) -> None:
    bodies = json.loads(Path(args.bodies).read_text())
    result = asyncio.run(_load(args.url, args.path, bodies, args.clients, args.seconds, args.warmup))
    print(json.dumps(result))


def run_load(url: str, path: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(bodies, handle)
    try:
        out = subprocess.run(
            [
                sys.executable,
                str(HERE),
                "load",
                "--url",
                url,
                "--path",
                path,
                "--bodies",
                handle.name,
                "--clients",
                str(clients),
                "--seconds",
                str(seconds),
                "--warmup",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
    finally:
        os.unlink(handle.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ baseline app
def baseline_main(args: argparse.Namespace) -> None:
    """Minimal FastAPI app: the same registry load (sha256 checked), request features and feature lookup as
    the service, one feature lookup and one model call per request, no batching."""
    import uvicorn
    from fastapi import FastAPI

    from airflow_mlops.ml.service import Flight, Prediction, ServeSettings, load_model, request_features

    loaded = load_model(ServeSettings.from_env())
    app = FastAPI()

    class Body(__import__("pydantic").BaseModel):
        flight: Flight

    def predict(body: Body) -> Prediction:
        row = request_features(body.flight)
        extra = loaded.lookup.fetch([row])[0]
        features = {f: {**row, **extra}.get(f) for f in loaded.predictor.features}
        p = loaded.predictor.predict([features])[0]
        return Prediction(delay_probability=float(p), model=loaded.name, model_version=loaded.version)

    predict.__annotations__.update(body=Body, **{"return": Prediction})  # resolved here, not as strings
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


def _flights(n: int) -> list[dict]:
    from airflow_mlops.demo.data import read_table

    frame = read_table("flights")
    frame = frame[frame["month"] == 5].sample(n, random_state=0)
    return [
        {
            "carrier": r.carrier,
            "origin": r.origin,
            "dest": r.dest,
            "scheduled_departure": f"2013-05-{r.day:02d}T{r.hour:02d}:{r.minute:02d}:00-04:00",
            "distance": float(r.distance),
        }
        for r in frame.itertuples()
    ]


def bench_main(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="mlops-bench-serving-"))
    os.environ["AIRFLOW__MLOPS__STATE_DIR"] = str(state)
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from serving.models import register, training_frame, write_model

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.serving import serving_env, stop_tree

    version = register(
        "bench", write_model(state / "model", training_frame().sample(20000, random_state=0), max_iter=100)
    )
    env = serving_env(BentoMLHook(), model="bench", version=version)
    service_port, baseline_port = _port(), _port()
    logs = state / "logs"
    logs.mkdir()
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
            stdout=open(logs / "service.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, str(HERE), "baseline", "--port", str(baseline_port)],
            env=env,
            stdout=open(logs / "baseline.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
    ]
    try:
        service, baseline = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{baseline_port}"
        _wait(service + "/readyz")
        _wait(baseline + "/docs")
        flights = _flights(2000)
        singles = [{"flight": f} for f in flights]
        batches = [
            {"flights": flights[i : i + args.batch_rows]} for i in range(0, len(flights), args.batch_rows)
        ]
        results = {
            "baseline_single": run_load(baseline, "/predict", singles, args.clients, args.seconds),
            "service_single": run_load(service, "/predict", singles, args.clients, args.seconds),
            "service_batch": run_load(service, "/predict_batch", batches, args.batch_clients, args.seconds),
        }
    finally:
        for proc in procs:
            stop_tree(proc.pid, timeout=20)
    results["service_batch"]["rows_per_s"] = results["service_batch"]["req_per_s"] * args.batch_rows
    single = results["service_single"]["req_per_s"]
    print(f"{'run':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<18}{r['req_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['errors']:>8}")
    print(
        f"single-row req/s, service / baseline: {single / results['baseline_single']['req_per_s']:.2f}x "
        f"(target >= 1.5x), service p99 {results['service_single']['p99_ms']:.0f} ms (target <= 100 ms)"
    )
    print(
        f"batch rows/s {results['service_batch']['rows_per_s']:.0f} ({args.batch_rows} rows/request, "
        f"{args.batch_clients} clients) = {results['service_batch']['rows_per_s'] / single:.1f}x single-row rows/s "
        "(target >= 10x)"
    )
    print(json.dumps(results))


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
    base = sub.add_parser("baseline")
    base.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--batch-rows", type=int, default=100)
    parser.add_argument("--batch-clients", type=int, default=8)
    args = parser.parse_args()
    {"load": load_main, "baseline": baseline_main}.get(args.command, bench_main)(args)


if __name__ == "__main__":
    main()
