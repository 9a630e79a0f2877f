"""The model registry on a real BentoML model store, with real models trained on the flights data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from serving.models import FEATURES, LABEL, training_frame, write_model

from airflow_mlops.hooks.bentoml import BentoMLHook, ModelIntegrityError, ModelRegistryError
from airflow_mlops.operators.registry import (
    PromoteModelOperator,
    RegisterModelOperator,
    RollbackModelOperator,
)


def _manifest(tmp: Path, name: str, frame: pd.DataFrame) -> str:
    data = tmp / f"{name}.parquet"
    frame.assign(event_timestamp=frame["time_hour"])[FEATURES + [LABEL, "event_timestamp"]].to_parquet(data)
    manifest = tmp / f"{name}.json"
    manifest.write_text(
        json.dumps(
            {
                "data_uri": f"file://{data}",
                "label": LABEL,
                "event_timestamp_column": "event_timestamp",
                "rows": len(frame),
                "time_range": {"start": str(frame["time_hour"].min()), "end": str(frame["time_hour"].max())},
            }
        )
    )
    return f"file://{manifest}"


@pytest.fixture(scope="module")
def flights() -> pd.DataFrame:
    return training_frame(months=tuple(range(1, 13)))


@pytest.fixture(scope="module")
def models(tmp_path_factory, flights):
    tmp = tmp_path_factory.mktemp("models")
    train = flights[flights["month"] <= 3]
    return {
        "good": write_model(tmp / "good", train, max_iter=60),
        "noise": write_model(tmp / "noise", train, max_iter=10, shuffle_labels=True),
        "better": write_model(tmp / "better", train, max_iter=150),
        "train_manifest": _manifest(tmp, "train", train),
        "holdout": _manifest(tmp, "holdout", flights[flights["month"] == 4]),
        "early_holdout": _manifest(tmp, "early", flights[flights["month"] == 2]),
    }


@pytest.fixture
def registry_state(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    return tmp_path


def _context(run: str = "manual__1") -> dict:
    return {"run_id": run, "ti": SimpleNamespace(dag_id="flights_train")}


def _register(models, which: str) -> dict:
    return RegisterModelOperator(
        task_id="register",
        model_name="flight_delay",
        model_uri=str(models[which]),
        metrics={"auc": 0.7},
        hyperparameters={"max_iter": 60},
        training_manifest_uri=models["train_manifest"],
        feature_service="delay_model",
    ).execute(_context())


def _promote(models, version: str, holdout: str = "holdout", **kwargs) -> dict:
    return PromoteModelOperator(
        task_id="promote",
        model_name="flight_delay",
        candidate_version=version,
        holdout_uri=models[holdout],
        floor=kwargs.pop("floor", 0.55),
        **kwargs,
    ).execute(_context())


def test_register_is_a_candidate_with_metadata_and_an_export(registry_state, models):
    first = _register(models, "good")
    assert first["stage"] == "candidate"
    assert first["tag"] == f"flight_delay:{first['version']}"
    assert Path(first["export_uri"].removeprefix("file://")).is_file()
    again = _register(models, "good")
    assert again["version"] == first["version"], "the same model registered twice is one version"
    index = BentoMLHook().read_index("flight_delay")
    record = index["versions"][first["version"]]
    assert record["feature_service"] == "delay_model"
    assert record["training_manifest"]["time_range"]["end"].startswith("2013-04-01")
    assert record["dag_run_id"] == "manual__1"


def test_the_gate_promotes_better_rejects_worse_and_records_both_scores(registry_state, models):
    good = _register(models, "good")["version"]
    first = _promote(models, good)
    assert first["promoted"] and first["production_score"] is None and first["candidate_score"] > 0.6

    noise = _register(models, "noise")["version"]
    refused = _promote(models, noise, floor=0.0)
    assert not refused["promoted"]
    assert refused["candidate_score"] < refused["production_score"]

    better = _register(models, "better")["version"]
    decision = _promote(models, better, min_improvement=0.0)
    index = BentoMLHook().read_index("flight_delay")
    if decision["candidate_score"] > decision["production_score"]:
        assert decision["promoted"] and index["production"] == better
        assert index["versions"][good]["stage"] == "archived"
    else:
        assert not decision["promoted"] and index["production"] == good
    assert index["versions"][noise]["stage"] == "rejected"
    recorded = [h for h in index["history"] if h["action"] in ("promote", "reject")]
    assert [h["version"] for h in recorded] == [good, noise, better]
    assert all("candidate_score" in h and "production_score" in h for h in recorded)


def test_rollback_restores_the_previous_versions_answers(registry_state, models, flights):
    good = _register(models, "good")["version"]
    _promote(models, good)
    better = _register(models, "better")["version"]
    _promote(models, better, min_improvement=0.0, floor=0.0)
    hook = BentoMLHook()
    if hook.read_index("flight_delay")["production"] != better:
        pytest.fail("the 150-iteration model should beat the 60-iteration one on April")
    sample = flights[flights["month"] == 5].head(50)
    expected = hook.load("flight_delay", good).predict(sample)
    result = RollbackModelOperator(task_id="rollback", model_name="flight_delay").execute(_context())
    assert result == {"production_version": good, "rolled_back_from": better}
    index = BentoMLHook().read_index("flight_delay")
    assert index["production"] == good
    np.testing.assert_allclose(
        BentoMLHook().load("flight_delay", index["production"]).predict(sample), expected
    )


def test_a_tampered_model_file_is_refused(registry_state, models):
    version = _register(models, "good")["version"]
    hook = BentoMLHook()
    model_file = hook.model_dir("flight_delay", version) / "model.skops"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelIntegrityError, match="was modified or corrupted"):
        BentoMLHook().load("flight_delay", version)


def test_a_missing_local_copy_is_imported_from_the_export(registry_state, models):
    version = _register(models, "good")["version"]
    hook = BentoMLHook()
    hook.model_store.delete(f"flight_delay:{version}")
    assert BentoMLHook().load("flight_delay", version).features == FEATURES


def test_a_holdout_not_later_than_training_is_refused(registry_state, models):
    version = _register(models, "good")["version"]
    with pytest.raises(ModelRegistryError, match="not after the training data"):
        _promote(models, version, holdout="early_holdout")


def test_unknown_versions_and_bad_names_are_named(registry_state, models):
    _register(models, "good")
    with pytest.raises(ModelRegistryError, match="has no version 'v123'"):
        _promote(models, "v123")
    with pytest.raises(ModelRegistryError, match="is not a valid registry name"):
        BentoMLHook().read_index("Flight Delay!")
