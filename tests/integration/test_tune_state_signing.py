"""Ray Tune's saved state is resumed only when this search signed it: a tampered ``tuner.pkl`` (which
``Tuner.restore`` unpickles) is moved aside and the search starts fresh, without running its code."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_mlops.artifacts import as_path

pytestmark = pytest.mark.integration


class _Payload:
    """Unpickling it writes the marker file: what a tampered Tune state would do on restore."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_tampered_tune_state_is_not_unpickled_and_the_search_starts_fresh(
    ray_cluster, flights_training_set, tmp_path, monkeypatch
):
    from airflow_mlops.operators.tuning import RayTuneOperator

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    arguments = dict(
        task_id="tune",
        training_data_uri=str(flights_training_set["manifest"]),
        trainable="sleep",
        search_space={"seconds": 0.2, "score": {"uniform": [0.0, 1.0]}},
        metric="score",
        mode="max",
        num_samples=2,
        scheduler="fifo",
        seed=3,
    )

    def attempt(try_number: int) -> dict:
        ti = SimpleNamespace(dag_id="tune_tampered", run_id="r1", task_id="tune", try_number=try_number)
        return RayTuneOperator(**arguments).execute({"ti": ti})

    first = attempt(1)
    state = as_path(first["result_uri"]).parent / "tune_state"
    experiment = Path(str(state).removeprefix("file://")) / "search"
    assert (experiment.parent / "search.manifest.json").exists()

    # a retry of an untouched state resumes it (the manifest verifies)
    assert attempt(2)["resumed"] is True

    marker = tmp_path / "PWNED"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    retried = attempt(3)

    assert retried["resumed"] is False
    assert retried["counts"]["completed"] == 2
    assert not marker.exists()
    assert list(experiment.parent.glob("search.refused-*"))  # kept aside, not deleted
