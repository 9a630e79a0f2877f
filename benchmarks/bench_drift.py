"""Drift check speed: Evidently 0.7 (as EvidentlyDriftOperator runs it) against the same per-column
tests computed directly with scipy, in the same run.

Reference: January-March 2013 flights joined with their origin's weather (prepared once, as the
operator caches it). Current: July (one month) and the whole year. Columns: the flights drift columns
plus the other weather columns (11). Prints rows/s, seconds and the Evidently/scipy ratio, and checks
that both give the same scores.

    .venv/bin/python benchmarks/bench_drift.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

WEATHER = ["temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]


def scipy_scores(reference, current, specs) -> dict[str, float]:
    """Normed Wasserstein distance for numerical columns, Jensen-Shannon distance over category shares
    for categorical ones: the tests Evidently runs for these columns, computed directly."""
    import numpy as np
    from scipy import stats
    from scipy.spatial import distance

    out = {}
    for name, spec in specs.items():
        ref, cur = reference[name].dropna(), current[name].dropna()
        if spec["kind"] == "numerical":
            r, c = ref.to_numpy(float), cur.to_numpy(float)
            out[name] = stats.wasserstein_distance(r, c) / max(float(np.std(r)), 0.001)
        else:
            keys = sorted(set(ref.unique()) | set(cur.unique()))
            rp = ref.value_counts().reindex(keys, fill_value=0).to_numpy(float) / len(ref)
            cp = cur.value_counts().reindex(keys, fill_value=0).to_numpy(float) / len(cur)
            rp[rp == 0], cp[cp == 0] = 1e-4, 1e-4
            out[name] = float(distance.jensenshannon(rp, cp))
    return out


def timed(fn, repeat: int):
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is reported)")
    args = parser.parse_args()

    from airflow_mlops.demo.data import read_table
    from airflow_mlops.lifecycle.spec import load_spec
    from airflow_mlops.ml.drift import normalize_columns, run_drift_report
    from airflow_mlops.ml.drift import typed as _typed

    # the flights spec's drift columns and share (dags/flights.yaml)
    monitoring = load_spec(Path(__file__).resolve().parents[1] / "dags" / "flights.yaml").monitoring
    FLIGHTS_DRIFT_COLUMNS = dict(monitoring.columns or {})  # noqa: N806
    FLIGHTS_DRIFT_SHARE = monitoring.drift_share  # noqa: N806

    start = time.perf_counter()
    flights = read_table("flights").merge(
        read_table("weather")[["origin", "time_hour", *WEATHER]], on=["origin", "time_hour"], how="left"
    )
    specs = normalize_columns(
        {
            **FLIGHTS_DRIFT_COLUMNS,
            **{
                c: {"kind": "numerical", "method": "wasserstein", "threshold": 0.1}
                for c in WEATHER
                if c not in FLIGHTS_DRIFT_COLUMNS
            },
        }
    )
    reference = _typed(flights[flights["month"] <= 3], specs)  # what the operator caches once per model
    windows = {"July": flights[flights["month"] == 7], "whole year": flights}
    print(
        f"data loaded and reference prepared in {time.perf_counter() - start:.1f} s "
        f"({len(reference):,} reference rows, {len(specs)} columns)"
    )

    start = time.perf_counter()
    import evidently

    print(
        f"import evidently {evidently.__version__}: {time.perf_counter() - start:.1f} s (once per worker process)"
    )
    run_drift_report(reference.head(2000), windows["July"].head(2000), specs, FLIGHTS_DRIFT_SHARE)  # warm-up

    print(
        f"{'window':<11} {'rows':>8} {'evidently s':>12} {'rows/s':>10} {'scipy s':>8} {'rows/s':>11} {'ratio':>6} {'max |score diff|':>17} drift"
    )
    for name, current in windows.items():
        ev_time, (snapshot, summary) = timed(
            lambda c=current: run_drift_report(reference, c, specs, FLIGHTS_DRIFT_SHARE), args.repeat
        )
        sp_time, baseline = timed(
            lambda c=current: scipy_scores(reference, _typed(c, specs), specs), args.repeat
        )
        diff = max(abs(summary["columns"][c]["score"] - baseline[c]) for c in specs)
        print(
            f"{name:<11} {len(current):>8,} {ev_time:>12.2f} {len(current) / ev_time:>10,.0f} {sp_time:>8.3f} "
            f"{len(current) / sp_time:>11,.0f} {ev_time / sp_time:>6.1f} {diff:>17.2g} "
            f"{summary['drift_detected']} ({sorted(summary['drifted_columns'])})"
        )
        start = time.perf_counter()
        html = snapshot.get_html_str(as_iframe=False)
        print(
            f"{'':<11} HTML report of {len(html) / 1e6:.1f} MB rendered in {time.perf_counter() - start:.2f} s (not in the figures above)"
        )


if __name__ == "__main__":
    main()
