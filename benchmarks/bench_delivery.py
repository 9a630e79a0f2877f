"""Progressive delivery figures (issue 17): batch scoring, canary rollback, shadow latency, many models.

Batch scoring: a binary HistGradientBoosting delay model (20,000 real 2013 flights, request features) is
registered in a throw-away state folder under /tmp; June 2013 (~28,000 flights) is published to an
offline store by ``OfflinePartitionWriteOperator`` as daily partitions. ``BatchScoringOperator`` then scores
the month into a predictions table, in the task's process and on a local Ray, reading and writing included;
a ``bentoml serve`` of the same version is driven through ``/predict_batch`` (100 rows per request, 8
closed-loop clients, the load generator of ``bench_serving.py``). Prints rows/s of each and the ratio.

Canary (``--parts canary``): a model (version ``a``) is deployed behind the router; clients send single-row
``/predict`` requests through the stable address while a canary of a bad candidate (one that answers 500 to
most carriers) runs with steps [10, 50, 100]; the canary's guardrails roll it back. Prints the requests the
clients sent and how many failed (target 0), the requests the canary failed that the active answered, and
how long the rollback took.

Shadow (``--parts shadow``): the same deployment (version ``a`` live) with version ``b`` deployed as its
shadow once; its server keeps running throughout and the routes file is switched between *with* the shadow
(the router mirrors every ``/predict``) and *without* (the shadow's server idles). First the closed-loop
capacity through the router (``--clients`` connections, 8 s), then open-loop load (``bench_serving``'s
generator with ``rate``) at ``--shadow-load`` (default 0.5) of it, latencies counted from each request's
scheduled send time; after a 5 s warm-up with the shadow, ``--pairs`` (default 3) pairs of runs without /
with, ``--seconds`` each. Prints each run (p50, p99, the router's own latency to the live server, the
copies mirrored to the shadow and dropped during the run, the CPU of the router's own process, of its shadow
sender, of the live server, the shadow server and the load generator, the load average), the median p99 of
each condition and the p99 added by the shadow: median(with) / median(without) - 1 (target < 10 %), the added
p99 of each pair (back to back: less exposed to the machine's load drifting), the router's CPU per request
with and without mirroring (the mirroring's own cost on production's path), and the scheduling class of
every thread of each process (the shadow's and the sender's must be ``SCHED_IDLE``). The benchmark raises
its own, the router's and the live server's sessions to its niceness, never the shadow's.
``--shadow-sender inline`` has the router send the copies from its own loop (``MLOPS_ROUTER_SHADOW_SENDER``);
``AIRFLOW__MLOPS__SHADOW_CPU=shared`` in the environment runs the shadow and its sender at normal priority.
``--pin-shadow CPU`` pins the shadow's server to that core and the router, the live server and the load
generators to the others (benchmark only: a production shadow runs on hardware of its own).

Multi-model endpoint (``--parts multi_model``): three models (a binary HistGradientBoosting delay classifier
and an arrival-delay regressor on 20,000 real 2013 flights, a LightGBM multiclass departure-airport model)
are registered and deployed on one ``bentoml serve`` of :mod:`airflow_mlops.ml.multi_service`, started
with none loaded. For each model: the latency of its first request (cold: the load, verification included,
and the call) against the median of 30 requests after it (warm), the memory it is charged (RSS growth at
load) and the load time the server reports; then, under a budget that holds one model, the cold start of a
model evicted before (the libraries are imported by then).

Targets (issue 17): batch scoring rows/s >= 5x the batch endpoint's rows/s; 0 requests failed during a canary
rollback; shadow mode adds < 10 % to the live endpoint's p99; cold start and memory
per model on the multi-model endpoint are measured (no target).

Run: ``.venv/bin/python benchmarks/bench_delivery.py [--parts batch,canary,shadow,multi_model] [--seconds 15] [--months 6]
[--pairs 3] [--shadow-load 0.5] [--pin-shadow CPU] [--shadow-sender process|inline]``
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


# ---------------------------------------------------------------------------------------- multi_model
def _multi_rows(frame, features: list[str], n: int) -> list[dict]:
    """``n`` request rows of a model with ``features``, from its training flights (in its signature's range)."""
    casts = {"hour": int, "month": int, "distance": float}
    return [
        {f: casts.get(f, str)(getattr(r, f)) for f in features}
        for r in frame.sample(n, random_state=0).itertuples()
    ]


def _timed_post(client, path: str, body: dict) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def multi_model_part(state: Path) -> dict:
    """Cold start and memory per model on one multi-model endpoint (see the module docstring)."""
    import statistics

    import httpx
    from serving.models import (
        FEATURES,
        MULTICLASS_FEATURES,
        register,
        training_frame,
        write_model,
        write_multiclass_model,
    )

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.multi_model import locked_deployments, register_deployment
    from airflow_mlops.operators.multi_model import MultiModelEndpoint

    train = training_frame().sample(20000, random_state=0)
    folder = state / "multi-models"
    specs = {
        "delays": (write_model(folder / "d", train, max_iter=100), FEATURES),
        "arrival": (write_model(folder / "a", train, max_iter=100, task="regression"), FEATURES),
        "airport": (write_multiclass_model(folder / "o", train, rounds=100), MULTICLASS_FEATURES),
    }
    endpoint = MultiModelEndpoint(BentoMLHook(), "bench")
    for name, (model_dir, _) in specs.items():
        register_deployment(endpoint.deployments, "bench", name, register(name, model_dir, train))
    with endpoint.locked() as state_file:
        started = time.perf_counter()
        server = endpoint.ensure_server(
            state_file,
            port=None,
            settings={
                "bentoml_conn_id": None,
                "feast_repo": None,
                "feast_conn_id": None,
                "memory_budget_mb": 4096,
            },
            ready_timeout=300,
        )
        server_start_s = time.perf_counter() - started
    figures: dict = {"server_start_s": server_start_s, "models": {}}
    try:
        client = httpx.Client(base_url=server["url"], timeout=120)
        rss_before = client.get("/models").json()
        for name, (_, features) in specs.items():
            rows = _multi_rows(train, features, 31)
            cold = _timed_post(client, f"/models/{name}/predict", {"row": rows[0]})
            warm = [_timed_post(client, f"/models/{name}/predict", {"row": row}) for row in rows[1:]]
            status = client.get(f"/models/{name}").json()
            figures["models"][name] = {
                "cold_ms": cold,
                "warm_median_ms": statistics.median(warm),
                "memory_mb": status["memory_mb"],
                "rss_delta_mb": status["rss_delta_mb"],
                "load_s": status["load_seconds"],
            }
        import psutil

        figures["server_rss_mb"] = (
            sum(
                p.memory_info().rss
                for p in [psutil.Process(server["pid"]), *psutil.Process(server["pid"]).children(True)]
            )
            / 2**20
        )
        # a budget that holds one model: every request to another model reloads it
        with locked_deployments(endpoint.deployments) as data:
            data["memory_budget_mb"] = 0.5
        time.sleep(0.5)
        for name, (_, features) in specs.items():
            rows = _multi_rows(train, features, 2)
            figures["models"][name]["reload_cold_ms"] = _timed_post(
                client, f"/models/{name}/predict", {"row": rows[0]}
            )
        figures["evictions"] = client.get("/models").json()["evictions"]
        figures["before_any_load_used_mb"] = rss_before["memory_used_mb"]
    finally:
        endpoint.stop()
    print("\n== multi-model endpoint: 3 models on one bentoml serve")
    print(
        f"server start (no model loaded): {server_start_s:.1f} s; server RSS with 3 models: {figures['server_rss_mb']:.0f} MB"
    )
    print(f"{'model':<10}{'cold ms':>10}{'warm ms':>10}{'reload ms':>11}{'load s':>9}{'memory MB':>11}")
    for name, f in figures["models"].items():
        print(
            f"{name:<10}{f['cold_ms']:>10.0f}{f['warm_median_ms']:>10.1f}{f['reload_cold_ms']:>11.0f}"
            f"{f['load_s']:>9.2f}{f['memory_mb']:>11.1f}"
        )
    print(
        f"(evictions under a one-model budget: {figures['evictions']}; load average {os.getloadavg()[0]:.1f})"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        default="batch,canary,shadow,multi_model",
        help="comma-separated: batch, canary, shadow, multi_model",
    )
    parser.add_argument(
        "--seconds", type=float, default=15, help="load on the batch endpoint / per shadow run"
    )
    parser.add_argument("--months", default="6", help="comma-separated months of 2013 to score")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument(
        "--clients", type=int, default=4, help="canary: concurrent clients; shadow: those of the capacity run"
    )
    parser.add_argument(
        "--shadow-load",
        type=float,
        default=0.5,
        help="shadow: the open-loop rate as a fraction of the closed-loop capacity measured first",
    )
    parser.add_argument("--pairs", type=int, default=3, help="shadow: runs without then with the mirroring")
    parser.add_argument(
        "--shadow-sender",
        choices=("process", "inline"),
        default=None,
        help="shadow: who sends the copies: the router's shadow sender process (default) or its own loop "
        "(MLOPS_ROUTER_SHADOW_SENDER)",
    )
    parser.add_argument(
        "--pin-shadow",
        type=int,
        default=None,
        metavar="CPU",
        help="shadow, benchmark only: pin the shadow's server to this CPU and the router, the live server and the "
        "load generators to the others (taskset), so that the shadow does not take the live server's CPU",
    )
    args = parser.parse_args()

    if args.shadow_sender:
        os.environ["MLOPS_ROUTER_SHADOW_SENDER"] = args.shadow_sender  # the router started below inherits it
    state = Path(tempfile.mkdtemp(prefix="mlops-bench-delivery-"))
    os.environ["AIRFLOW__MLOPS__STATE_DIR"] = str(state)
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts & {"canary", "shadow"}:
        delivery(args, state, parts)
    if "batch" in parts:
        batch(args, state)
    if "multi_model" in parts:
        print(json.dumps(multi_model_part(state)))


def delivery(args: argparse.Namespace, state: Path, parts: set[str]) -> None:
    """The canary and shadow parts, on one deployment of version ``a``."""
    import bench_serving
    from serving.load import Load
    from serving.models import register, training_frame, write_erroring_model, write_model

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.net import free_port
    from airflow_mlops.operators.serving import (
        BentoDeployOperator,
        CanaryRollbackError,
        LocalDeploymentTarget,
    )

    model = "bench_canary"
    train = training_frame().sample(8000, random_state=0)
    keys = {"entity_keys": ["origin"]}
    a = register(model, write_model(state / "a", train, max_iter=50), train, **keys)
    b = register(
        model, write_model(state / "b", train.sample(frac=1, random_state=1), max_iter=50), train, **keys
    )
    served = ["UA", "B6", "EV", "DL", "AA", "MQ", "US"]
    bad = register(model, write_erroring_model(state / "bad", train, served), train, **keys)
    port = free_port()

    def deploy(version: str, run: str, **kwargs: object) -> dict:
        context = {"run_id": run, "ti": SimpleNamespace(dag_id="bench", run_id=run, task_id="deploy")}
        return BentoDeployOperator(
            task_id="deploy",
            model_name=model,
            version=version,
            port=port,
            deferrable=False,
            ready_timeout=180,
            serve_env={"MLOPS_SERVE_LOG_FLUSH_SECONDS": "1"},
            **kwargs,
        ).execute(context)

    target = LocalDeploymentTarget(BentoMLHook())
    try:
        url = deploy(a, "live")["url"]
        rows = [r for r in bench_serving._rows(500, model, a) if r["carrier"] in served]
        if "canary" in parts:
            started = time.perf_counter()
            with Load(url, rows, args.clients, settle=0) as clients:
                time.sleep(2)
                try:
                    deploy(bad, "canary", strategy="canary", canary_steps=[10, 50, 100], step_minutes=1.0)
                    verdict = "NOT rolled back"
                except CanaryRollbackError as err:
                    verdict = "rolled back: " + str(err.problem).split(": ", 1)[1].split(". Version")[0]
                time.sleep(2)
            took = time.perf_counter() - started
            steps = [h for h in target.read_state(model)["history"] if h["action"] == "canary-step"]
            new = steps[-1]["figures"]["new"] if steps else {}
            print(
                f"\n== canary of a bad candidate under load ({args.clients} clients, steps [10, 50, 100], 1 min/step)"
            )
            print(f"candidate {verdict}")
            print(
                f"client requests: {clients.sent:,} sent in {took:.0f} s, {len(clients.failures)} failed (target 0); "
                f"the canary got {new.get('requests', 0)}, failed {new.get('errors', 0)}, all answered by the active "
                f"({new.get('fallbacks', 0)} fallbacks)"
            )
            if clients.failures:
                print("first failures:", clients.failures[:3])
            print(
                json.dumps(
                    {"canary_failed_requests": len(clients.failures), "sent": clients.sent, "canary": new}
                )
            )
        if "shadow" in parts:
            deploy(b, "shadow", strategy="shadow")
            shadow_part(args, target, model, url, [{"row": r} for r in rows])
    finally:
        target.teardown(model)


def _session_priority(pids: list[int], exclude: int | None = None) -> None:
    """Give the sessions of ``pids`` and their children this process's niceness (benchmark only, root only).

    The kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) shares the CPU between
    *sessions* first: a ``nice`` value only ranks processes within their session, and the router and the
    servers run in sessions of their own (``start_new_session``), so ``nice -n -15`` on the benchmark gave
    them no priority over the other work on the machine. Writing the niceness to ``/proc/<pid>/autogroup``
    ranks each whole session (BentoML starts its workers in sessions of their own too: children included).
    ``exclude`` and its children keep theirs: the shadow's server is a child of this process too, and giving
    its sessions the benchmark's priority would undo the lowest priority it gives itself."""
    import psutil

    niceness = os.nice(0)
    if niceness >= 0:
        return
    tree = set(pids)
    for pid in pids:
        try:
            tree.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    if exclude is not None:
        tree -= {exclude, *_tree(exclude)}
    for pid in sorted(tree):
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(niceness))
        except OSError:  # no autogroup scheduling, or not allowed: the figures are then shared with the rest
            pass


def _tree(pid: int) -> list[int]:
    """The children of ``pid``, recursively (none when it ended)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _scheduling(pid: int) -> dict[str, int]:
    """How many threads of ``pid`` and its children run in each scheduling class (``SCHED_IDLE`` ...) and at
    which session (autogroup) niceness: the shadow's server must be all ``SCHED_IDLE``."""
    from collections import Counter

    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE") if hasattr(os, n)}
    seen: Counter[str] = Counter()
    for proc in [pid, *_tree(pid)]:
        try:
            group = Path(f"/proc/{proc}/autogroup").read_text().split()[-1]
        except OSError:
            group = "?"
        for tid in os.listdir(f"/proc/{proc}/task") if os.path.isdir(f"/proc/{proc}/task") else []:
            try:
                policy = names.get(os.sched_getscheduler(int(tid)), "other")
            except OSError:
                continue
            seen[f"{policy} (session nice {group})"] += 1
    return dict(seen)


def _pin(pids: list[int], cpus: list[int]) -> None:
    """Pin ``pids`` and their children to ``cpus`` (``taskset``; benchmark only)."""
    import psutil

    for pid in pids:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            proc.cpu_affinity(cpus)


def shadow_part(args: argparse.Namespace, target, model: str, url: str, bodies: list[dict]) -> dict:
    """Open-loop p99 through the router with and without mirroring to a running shadow (module docstring)."""
    import statistics

    import bench_serving

    deployed = target.read_state(model)
    router, active, shadow = deployed["router"], deployed["active"], deployed["shadow"]
    pids = {"router": router["pid"], "live": active["pid"], "shadow": shadow["pid"]}
    # the benchmark and production's processes get its priority over the machine's other work; the shadow
    # keeps the lowest, which it gives itself (airflow_mlops.ml.service.yield_cpu_to_production)
    _session_priority([os.getpid(), pids["router"], pids["live"]], exclude=pids["shadow"])
    if args.pin_shadow is not None:  # benchmark only: the shadow on one core, everything else on the others
        rest = sorted(set(range(os.cpu_count() or 1)) - {args.pin_shadow})
        _pin([shadow["pid"]], [args.pin_shadow])
        _pin([router["pid"], active["pid"]], rest)
        os.sched_setaffinity(0, rest)  # this process and the load generators it starts

    def mirror(on: bool) -> None:
        """Routes with or without the shadow (its server keeps running, idle when not mirrored)."""
        target.switch(model, active, router, shadow=shadow if on else None)

    def load(seconds: float, rate: float | None) -> dict:
        return bench_serving.run_load(
            url, "/predict", bodies, args.clients, seconds, 1, router["pid"], rate=rate, watch=pids
        )

    mirror(False)
    capacity = load(8, None)  # closed loop: what the live server answers flat out
    rate = round(args.shadow_load * capacity["req_per_s"])
    mirror(True)
    load(5, rate)  # warm-up of both servers, dropped
    sender = (((target.router_status(router) or {}).get("shadow") or {}).get("sender") or {}).get("pid")
    if sender:  # the router's shadow sender process: its CPU is shown apart from the router's own
        pids["sender"] = sender
    runs: list[tuple[str, dict]] = []
    copies = ("sent", "skipped", "failed")
    for _ in range(args.pairs):
        for condition in ("without", "with"):
            mirror(condition == "with")
            before = (target.router_status(router) or {}).get("shadow") or {}
            run = load(args.seconds, rate)
            time.sleep(0.5)  # the shadow sender's last counts (it reports every 0.2 s)
            status = target.router_status(router) or {}
            backend = (status.get("split") or {}).get("backends", {}).get(active["url"]) or {}
            run["router_backend_latency_ms"] = backend.get("latency_ms")
            after = status.get("shadow") or {}
            # copies of this run's requests (warm-up included): mirrored to the shadow, dropped, failed
            run["shadow"] = {k: after.get(k, 0) - before.get(k, 0) for k in copies}
            run["shadow"]["sender"] = after.get("sender")
            # the router's own process (its sender, a child, apart): the mirroring's cost on production's path
            run["cpu"]["router"] -= run["cpu"].get("sender", 0.0)
            run["router_cpu_ms_per_request"] = (
                run["cpu"]["router"] * args.seconds / max(1, run["requests"]) * 1000
            )
            runs.append((condition, run))
    scheduling = {name: _scheduling(pid) for name, pid in pids.items()}  # the router's sender included
    mirror(False)
    median = {c: statistics.median(r["p99_ms"] for name, r in runs if name == c) for c in ("without", "with")}
    router_cpu = {
        c: statistics.median(r["router_cpu_ms_per_request"] for name, r in runs if name == c)
        for c in ("without", "with")
    }
    added = median["with"] / median["without"] - 1
    # each pair ran back to back: its ratio is less exposed to the machine's load drifting over the runs
    p99s = {c: [r["p99_ms"] for name, r in runs if name == c] for c in ("without", "with")}
    per_pair = [w / wo - 1 for wo, w in zip(p99s["without"], p99s["with"], strict=True)]
    print(
        f"\n== shadow: /predict through the router, open loop at {rate} req/s ({args.shadow_load:.0%} of the "
        f"closed-loop capacity of {capacity['req_per_s']:.0f} req/s at {args.clients} clients; live server CPU "
        f"{capacity['cpu']['live']:.0%} then), {args.pairs} pairs of {args.seconds:g} s runs"
        + (f", shadow pinned to CPU {args.pin_shadow}" if args.pin_shadow is not None else "")
    )
    print(
        f"{'run':<9}{'p50 ms':>8}{'p99 ms':>8}{'router->live p99':>17}{'errors':>7}{'copies':>8}{'dropped':>8}"
        f"{'CPU router':>11}{'sender':>7}{'live':>6}{'shadow':>7}{'loadgen':>8}{'lag p99':>8}{'load':>6}"
    )
    for name, r in runs:
        backend = r["router_backend_latency_ms"] or {}
        print(
            f"{name:<9}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{backend.get('p99', float('nan')):>17.1f}"
            f"{r['errors']:>7}{r['shadow'].get('sent', 0):>8}{r['shadow'].get('skipped', 0):>8}"
            f"{r['cpu']['router']:>11.0%}{r['cpu'].get('sender', 0.0):>7.0%}{r['cpu']['live']:>6.0%}"
            f"{r['cpu']['shadow']:>7.0%}"
            f"{r['loadgen_cpu']:>8.0%}{r['send_lag_p99_ms']:>8.1f}{r['load_average']:>6.1f}"
        )
    print(
        f"median p99: without {median['without']:.1f} ms, with {median['with']:.1f} ms -> added p99 "
        f"{added:+.1%} (target < 10 %); router CPU per request: without {router_cpu['without']:.2f} ms, with "
        f"{router_cpu['with']:.2f} ms (the mirroring's own cost in the router: "
        f"{router_cpu['with'] - router_cpu['without']:+.2f} ms/request); {os.cpu_count()} cores"
    )
    print(
        f"p99 range: without {min(p99s['without']):.1f}-{max(p99s['without']):.1f} ms, with "
        f"{min(p99s['with']):.1f}-{max(p99s['with']):.1f} ms; added p99 per pair: "
        f"{', '.join(f'{x:+.0%}' for x in per_pair)} (median {statistics.median(per_pair):+.1%}); copies "
        f"mirrored {sum(r['shadow']['sent'] for n, r in runs if n == 'with')}, dropped "
        f"{sum(r['shadow']['skipped'] for n, r in runs if n == 'with')}, failed "
        f"{sum(r['shadow']['failed'] for n, r in runs if n == 'with')}; load average "
        f"{min(r['load_average'] for _, r in runs):.1f}-{max(r['load_average'] for _, r in runs):.1f}"
    )
    print(f"threads by scheduling class: {json.dumps(scheduling)}")
    figures = {
        "scheduling": scheduling,
        "rate": rate,
        "capacity": capacity,
        "runs": runs,
        "median_p99_ms": median,
        "p99_added": added,
        "p99_added_per_pair": per_pair,
        "router_cpu_ms_per_request": router_cpu,
    }
    print(json.dumps(figures))
    return figures


def batch(args: argparse.Namespace, state: Path) -> None:
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
