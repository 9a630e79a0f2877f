"""Progressive delivery figures (issue 17). So far: batch scoring against the batch endpoint.

Batch scoring: a binary HistGradientBoosting delay model (20,000 real 2013 flights, request features) is
registered in a throw-away state folder under /tmp; June 2013 (~28,000 flights) is published to an
offline store by ``OfflinePartitionWriteOperator`` as daily partitions. ``BatchScoringOperator`` then scores
the month into a predictions table, in the task's process and on a local Ray, reading and writing included;
a ``bentoml serve`` of the same version is driven through ``/predict_batch`` (100 rows per request, 8
closed-loop clients, the load generator of ``bench_serving.py``). Prints rows/s of each and the ratio.

Target (issue 17): batch scoring rows/s >= 5x the batch endpoint's rows/s.

Run: ``.venv/bin/python benchmarks/bench_delivery.py [--seconds 15] [--months 6]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def _publish(months: list[int], landing: Path, offline: str) -> int:
    """The flights of ``months`` published as daily partitions of the offline table ``flights``."""
    from airflow_mlops.demo.data import read_table
    from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator

    frame = read_table("flights")
    frame = frame[frame["month"].isin(months)]
    landing.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(landing / "flights.parquet", index=False)
    OfflinePartitionWriteOperator(
        task_id="publish",
        source_uri=str(landing / "flights.parquet"),
        table="flights",
        partition="date={date}",
        partition_column="time_hour",
        offline_root=offline,
    ).execute({"ti": SimpleNamespace(dag_id="bench", run_id="bench", task_id="publish"), "outlet_events": {}})
    return len(frame)


def _score(model: str, version: str, offline: str, days: tuple[str, str], **kwargs) -> tuple[float, dict]:
    from airflow_mlops.operators.batch_scoring import BatchScoringOperator

    started = time.perf_counter()
    result = BatchScoringOperator(
        task_id="score",
        model_name=model,
        version=version,
        table="flights",
        window_start=days[0],
        window_end=days[1],
        offline_root=offline,
        **kwargs,
    ).execute({"ti": SimpleNamespace(dag_id="bench", run_id="bench", task_id="score"), "outlet_events": {}})
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="load on the batch endpoint")
    parser.add_argument("--months", default="6", help="comma-separated months of 2013 to score")
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="mlops-bench-delivery-"))
    os.environ["AIRFLOW__MLOPS__STATE_DIR"] = str(state)
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_serving
    from serving.models import register, training_frame, write_model
    from serving.servers import start_backends, stop_backends

    months = [int(m) for m in args.months.split(",")]
    offline = f"file://{state}/offline"
    rows = _publish(months, state / "landing", offline)
    days = (f"2013-{min(months):02d}-01", f"2013-{max(months):02d}-{28 if max(months) == 2 else 30}")
    train = training_frame().sample(20000, random_state=0)
    model = "bench_delivery"
    version = register(model, write_model(state / model, train, max_iter=100), train)

    local_s, local = _score(model, version, offline, days)
    again_s, _ = _score(model, version, offline, days)
    ray_s, on_ray = _score(
        model, version, offline, days, parallel_min_rows=0, chunk_rows=20_000, ray_num_cpus=args.ray_cpus
    )
    assert on_ray["on_ray"] and on_ray["rows"] == local["rows"]
    # Ray already running (as on a long-lived cluster): the scoring alone
    from airflow_mlops.hooks.ray import RayHook

    with RayHook(ray_conn_id=None).local_ray(args.ray_cpus):
        _score(model, version, offline, days, parallel_min_rows=0, chunk_rows=20_000)
        warm_s, _ = _score(model, version, offline, days, parallel_min_rows=0, chunk_rows=20_000)

    backends = start_backends([{"model": model, "version": version}])
    try:
        sample = bench_serving._rows(2000, model, version)
        batches = [{"rows": sample[i : i + 100]} for i in range(0, len(sample), 100)]
        endpoint = bench_serving.run_load(
            backends[0]["url"], "/predict_batch", batches, 8, args.seconds, 1, backends[0]["pid"]
        )
    finally:
        stop_backends(backends)
    endpoint_rows = endpoint["req_per_s"] * 100
    best_local = local["rows"] / min(local_s, again_s)
    figures = {
        "rows": local["rows"],
        "in_process_rows_per_s": best_local,
        "ray_rows_per_s": on_ray["rows"] / ray_s,
        "endpoint_rows_per_s": endpoint_rows,
        "ratio": best_local / endpoint_rows,
        "ray_ratio": on_ray["rows"] / ray_s / endpoint_rows,
        "ray_running_rows_per_s": on_ray["rows"] / warm_s,
    }
    print(f"\n== batch scoring: {local['rows']:,} flights ({rows:,} published), {len(local['days'])} days")
    print(f"in the task's process: {local_s:.1f} s, then {again_s:.1f} s -> {best_local:,.0f} rows/s")
    print(
        f"on a local Ray ({args.ray_cpus} CPUs), started by the task: {ray_s:.1f} s -> "
        f"{figures['ray_rows_per_s']:,.0f} rows/s; Ray already running: {warm_s:.1f} s -> "
        f"{figures['ray_running_rows_per_s']:,.0f} rows/s"
    )
    print(
        f"batch endpoint: {endpoint_rows:,.0f} rows/s (100 rows/request, 8 clients, p99 "
        f"{endpoint['p99_ms']:.0f} ms, errors {endpoint['errors']})"
    )
    print(
        f"batch scoring / batch endpoint: {figures['ratio']:.1f}x in process, {figures['ray_ratio']:.1f}x on Ray "
        "(target >= 5x)"
    )
    print(f"(load average after the run: {os.getloadavg()[0]:.1f})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
