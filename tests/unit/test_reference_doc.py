"""docs/operators.md is the reference users read: it must match the registered classes' docstrings and
show, for every operator and sensor, a runnable example taken from the example DAG files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from mlops_testing import ROOT

from airflow_mlops.reference import EXAMPLES, ExampleMarkerError, render

EXAMPLE_FILES = ["example_operations.py", "example_seattle_rain.py"]


def _sections(rendered: str, title: str) -> dict[str, str]:
    """``{class name: its section}`` of the ``## title`` part of the reference."""
    part = rendered.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return {
        m.group(1).rsplit(".", 1)[-1]: m.group(2)
        for m in re.finditer(r"^### `([\w.]+)`\n(.*?)(?=^### |\Z)", part, re.S | re.M)
    }


def _examples(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_the_operator_reference_is_current():
    rendered = render()
    assert "### `airflow_mlops.operators.tuning.RayTuneOperator`" in rendered
    assert (ROOT / "docs" / "operators.md").read_text() == rendered, (
        "docs/operators.md is out of date: run `.venv/bin/python -m airflow_mlops.reference`"
    )


def test_the_example_files_are_the_ones_the_reference_reads():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == EXAMPLE_FILES


@pytest.mark.parametrize("title", ["Operators", "Sensors"])
def test_every_operator_and_sensor_shows_valid_python_that_uses_it(title):
    sections = _sections(render(), title)
    assert len(sections) >= (10 if title == "Operators" else 2)
    for name, section in sections.items():
        blocks = re.findall(r"```python\n(.*?)\n```", section, re.S)
        assert len(blocks) == 1, f"{name}: {len(blocks)} example blocks"
        code = blocks[0]
        compile(code, name, "exec")  # a syntax error in an example fails here
        assert re.search(rf"\b{name}\(", code), f"the example of {name} does not create one"
        source = re.search(r"Example \(from \[`([^`]+)`\]", section).group(1)
        lines = [line.strip() for line in (ROOT / source).read_text().splitlines()]
        wanted = [line.strip() for line in code.splitlines()]
        assert any(lines[i : i + len(wanted)] == wanted for i in range(len(lines))), (
            f"the example of {name} is not the text of {source}"
        )


def test_the_seattle_example_covers_its_lifecycle_in_order():
    sections = _sections(render(), "Operators")
    seattle = [n for n, s in sections.items() if "example_seattle_rain.py" in s]
    assert set(seattle) >= {
        "GXValidateOperator",
        "OfflinePartitionWriteOperator",
        "FeastMaterializeOperator",
        "FeastTrainingDatasetOperator",
        "RayTuneOperator",
        "RegisterModelOperator",
        "PromoteModelOperator",
        "EvidentlyDriftOperator",
    }


def test_an_operator_without_an_example_fails_the_reference_naming_it(tmp_path):
    folder = _examples(tmp_path)
    dag_file = folder / "example_seattle_rain.py"
    text = dag_file.read_text()
    start, end = (
        text.index("    # [START howto_operator_ray_tune]"),
        text.index("# [END howto_operator_ray_tune]"),
    )
    dag_file.write_text(text[:start] + text[end + len("# [END howto_operator_ray_tune]") :])
    with pytest.raises(ExampleMarkerError, match=r"RayTuneOperator \(# \[START howto_operator_ray_tune\]\)"):
        render(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: (
                t + "# [START howto_operator_feast_teleport]\nx = 1\n# [END howto_operator_feast_teleport]\n"
            ),
            r"howto_operator_feast_teleport \(example_seattle_rain.py\).*name the marker after the class",
        ),
        (
            lambda t: t.replace("    # [END howto_operator_feast_apply]\n", ""),
            r"howto_operator_feast_apply opened and never closed",
        ),
        (
            lambda t: t.replace(
                "    # [START howto_operator_feast_apply]\n",
                "    # [START howto_operator_feast_apply]\n    # [START howto_operator_feast_apply]\n",
            ),
            r"example_seattle_rain.py:\d+: marker howto_operator_feast_apply is used twice",
        ),
    ],
    ids=["unknown class", "never closed", "twice"],
)
def test_a_broken_marker_fails_the_reference_naming_the_file(tmp_path, edit, message):
    folder = _examples(tmp_path)
    dag_file = folder / "example_seattle_rain.py"
    dag_file.write_text(edit(dag_file.read_text()))
    with pytest.raises(ExampleMarkerError, match=message):
        render(folder)
