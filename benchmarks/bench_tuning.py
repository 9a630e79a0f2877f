"""Benchmark of RayTuneOperator: time-to-quality against GridSearchCV, and Tune's per-trial overhead.

Run from the clone (takes a few minutes; the machine should be otherwise idle):

    .venv/bin/python benchmarks/bench_tuning.py [--rows N] [--cpus 2]

1. Time-to-quality on the flights training set (every Jan-Mar 2013 flight with an arrival delay, about
   the 90 days the reference train DAG trains on, joined with the weather at departure; label
   arr_delay > 15; the latest 20 % by scheduled departure as validation rows; ``--rows N`` samples N):
   scikit-learn ``GridSearchCV`` over a grid of HistGradientBoostingClassifier parameters
   (``PredefinedSplit`` = the same time-based validation rows, ``n_jobs`` = the CPUs), against the
   operator with ASHA sampling as many configurations from the same ranges. Quality target: within
   0.005 AUC of the grid's best. GridSearchCV only knows its best when every candidate is done, so
   its time-to-quality is its wall time; the operator's is the time of the first trial report that
   reaches the target (from Tune's per-report timestamps), counted from the start of the search.
   Target: ASHA <= 0.5x the grid's time.
2. Per-trial overhead: 20 trials of the ``sleep`` trainable (1 s each) through the operator, one CPU
   per trial, against the ideal 20 s / slots. Target: <= 20 %, with ``reuse_actors`` (the default) on
   a fresh local Ray, which is what the operator runs on in an Airflow task (it starts a local Ray for
   its search). Also printed: a second such search on the same Ray, and one without ``reuse_actors``.

Ray is started (``[mlops] ray_num_cpus`` / ``--cpus``) before each of the two parts; its start-up
time is printed apart and not counted.

Bytecode: where ``PYTHONDONTWRITEBYTECODE`` is set and the environment ships no ``.pyc`` files (a uv
venv), every new process compiles each module it imports from source: GridSearchCV's joblib workers
compile scikit-learn, Ray's trial workers ray.tune, pandas and scikit-learn. The operator's local Ray
caches that bytecode under ``<state_dir>/pycache`` (``RayHook.local_ray``); so that both sides start
their workers under the same conditions, the benchmark gives every process it starts (joblib's
workers too) that same cache, and fills it once before measuring (printed apart, not counted), as
``pip install`` would have by compiling the bytecode at install time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "learning_rate": [0.03, 0.1, 0.3],
    "max_leaf_nodes": [15, 31, 63],
    "min_samples_leaf": [20, 100],
}
MAX_ITER = 200
OVERHEAD_CASES = {
    "fresh": "reuse_actors=True, a fresh local Ray (as in a task)",
    "again": "reuse_actors=True, a second search on that Ray   ",
    "no_reuse": "reuse_actors=False, on that Ray                  ",
}
TOLERANCE = 0.005


def build_training_set(folder: Path, rows: int | None) -> Path:
    import pandas as pd

    from airflow_mlops.demo.data import read_table

    flights = read_table("flights")
    weather = read_table("weather")[
        ["origin", "time_hour", "temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
    ]
    pool = flights[(flights["month"] <= 3) & flights["arr_delay"].notna()]
    if rows:
        pool = pool.sample(n=min(rows, len(pool)), random_state=13)
    frame = pool.merge(weather, on=["origin", "time_hour"], how="left")
    frame["sched_dep_utc"] = frame["time_hour"] + pd.to_timedelta(frame["minute"], unit="m")
    frame["dow"] = frame["time_hour"].dt.dayofweek
    frame["delayed"] = (frame["arr_delay"] > 15).astype(int)
    columns = [
        "sched_dep_utc",
        "carrier",
        "origin",
        "dest",
        "distance",
        "hour",
        "month",
        "dow",
        "temp",
        "dewp",
        "humid",
        "wind_speed",
        "precip",
        "pressure",
        "visib",
        "delayed",
    ]
    path = folder / "flights_training.parquet"
    frame[columns].to_parquet(path, index=False)
    print(f"flights training set: {len(frame)} rows (Jan-Mar 2013)", flush=True)
    return path


def grid_search(data_path: Path, cpus: int) -> dict:
    """GridSearchCV over GRID on the same time-based split the operator uses."""
    import numpy as np
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import Pipeline

    from airflow_mlops.ml.dataset import build_training_set as split
    from airflow_mlops.ml.trainables import _encoder

    data = split(
        pd.read_parquet(data_path), label="delayed", task="classification", time_column="sched_dep_utc"
    )
    prep = _encoder(data, one_hot=False)
    x = pd.concat([data.x_train, data.x_valid], ignore_index=True)
    y = np.concatenate([data.y_train, data.y_valid])
    fold = np.r_[np.full(len(data.y_train), -1), np.zeros(len(data.y_valid), dtype=int)]
    model = HistGradientBoostingClassifier(
        max_iter=MAX_ITER,
        early_stopping=False,
        random_state=0,
        categorical_features=[i < len(data.categorical) for i in range(len(data.features))],
    )
    search = GridSearchCV(
        Pipeline([("prep", prep), ("model", model)]),
        {f"model__{k}": v for k, v in GRID.items()},
        scoring="roc_auc",
        cv=PredefinedSplit(fold),
        n_jobs=cpus,
        refit=False,
    )
    started = time.monotonic()
    search.fit(x, y)
    return {
        "wall_s": time.monotonic() - started,
        "best_auc": float(search.best_score_),
        "best_params": search.best_params_,
        "candidates": len(search.cv_results_["params"]),
    }


def _context(task_id: str) -> dict:
    return {
        "ti": SimpleNamespace(
            dag_id="bench_tuning", run_id=f"run-{os.getpid()}-{time.time_ns()}", task_id=task_id, try_number=1
        )
    }


def asha_search(data_path: Path, candidates: int, target: float, cpus: int) -> dict:
    import pandas as pd

    from airflow_mlops.artifacts import as_path
    from airflow_mlops.operators.tuning import RayTuneOperator

    op = RayTuneOperator(
        task_id="asha",
        training_data_uri=str(data_path),
        label="delayed",
        time_column="sched_dep_utc",
        trainable="hist_gradient_boosting_classifier",
        search_space={
            "learning_rate": {"loguniform": [min(GRID["learning_rate"]), max(GRID["learning_rate"])]},
            "max_leaf_nodes": {"randint": [min(GRID["max_leaf_nodes"]), max(GRID["max_leaf_nodes"]) + 1]},
            "min_samples_leaf": {"choice": GRID["min_samples_leaf"]},
            "max_iter": MAX_ITER,
            "report_every": 10,
            "early_stopping_rounds": 30,
        },
        metric="auc",
        num_samples=candidates,
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 3},
        max_concurrent_trials=cpus,
        seed=0,
        progress_interval=10,
    )
    started_wall = time.time()
    started = time.monotonic()
    result = op.execute(_context("asha"))
    wall = time.monotonic() - started
    # every report of every trial, with its wall-clock timestamp, from Tune's own progress files
    reports = []
    state = as_path(result["tune_storage"]) / "search"
    for progress in state.rglob("progress.csv"):
        frame = pd.read_csv(io.BytesIO(progress.read_bytes()))
        reports.extend(zip(frame["timestamp"], frame["auc"], strict=True))
    reached = sorted(ts for ts, auc in reports if auc >= target)
    # what the operator returns is a completed trial's final model: when did the first such model
    # reach the target? (Tune's timestamps are whole seconds)
    trials = pd.read_csv(io.BytesIO(as_path(result["trials_uri"]).read_bytes()))
    final = trials[(trials["status"] == "completed") & (trials["auc"] >= target)]["finished_at"]
    return {
        "wall_s": wall,
        "best_auc": result["best_metric"],
        "time_to_quality_s": (float(final.min()) - started_wall) if len(final) else None,
        "time_to_any_report_s": (reached[0] - started_wall) if reached else None,
        "counts": result["counts"],
        "reports": len(reports),
    }


def overhead(trials: int, reuse: bool, cpus: int, data_path: Path) -> dict:
    from airflow_mlops.operators.tuning import RayTuneOperator

    op = RayTuneOperator(
        task_id=f"sleep_reuse_{reuse}",
        training_data_uri=str(data_path),
        label="delayed",
        time_column="sched_dep_utc",
        trainable="sleep",
        search_space={"seconds": 1.0, "score": {"uniform": [0, 1]}},
        metric="score",
        mode="max",
        num_samples=trials,
        scheduler="fifo",
        reuse_actors=reuse,
        progress_interval=30,
    )
    started_wall = time.time()
    started = time.monotonic()
    result = op.execute(_context(op.task_id))
    task = time.monotonic() - started
    ideal = trials * 1.0 / cpus
    # search_s (the issue's figure): the operator's search, Tuner.fit and writing the outputs, with Ray
    # running; task_s: the whole execute() (also reading and splitting the training set)
    import pandas as pd

    from airflow_mlops.artifacts import as_path

    rows = pd.read_csv(io.BytesIO(as_path(result["trials_uri"]).read_bytes()))
    first = float(rows["finished_at"].min()) - started_wall  # Tune's timestamps are whole seconds
    return {
        "wall_s": result["elapsed_s"],
        "task_s": task,
        "ideal_s": ideal,
        "overhead": result["elapsed_s"] / ideal - 1,
        "task_overhead": task / ideal - 1,
        "first_trial_done_s": first,
    }


def share_bytecode_cache(state_dir: Path) -> Path | None:
    """Every process started from here on (joblib's workers, Ray's) caches its bytecode in one folder,
    filled once now; None when this environment already writes bytecode."""
    import subprocess

    from airflow_mlops.hooks.ray import BYTECODE_CACHE_FOLDER

    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return None
    folder = state_dir / BYTECODE_CACHE_FOLDER
    os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    modules = [
        "pandas",
        "pyarrow.parquet",
        "sklearn.ensemble",
        "sklearn.model_selection",
        "sklearn.pipeline",
        "sklearn.compose",
        "sklearn.metrics",
        "joblib.externals.loky",
        "skops.io",
        "ray.tune",
        "ray.tune.trainable.function_trainable",
        "airflow_mlops.ml.trainables",
        "airflow_mlops.ml.dataset",
    ]
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], check=True, cwd=ROOT)
    print(f"bytecode cache {folder} filled in {time.monotonic() - started:.1f} s (not counted)", flush=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="sample this many flights (default: all)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW__MLOPS__STATE_DIR", str(ROOT / "state" / "bench"))
    import logging

    logging.basicConfig(level=logging.WARNING)
    from airflow_mlops.hooks.ray import RayHook

    share_bytecode_cache(Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]))
    folder = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    data_path = build_training_set(folder, args.rows)
    print(f"{args.cpus} CPUs", flush=True)

    grid = grid_search(data_path, args.cpus)
    target = grid["best_auc"] - TOLERANCE
    print(
        f"GridSearchCV: {grid['candidates']} candidates in {grid['wall_s']:.1f} s, best AUC "
        f"{grid['best_auc']:.4f} {grid['best_params']}",
        flush=True,
    )

    started = time.monotonic()
    with RayHook(ray_conn_id=None).local_ray(num_cpus=args.cpus):
        print(f"Ray started in {time.monotonic() - started:.1f} s (not counted below)", flush=True)
        asha = asha_search(data_path, grid["candidates"], target, args.cpus)
        ttq = asha["time_to_quality_s"]
        print(
            f"RayTuneOperator + ASHA: {grid['candidates']} samples in {asha['wall_s']:.1f} s "
            f"(task incl. data load and outputs), best AUC {asha['best_auc']:.4f}, {asha['counts']}",
            flush=True,
        )
        rows = [(f"time-to-quality (AUC >= {target:.4f})", grid["wall_s"], ttq)]
    # The overhead searches get a Ray of their own, started like the one an Airflow task starts for its
    # search: its prestarted workers are free. On the Ray above they are gone (the ASHA search's actors
    # used them and ended with it), and every trial actor would wait for a new worker process; that
    # case is measured too, as a second search on the same Ray.
    started = time.monotonic()
    with RayHook(ray_conn_id=None).local_ray(num_cpus=args.cpus):
        print(f"Ray started again in {time.monotonic() - started:.1f} s (not counted below)", flush=True)
        over = {
            case: overhead(args.trials, reuse, args.cpus, data_path)
            for case, reuse in (("fresh", True), ("again", True), ("no_reuse", False))
        }

    print("\n== time to quality ==")
    for name, grid_s, asha_s in rows:
        if asha_s is None:
            print(
                f"{name}: grid {grid_s:.1f} s; no completed ASHA trial reached it (best {asha['best_auc']:.4f})"
            )
        else:
            print(
                f"{name}: grid {grid_s:.1f} s, ASHA {asha_s:.1f} s (a completed trial's final model) -> "
                f"ratio {asha_s / grid_s:.2f}x (target <= 0.50x)"
            )
    if asha["time_to_any_report_s"] is not None:
        print(
            f"  first intermediate report at the target: {asha['time_to_any_report_s']:.1f} s "
            f"-> {asha['time_to_any_report_s'] / grid['wall_s']:.2f}x"
        )
    print(
        f"\n== per-trial overhead: {args.trials} x sleep(1 s), {args.cpus} slots, ideal "
        f"{over['fresh']['ideal_s']:.1f} s =="
    )
    for case, figures in over.items():
        target = " (target <= +20 %)" if case == "fresh" else ""
        print(
            f"{OVERHEAD_CASES[case]}: search {figures['wall_s']:.1f} s -> overhead "
            f"{figures['overhead'] * 100:+.0f} %{target}; whole task {figures['task_s']:.1f} s "
            f"({figures['task_overhead'] * 100:+.0f} %); first 1-s trial done "
            f"{figures['first_trial_done_s']:.0f} s after the task started"
        )
    summary = {"grid": grid, "asha": asha, "overhead": over}
    print("\n@@" + json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
