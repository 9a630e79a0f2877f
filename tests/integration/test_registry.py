"""The model registry on a real BentoML model store, with real models: flight-delay classifiers (binary)
and a Seattle weather model (multiclass, tuned with Ray Tune) whose signature names the entity key and
the features of a real Feast feature service."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from serving.models import FEATURES, training_frame, write_manifest, write_model

from airflow_mlops.exceptions import MLOpsArgumentError
from airflow_mlops.hooks.bentoml import BentoMLHook, ModelIntegrityError, ModelRegistryError
from airflow_mlops.operators.registry import (
    PromoteModelOperator,
    RegisterModelOperator,
    RollbackModelOperator,
)


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
        "train_manifest": write_manifest(tmp, "train", train),
        "holdout": write_manifest(tmp, "holdout", flights[flights["month"] == 4]),
        "early_holdout": write_manifest(tmp, "early", flights[flights["month"] == 2]),
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
    assert record["training_manifest"]["time_range"]["end"].startswith("2013-04-01")
    assert record["dag_run_id"] == "manual__1"
    # an old model.json ("classification", no classes) is a binary model with classes 0/1
    assert (record["task"], record["classes"], record["metrics"]) == ("binary", [0, 1], {"auc": 0.7})
    signature = BentoMLHook().signature("flight_delay", first["version"])
    assert signature.task == "binary" and signature.features == FEATURES and not signature.entity_keys
    fields = {f.name: f for f in signature.request_features}
    assert list(fields) == FEATURES
    assert "JFK" in fields["origin"].allowed and fields["hour"].type == "integer"
    assert record["signature"] == signature.model_dump(mode="json")


def test_a_registration_without_a_training_snapshot_is_refused_and_writes_nothing(registry_state, models):
    from airflow_mlops.ml.signature import SignatureError

    with pytest.raises(
        SignatureError, match=r"training_manifest_uri is not set.*Fix: pass training_manifest_uri"
    ):
        RegisterModelOperator(
            task_id="register", model_name="flight_delay", model_uri=str(models["good"])
        ).execute(_context())
    hook = BentoMLHook()
    assert hook.read_index("flight_delay")["versions"] == {}
    assert not hook.registry_path("flight_delay").exists()
    assert hook.model_store.list() == []


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


# ------------------------------------------------------------------- a multiclass model with Feast
SEATTLE_REPO = Path(__file__).resolve().parents[1] / "lifecycle" / "seattle" / "feature_repo"


def _tune(manifest: str, run: str, space: dict) -> dict:
    from seattle_weather import FEATURES

    from airflow_mlops.operators.tuning import RayTuneOperator

    return RayTuneOperator(
        task_id="tune",
        training_data_uri=manifest,
        trainable="lightgbm_classifier",
        search_space=space,
        features=FEATURES,
        num_samples=1,
        scheduler="fifo",
        seed=1,
    ).execute({"ti": SimpleNamespace(dag_id="weather_train", run_id=run, task_id="tune", try_number=1)})


def test_a_multiclass_model_records_its_signature_and_is_gated_on_macro_f1(
    registry_state, monkeypatch, ray_cluster
):
    from seattle_weather import LABEL, REQUEST_FEATURES, STORE_FEATURES, write_training_set
    from sklearn.metrics import f1_score

    from airflow_mlops.hooks.feast import FeastHook

    monkeypatch.setenv("MLOPS_FEAST_DIR", str(registry_state / "feast"))
    monkeypatch.setenv("MLOPS_OFFLINE_ROOT", f"file://{registry_state / 'offline'}")
    FeastHook(repo_path=str(SEATTLE_REPO)).apply()  # the real feature service rain_model, registered
    train = write_training_set(registry_state / "sets", "train", "2012-01-01", "2013-07-01")
    holdout = write_training_set(registry_state / "sets", "holdout", "2013-07-01", "2014-01-01")
    strong = _tune(str(train), "r1", {"learning_rate": 0.1, "num_boost_round": 60})
    weak = _tune(str(train), "r2", {"learning_rate": 0.01, "num_boost_round": 3, "num_leaves": 2})

    def register(tuned: dict) -> dict:
        return RegisterModelOperator(
            task_id="register",
            model_name="seattle_weather",
            model_uri=tuned["model_uri"],
            training_manifest_uri=str(train),
            feature_service="rain_model",
            feast_repo_path=str(SEATTLE_REPO),
        ).execute(_context())

    first = register(strong)
    classes = ["drizzle", "fog", "rain", "snow", "sun"]
    assert (first["task"], first["classes"]) == ("multiclass", classes)
    hook = BentoMLHook()
    record = hook.read_index("seattle_weather")["versions"][first["version"]]
    # tuned without naming a metric: the registry records the task's default, macro-F1
    assert record["metrics"] == {"macro_f1": pytest.approx(strong["best_metric"])}
    assert (record["metric"], record["metric_mode"]) == ("macro_f1", "max")
    signature = hook.signature("seattle_weather", first["version"])
    assert [f.name for f in signature.entity_keys] == ["station"]
    assert [f.name for f in signature.request_features] == REQUEST_FEATURES
    assert signature.store_features == STORE_FEATURES and signature.feature_service == "rain_model"
    season = signature.request_features[1]
    assert season.allowed == ["autumn", "spring", "summer", "winter"]
    assert (signature.label, signature.classes) == (LABEL, classes)

    decision = PromoteModelOperator(
        task_id="promote",
        model_name="seattle_weather",
        candidate_version=first["version"],
        holdout_uri=str(holdout),
    ).execute(_context())
    assert decision["promoted"] and (decision["metric"], decision["mode"]) == ("macro_f1", "max")
    # the recorded score is macro-F1 of the registered model on the holdout, over its five classes
    rows = pd.read_parquet(str(holdout).replace(".json", ".parquet"))
    proba = hook.load("seattle_weather", first["version"]).predict(rows)
    expected = f1_score(
        rows[LABEL].map(classes.index),
        proba.argmax(axis=1),
        average="macro",
        labels=range(5),
        zero_division=0,
    )
    assert decision["candidate_score"] == pytest.approx(expected)
    assert hook.production_version("seattle_weather") == first["version"]

    second = register(weak)
    refused = PromoteModelOperator(
        task_id="promote",
        model_name="seattle_weather",
        candidate_version=second["version"],
        holdout_uri=str(holdout),
    ).execute(_context())
    assert refused["production_score"] == pytest.approx(expected)
    assert refused["promoted"] == (refused["candidate_score"] > expected)
    history = [
        h for h in hook.read_index("seattle_weather")["history"] if h["action"] in ("promote", "reject")
    ]
    assert [(h["metric"], h["mode"], h["task"]) for h in history] == [("macro_f1", "max", "multiclass")] * 2
    with pytest.raises(MLOpsArgumentError, match=r"metric 'auc' does not fit a multiclass model"):
        PromoteModelOperator(
            task_id="promote",
            model_name="seattle_weather",
            candidate_version=second["version"],
            holdout_uri=str(holdout),
            metric="auc",
        ).execute(_context())


def test_a_refused_first_model_skips_the_drift_baseline_and_serving_then_a_promoted_one_gets_it(
    registry_state, models
):
    """The train DAG's ``drift_baseline`` after a gate that refused the model's first candidate: nothing is
    in production, so the task skips (and the serving tasks after it), the run does not fail; once a model is
    promoted the task prepares that version's reference."""
    from airflow.sdk.exceptions import AirflowSkipException

    from airflow_mlops.operators.drift import DriftBaselineOperator

    baseline = DriftBaselineOperator(
        task_id="drift_baseline", model_name="flight_delay", columns=FEATURES[:2]
    )
    noise = _register(models, "noise")["version"]
    refused = _promote(models, noise, floor=0.9)
    assert not refused["promoted"] and BentoMLHook().read_index("flight_delay")["production"] is None
    with pytest.raises(AirflowSkipException, match="flight_delay has no production version"):
        baseline.execute(_context())

    good = _register(models, "good")["version"]
    assert _promote(models, good)["promoted"]
    reference = baseline.execute(_context())
    training = pd.read_parquet(models["train_manifest"].removeprefix("file://").replace(".json", ".parquet"))
    assert (reference["version"], reference["rows"]) == (good, len(training))
