"""Orchestration overhead of the lifecycle: the train DAG through Airflow vs the same steps in one process.

Both sides train the flight-delay model of ``dags/flights.yaml`` on the same prepared feature store
(real 2013 flights: offline partitions, Feast registry and online store for January-March), with the
same windows:

- **plain**: one fresh Python process builds the train DAG with the factory and calls each task's
  operator ``execute()`` in order (retraining gate, training set, holdout set, Ray Tune, register,
  promote, drift baseline, Bento build, blue/green deploy, sample predictions), passing results by hand;
- **airflow**: a real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite)
  parses ``dags/`` and runs ``flights_train`` triggered over the REST API; the wall time is from the
  trigger to the run's end.

Each side starts from its own copy of the state (registry, Feast online store, artifacts), so both
register, promote and deploy a first model. Also prints the parse time of ``dags/flights_lifecycle.py``
against an empty DAG file. Targets: train overhead <= 1.5x, parse <= 1.5x.

Run: ``.venv/bin/python benchmarks/bench_lifecycle.py [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "dags" / "flights.yaml"
WINDOW = {"train_start": "2013-01-01", "holdout_start": "2013-03-18", "holdout_end": "2013-04-01"}
LAST_DAY = "2013-03-31"
PORT = 3947


def _settings_env(state: Path, offline: Path, landing: Path) -> dict[str, str]:
    return {
        "AIRFLOW__MLOPS__STATE_DIR": str(state),
        "AIRFLOW__MLOPS__OFFLINE_ROOT": f"file://{offline}",
        "AIRFLOW__MLOPS__LANDING_ROOT": f"file://{landing}",
        "AIRFLOW__MLOPS__ARTIFACT_ROOT": f"file://{state}/artifacts",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "MLOPS_FEAST_DIR": str(state / "feast"),
        "MLOPS_OFFLINE_ROOT": f"file://{offline}",
    }


def _context(task_id: str, run_id: str = "plain") -> dict:
    from collections import defaultdict
    from types import SimpleNamespace

    return {
        "ti": SimpleNamespace(dag_id="flights_train", run_id=run_id, task_id=task_id),
        "run_id": run_id,
        "outlet_events": defaultdict(SimpleNamespace),
        "triggering_asset_events": {},
    }


# ------------------------------------------------------------------------------------------ prepare
def prepare(base: Path) -> None:
    """Offline partitions, feature tables, feast apply and materialization for January-March."""
    from airflow_mlops.demo.data import land
    from airflow_mlops.lifecycle import lifecycle_dags

    land(start="2013-01-01", end=LAST_DAY)
    landing, offline = base / "landing", base / "offline"
    for day in sorted((landing / "flights").iterdir()):
        if day.name.startswith("date="):
            (offline / "flights" / day.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(day / "flights.parquet", offline / "flights" / day.name / "part-0.parquet")
    features = lifecycle_dags(SPEC)["flights_features"]
    window = features.user_defined_macros["feature_window"](
        {}, type("Run", (), {"conf": {"day": "2013-01-01", "last_day": LAST_DAY}})()
    )
    for task_id in ("publish_weather", "publish_planes", "daily_stats", "feast_apply", "materialize"):
        op = features.task_dict[task_id]
        for name in ("start_day", "end_day", "start", "end"):
            value = getattr(op, name, None)
            if isinstance(value, str) and "feature_window" in value:
                key = value.split(".")[-1].split("[")[-1].strip("'] }")
                setattr(op, name, window[key])
        op.execute(_context(task_id, "prepare"))
    op = features.task_dict["materialize_planes"]
    op.end = window["end"]
    op.execute(_context("materialize_planes", "prepare"))


# ------------------------------------------------------------------------------------------ plain
def plain() -> dict:
    """Every task of the train DAG called in this process; returns seconds per step."""
    from airflow_mlops.lifecycle import lifecycle_dags
    from airflow_mlops.ml.client import sample_predictions

    dag = lifecycle_dags(SPEC, {"serving": {"port": PORT}})["flights_train"]
    t = dag.task_dict
    bounds = {k: f"{v}T00:00:00+00:00" for k, v in WINDOW.items()}
    seconds: dict[str, float] = {}

    def run(task_id: str, **attrs):
        op = t[task_id]
        for name, value in attrs.items():
            setattr(op, name, value)
        started = time.perf_counter()
        result = op.execute(_context(task_id))
        seconds[task_id] = round(time.perf_counter() - started, 2)
        return result

    started = time.perf_counter()
    run("retraining_gate", data_time=bounds["holdout_end"])
    training = run("training_set", start=bounds["train_start"], end=bounds["holdout_start"])
    holdout = run("holdout_set", start=bounds["holdout_start"], end=bounds["holdout_end"])
    tuned = run("tune", training_data_uri=training["manifest_uri"])
    registered = run(
        "register",
        model_uri=tuned["model_uri"],
        metrics={"auc": tuned["best_metric"]},
        hyperparameters=tuned["best_config"],
        training_manifest_uri=training["manifest_uri"],
    )
    promoted = run("promote", candidate_version=registered["version"], holdout_uri=holdout["manifest_uri"])
    run("drift_baseline")
    run("build")
    deployed = run("deploy")
    step = time.perf_counter()
    sample = sample_predictions(deployed["url"], holdout["data_uri"], t["deploy"].model_name, 20)
    seconds["sample_predictions"] = round(time.perf_counter() - step, 2)
    return {
        "wall": round(time.perf_counter() - started, 2),
        "steps": seconds,
        "promoted": promoted["promoted"],
        "auc": tuned["best_metric"],
        "answers": sample["requests"],
    }


def teardown_serving() -> None:
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.operators.serving import LocalDeploymentTarget

    LocalDeploymentTarget(BentoMLHook()).teardown("flight_delay")


# ------------------------------------------------------------------------------------------ airflow
def through_airflow(state: Path, env: dict[str, str]) -> dict:
    from airflow_mlops.demo.postgres import demo_database
    from airflow_mlops.demo.stack import AirflowStack

    home = state / "airflow"
    # the embedded default's PostgreSQL in <state>/postgres, as `make demo` runs it
    stack = AirflowStack(
        home=home,
        logs=state / "logs",
        dags_folder=ROOT / "dags",
        env={**env, "AIRFLOW_HOME": str(home)},
        database=demo_database(state, home),
        standalone=True,
        preload=True,
    )
    with stack as client:
        client.wait("flights_train to be parsed", lambda: client.dag("flights_train"), 300)
        client.unpause("flights_train")
        started = time.perf_counter()
        client.trigger("flights_train", run_id="bench", conf=WINDOW)
        run = client.wait_run("flights_train", "bench", timeout=1800)
        wall = time.perf_counter() - started
        steps = {
            ti["task_id"]: round(float(ti.get("duration") or 0), 2)
            for ti in client.task_instances("flights_train", "bench")
        }
        promote = client.xcom("flights_train", "bench", "promote")
        tune = client.xcom("flights_train", "bench", "tune")
    return {
        "wall": round(wall, 2),
        "state": run["state"],
        "steps": steps,
        "promoted": (promote or {}).get("promoted"),
        "auc": (tune or {}).get("best_metric"),
    }


# ------------------------------------------------------------------------------------------ parse
PROBE = """
import importlib.util, sys, time
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("parsed_dag", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(time.perf_counter() - start)
"""
EMPTY = """from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG
with DAG(dag_id="empty", schedule=None):
    EmptyOperator(task_id="noop")
"""


def parse_ratio(runs: int, folder: Path) -> tuple[float, float]:
    empty = folder / "empty_dag.py"
    empty.write_text(EMPTY)
    ours, base = [], []
    for _ in range(runs):  # interleaved, so machine noise hits both alike
        for path, into in ((ROOT / "dags" / "flights_lifecycle.py", ours), (empty, base)):
            out = subprocess.run(
                [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True
            )
            into.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(ours), statistics.median(base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    parser.add_argument("--parse-runs", type=int, default=5)
    parser.add_argument("--_plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._plain:  # the child process of the plain side
        result = plain()
        teardown_serving()
        Path(args._plain).write_text(json.dumps(result))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    base, landing, offline = tmp / "base", tmp / "base" / "landing", tmp / "base" / "offline"
    try:
        started = time.perf_counter()
        env = _settings_env(base, offline, landing)
        prep = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import bench_lifecycle as b; from pathlib import Path; b.prepare(Path({str(base)!r}))",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if prep.returncode:
            print(prep.stdout[-3000:], prep.stderr[-3000:])
            return 1
        print(f"prepared January-March features in {time.perf_counter() - started:.0f} s under {base}")

        sides = {}
        for side in ("plain", "airflow"):
            state = tmp / side
            shutil.copytree(base / "feast", state / "feast")
            side_env = {
                **_settings_env(state, offline, landing),
                "AIRFLOW_HOME": str(state / "airflow"),
            }
            if side == "plain":
                out = tmp / "plain.json"
                result = subprocess.run(
                    [sys.executable, __file__, "--_plain", str(out)],
                    env={**os.environ, **side_env},
                    capture_output=True,
                    text=True,
                )
                if result.returncode:
                    print(result.stdout[-3000:], result.stderr[-3000:])
                    return 1
                sides[side] = json.loads(out.read_text())
            else:
                code = (
                    f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_lifecycle as b; "
                    f"from pathlib import Path; r = b.through_airflow(Path({str(state)!r}), json.loads({json.dumps(json.dumps(side_env))})); "
                    "b.teardown_serving(); print('@@' + json.dumps(r))"
                )
                result = subprocess.run(
                    [sys.executable, "-c", code],
                    env={**os.environ, **side_env},
                    capture_output=True,
                    text=True,
                )
                line = [ln for ln in result.stdout.splitlines() if ln.startswith("@@")]
                if result.returncode or not line:
                    print(result.stdout[-3000:], result.stderr[-3000:])
                    return 1
                sides[side] = json.loads(line[-1][2:])
            print(
                f"{side:<8} wall {sides[side]['wall']:7.1f} s   promoted {sides[side]['promoted']}   "
                f"best auc {sides[side]['auc']}"
            )
            print(f"         steps (s): {sides[side]['steps']}")

        ratio = sides["airflow"]["wall"] / sides["plain"]["wall"]
        print(
            f"train DAG through Airflow {sides['airflow']['wall']:.1f} s vs plain {sides['plain']['wall']:.1f} s: "
            f"orchestration overhead {ratio:.2f}x (target <= 1.5x)"
        )
        ours, empty = parse_ratio(args.parse_runs, tmp)
        print(
            f"parse dags/flights_lifecycle.py {ours * 1000:.0f} ms vs empty DAG {empty * 1000:.0f} ms: "
            f"{ours / empty:.2f}x (median of {args.parse_runs}; target <= 1.5x)"
        )
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
