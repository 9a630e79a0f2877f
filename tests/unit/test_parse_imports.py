"""Importing the package and parsing the DAG files import none of the heavy ML libraries.

The scheduler's DAG processor parses every DAG file again and again; a top-level import of one of
these costs seconds per parse. Checked in a fresh interpreter by inspecting ``sys.modules``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlops_testing import ROOT, run_python

HEAVY = ["ray", "feast", "great_expectations", "evidently", "bentoml", "sklearn", "lightgbm", "pandas"]
#: modules of ours that import Feast at their top (its extension points: Feast loads them by class path,
#: from FeastHook at task time); parsing and the provider's registered modules must never reach them
FEAST_PLUGINS = ["airflow_mlops.hooks.feast_offline", "airflow_mlops.hooks.feast_ray"]

#: the DAG folder's Python files, less the modules .airflowignore keeps from being parsed as DAG files
#: (importable helpers next to the specs, e.g. flights_features.py)
IGNORED = [
    line for line in (ROOT / "dags" / ".airflowignore").read_text().splitlines() if line[:1] not in "#"
]
DAG_FILES = sorted(p.name for p in (ROOT / "dags").glob("*.py") if p.name not in IGNORED)


def _loaded_after(code: str) -> dict:
    probe = (
        code
        + f"""
import json, sys
print("@@" + json.dumps({{"heavy": sorted(m for m in {HEAVY + FEAST_PLUGINS!r} if m in sys.modules)}}))
"""
    )
    result = run_python(probe)
    assert result.returncode == 0, result.stderr[-4000:]
    line = [row for row in result.stdout.splitlines() if row.startswith("@@")][-1]
    return json.loads(line[2:])


def test_there_are_dag_files_to_check():
    assert "flights_lifecycle.py" in DAG_FILES
    assert "flights_features.py" in IGNORED and (ROOT / "dags" / "flights_features.py").is_file()


def test_importing_the_package_and_what_it_registers_is_light():
    code = """
import importlib
import airflow_mlops
from airflow_mlops.get_provider_info import get_provider_info
info = get_provider_info()
for kind in ("operators", "sensors", "hooks", "triggers"):
    for entry in info.get(kind, []):
        for module in entry["python-modules"]:
            importlib.import_module(module)
import airflow_mlops.config, airflow_mlops.artifacts, airflow_mlops.exceptions
"""
    assert _loaded_after(code)["heavy"] == []


def test_parsing_every_dag_file_is_light():
    code = f"""
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(ROOT / "dags")!r})
assert not bag.import_errors, bag.import_errors
assert bag.dags, "no DAG parsed"
print("@@dags", sorted(bag.dags))
files = sorted(stat.file.rsplit("/", 1)[-1] for stat in bag.dagbag_stats)
assert files == {DAG_FILES!r}, files  # the helper modules are imported by the specs, never parsed
"""
    assert _loaded_after(code)["heavy"] == []


def test_the_check_itself_sees_a_heavy_import(tmp_path: Path):
    # Guards the test above against passing vacuously: a DAG file importing pandas is caught.
    (tmp_path / "heavy_dag.py").write_text(
        "import pandas\nfrom airflow.sdk import DAG\nwith DAG('heavy', schedule=None):\n    pass\n"
    )
    code = f"""
from airflow.dag_processing.dagbag import DagBag
DagBag(dag_folder={str(tmp_path)!r})
"""
    assert _loaded_after(code)["heavy"] == ["pandas"]


def test_trial_workers_preload_no_airflow():
    """Ray Tune's trial workers preload these modules (``TRIAL_WORKER_MODULES``) where Airflow may not be
    configured (a Ray node): importing them must not import Airflow, whose import sets up its database.
    A module-level import of our errors (which import Airflow) in ml/metrics.py once made every trial of
    ``make demo`` die at start; so did importing them inside the scoring function."""
    probe = """
import importlib, json, sys
from airflow_mlops.hooks.ray import TRIAL_WORKER_MODULES
"""
    # the hook itself imports Airflow: take the module names, then check them in a second interpreter
    result = run_python(probe + 'print("@@" + json.dumps(list(TRIAL_WORKER_MODULES)))')
    assert result.returncode == 0, result.stderr[-4000:]
    modules = json.loads([r for r in result.stdout.splitlines() if r.startswith("@@")][-1][2:])
    assert "airflow_mlops.ml.trainables" in modules
    # what a trial does with them: score its validation rows for each task
    score = """
from airflow_mlops.ml.trainables import scores
scores("binary", [0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4])
scores("multiclass", [0, 1, 2], [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
scores("regression", [1.0, 2.0, 3.0], [1.1, 1.9, 3.2])
"""
    check = run_python(
        "import importlib, json, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in modules)
        + score
        + 'print("@@" + json.dumps(sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))))'
    )
    assert check.returncode == 0, check.stderr[-4000:]
    loaded = json.loads([r for r in check.stdout.splitlines() if r.startswith("@@")][-1][2:])
    assert loaded == []
