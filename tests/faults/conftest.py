"""Fault-injection suite: the results table.

Every test of ``tests/faults`` takes the ``fault`` fixture, names its case and records the figures a user
would notice (rows or requests lost, how long the outage lasted) *before* it asserts them, so a failing
case still shows its numbers. When the test ends its outcome is added, and the row is appended to
``faults-results.json`` in pytest's base temporary folder; :func:`pytest_terminal_summary` prints the
table at the end of the session (the closing note of a hardening issue pastes it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

RESULTS_NAME = "faults-results.json"
_STASH = pytest.StashKey[Path]()


@dataclass
class FaultRecord:
    """One row of the table: the case, what it expects, what was lost, and the test's outcome."""

    case: str
    expected: str = ""
    lost: int | None = None
    unit: str = "rows"
    detail: str = ""
    outcome: str = "not run"
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *, lost: int, unit: str | None = None, detail: str = "", **extra: Any) -> None:
        """Record the figures (call before asserting them)."""
        self.lost = lost
        if unit:
            self.unit = unit
        if detail:
            self.detail = detail
        self.extra.update(extra)


def _results_path(config: pytest.Config) -> Path:
    path = config.stash.get(_STASH, None)
    if path is None:
        factory = config._tmp_path_factory  # type: ignore[attr-defined]  # pytest's own, set at configure
        path = factory.getbasetemp() / RESULTS_NAME
        config.stash[_STASH] = path
    return path


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> FaultRecord:
    """The test's row: ``fault.case`` / ``fault.expected`` from the test's docstring, figures by calling it."""
    doc = (request.function.__doc__ or request.node.name).strip()
    first, _, rest = doc.partition("\n")
    expected = " ".join(rest.split())
    record = FaultRecord(case=first.rstrip("."), expected=expected)
    request.node.stash[_RECORD] = record
    return record


_RECORD = pytest.StashKey[FaultRecord]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    record = item.stash.get(_RECORD, None)
    if record is None:
        return report
    if report.when == "setup" and report.failed:
        record.outcome = "error in setup"
    elif report.when == "call":
        record.outcome = "passed" if report.passed else ("skipped" if report.skipped else "FAILED")
    elif report.when == "teardown":
        if report.failed and record.outcome == "passed":
            record.outcome = "error in teardown"
        path = _results_path(item.config)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows.append({"test": item.nodeid, **asdict(record)})
        path.write_text(json.dumps(rows, indent=2))
    return report


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table: case, outcome, lost (with its unit), detail."""
    lines = ["| case | outcome | lost | detail |", "| --- | --- | --- | --- |"]
    for row in rows:
        lost = "?" if row.get("lost") is None else f"{row['lost']} {row.get('unit', '')}".strip()
        lines.append(f"| {row['case']} | {row['outcome']} | {lost} | {row.get('detail', '')} |")
    return "\n".join(lines)


def fault_results(config: pytest.Config) -> tuple[list[dict[str, Any]], list[Path]]:
    """The rows of this process, or (under pytest-xdist) those of its workers, each in its own base folder.
    Printed by ``pytest_terminal_summary`` in tests/conftest.py: the controller of a two-worker run loads
    only that conftest (it collects nothing itself)."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    paths = [p for p in [base / RESULTS_NAME, *sorted(base.glob(f"popen-gw*/{RESULTS_NAME}"))] if p.exists()]
    return [row for path in paths for row in json.loads(path.read_text())], paths


# The Feast data and the flights training set of the integration suite (session fixtures there; imported,
# since a conftest's fixtures only reach the tests under its folder).
from integration.conftest import feast_data, feast_env, flights_training_set, task_context  # noqa: E402, F401
