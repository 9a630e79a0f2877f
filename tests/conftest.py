"""Shared set-up for the whole suite: one Airflow home and database, one landed demo data set.

The environment is fixed here, before anything imports Airflow, so the suite never touches the demo's
state: everything lives under ``state/tests`` in the clone and is recreated at each session start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_STATE = ROOT / "state" / "tests"
AIRFLOW_HOME = TEST_STATE / "airflow"
MLOPS_STATE = TEST_STATE / "mlops"

shutil.rmtree(TEST_STATE, ignore_errors=True)
AIRFLOW_HOME.mkdir(parents=True)
MLOPS_STATE.mkdir(parents=True)
TEST_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__MLOPS__STATE_DIR": str(MLOPS_STATE),
}
for key in [k for k in os.environ if k.startswith("AIRFLOW__MLOPS__")]:
    del os.environ[key]
os.environ.update(TEST_ENV)


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv with the suite's environment (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) shared by the whole session."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return AIRFLOW_HOME / "airflow.db"


@pytest.fixture(scope="session")
def landed_week() -> dict:
    """The first week of 2013 landed as daily batches in the suite's state folder."""
    from airflow_mlops.demo.data import land

    return land(start="2013-01-01", end="2013-01-07")
