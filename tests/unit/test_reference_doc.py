"""docs/operators.md is the reference users read: it must match the registered classes' docstrings."""

from __future__ import annotations

from mlops_testing import ROOT

from airflow_mlops.reference import render


def test_the_operator_reference_is_current():
    rendered = render()
    assert "### `airflow_mlops.operators.tuning.RayTuneOperator`" in rendered
    assert (ROOT / "docs" / "operators.md").read_text() == rendered, (
        "docs/operators.md is out of date: run `.venv/bin/python -m airflow_mlops.reference`"
    )
