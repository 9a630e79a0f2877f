"""Shared set-up for the whole suite: one Airflow home and database, one landed demo data set.

The environment is fixed here, before anything imports Airflow, so the suite never touches the demo's
state: everything lives under ``state/tests/session-<pid>`` in the clone, removed when the session ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlops_testing import ROOT

# One folder per pytest process, removed when it ends: concurrent runs never share or wipe state.
TEST_STATE = ROOT / "state" / "tests" / f"session-{os.getpid()}"
AIRFLOW_HOME = TEST_STATE / "airflow"
MLOPS_STATE = TEST_STATE / "mlops"

shutil.rmtree(TEST_STATE, ignore_errors=True)
atexit.register(shutil.rmtree, TEST_STATE, ignore_errors=True)
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
os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
os.environ.update(TEST_ENV)


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


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL 15 server for the whole session (see ``tests/pg_server.py``), removed at its end."""
    import tempfile

    from pg_server import PgServer

    root = Path(tempfile.mkdtemp(prefix="mlops-pg-"))
    server = PgServer(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_pg_db(postgres_server) -> str:
    """A migrated Airflow metadata database on the session's PostgreSQL, for the tests that run Airflow's
    components (``make demo`` runs them on PostgreSQL too: SQLite cannot carry their concurrency)."""
    url = postgres_server.create_database("airflow_components")
    airflow = Path(sys.executable).with_name("airflow")
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    result = subprocess.run(
        [str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return url


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database of the session's PostgreSQL for the calling test, as an Airflow connection URI
    (``postgresql://...``)."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_server.create_database(name, driver="postgresql")


# `make test` runs two pytest workers (pytest-xdist, `-n 2`): one runs the scaled topology
# (tests/system/test_scaled_topology.py: minutes of waiting on heartbeats, Celery and Ray between bursts of
# work), the approval flow, the UI's browser tests and the unit tests, the other everything else, each in file
# order (the two groups take about as long). Each worker is a pytest session of its
# own (its own state folder, PostgreSQL, Airflow and Ray), so the session-wide set-ups are paid once per
# worker, and no module is split between the two. The split is a scheduler of xdist's own kind (its
# documented hook): `--dist loadgroup` cannot do it here, since pytest 9 ignores the group suffix it writes
# into the node ids.
SIDE_GROUP = "scaled-topology-approval-ui-and-unit"
#: the modules of the side group besides tests/unit/
SIDE_MODULES = ("tests/system/test_scaled_topology.py", "tests/system/test_approval.py", "tests/ui/")
MAIN_GROUP = "single-host"


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    side = path.startswith(("tests/unit/", *SIDE_MODULES))
    return SIDE_GROUP if side else MAIN_GROUP


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault-injection cases (tests/faults) run last: they time kills against Airflow's heartbeats and
    API calls, and run beside the scaled topology's busiest minutes they saw work done twice (a finished
    try's success not recorded while the machine was saturated: docs/faults.md). At the end of the suite
    the other worker has finished its group."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/faults/"))  # stable: file order otherwise


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class TwoGroupScheduling(LoadScopeScheduling):
        """Whole groups to a worker: with two workers, each runs one group, in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return TwoGroupScheduling(config, log)


# Time per test module (set-up, calls and tear-down together), printed after pytest's slowest tests: where the
# suite's 30-minute budget goes is a per-module question (a module's shared stack is paid in its first set-up).
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    from faults.conftest import fault_results, format_table

    rows, paths = fault_results(config)
    if rows:
        terminalreporter.write_sep("=", "fault-injection results")
        terminalreporter.write_line(format_table(rows))
        terminalreporter.write_line(f"(rows as JSON in {', '.join(map(str, paths))})")
    if not _MODULE_SECONDS:
        return
    terminalreporter.section("slowest modules")
    ranked = sorted(_MODULE_SECONDS.items(), key=lambda item: -item[1])
    for module, seconds in ranked[:25]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")
    if len(ranked) > 25:
        rest = sum(seconds for _, seconds in ranked[25:])
        terminalreporter.write_line(f"{rest:8.1f}s  {len(ranked) - 25} other modules")
