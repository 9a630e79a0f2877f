"""DAG parse time: each ``dags/*.py`` against a baseline DAG file with the same Airflow imports and one
empty task, measured in the same run, each parse in a fresh interpreter (as the DAG processor's
first parse of a file pays every import).

    .venv/bin/python benchmarks/bench_dag_parse.py [--runs 7]

Prints the median parse time of each file, the baseline's, and the ratio (target: <= 1.5x).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys, time
path = sys.argv[1]
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("parsed_dag", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(time.perf_counter() - start)
"""


def airflow_imports(dag_file: Path) -> list[str]:
    """The DAG file's imports from airflow itself (not from airflow_mlops)."""
    lines = dag_file.read_text().splitlines()
    return [
        ln
        for ln in lines
        if re.match(r"^(from airflow[ .]|import airflow\b)", ln) and "airflow_mlops" not in ln
    ]


def baseline_for(dag_file: Path, folder: Path) -> Path:
    body = "\n".join(
        [
            "from __future__ import annotations",
            *airflow_imports(dag_file),
            "from airflow.providers.standard.operators.empty import EmptyOperator",
            "from airflow.sdk import DAG",
            "with DAG(dag_id='baseline', schedule=None):",
            "    EmptyOperator(task_id='noop')",
        ]
    )
    path = folder / f"baseline_{dag_file.stem}.py"
    path.write_text(body + "\n")
    return path


def parse_seconds(path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for dag_file in sorted((ROOT / "dags").glob("*.py")):
            baseline = baseline_for(dag_file, Path(tmp))
            dag_times, base_times = [], []
            for _ in range(args.runs):  # interleaved, so machine noise hits both alike
                dag_times.append(parse_seconds(dag_file))
                base_times.append(parse_seconds(baseline))
            dag_med, base_med = statistics.median(dag_times), statistics.median(base_times)
            ratio = dag_med / base_med
            worst = max(worst, ratio)
            print(
                f"{dag_file.name:<32} median {dag_med * 1000:7.0f} ms   baseline {base_med * 1000:7.0f} ms   "
                f"ratio {ratio:4.2f}x   ({args.runs} runs each)"
            )
    print(f"worst ratio {worst:.2f}x (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
