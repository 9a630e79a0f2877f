"""The registry on a real BentoML model store refuses what could run code or was changed without the
signing key: a skops file over ``builtins.exec`` at registration and at load, a record edited in the
index by a writer without the key; the model of every built-in trainable still registers and loads."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from airflow_mlops.hooks.bentoml import KEY_FILE, BentoMLHook, ModelIntegrityError
from airflow_mlops.ml.model_io import UntrustedModelError

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "ml"))
from test_model_trust import _frame, _model_dir, malicious_model  # noqa: E402

BUILT_IN = {
    "hist_gradient_boosting_classifier": "binary",
    "hist_gradient_boosting_regressor": "regression",
    "lightgbm_classifier": "multiclass",
    "lightgbm_regressor": "regression",
    "logistic_regression": "multiclass",
    "linear_regression": "regression",
    "random_forest_classifier": "binary",
    "random_forest_regressor": "regression",
}


@pytest.fixture
def registry_state(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_MLOPS_REGISTRY", raising=False)
    return tmp_path


def _training_set(task: str):
    from airflow_mlops.ml.dataset import TrainingSet

    rng = np.random.default_rng(1)
    n = 240
    frame = _frame(n)
    frame["distance"] = frame["distance"].where(rng.random(n) > 0.05)  # some missing numbers
    signal = frame["distance"].fillna(1000).to_numpy() / 300 + (frame["origin"] == "JFK").to_numpy()
    if task == "regression":
        y, classes = signal + rng.normal(0, 0.1, n), []
    elif task == "binary":
        y, classes = (signal > np.median(signal)).astype(int), ["on_time", "late"]
    else:
        y, classes = np.digitize(signal, np.quantile(signal, [0.33, 0.66])), ["a", "b", "c"]
    cut = 180
    return TrainingSet(
        x_train=frame[:cut],
        y_train=y[:cut],
        x_valid=frame[cut:].reset_index(drop=True),
        y_valid=y[cut:],
        task=task,
        label="target",
        features=["origin", "distance"],
        categorical=["origin"],
        categories={"origin": ["EWR", "JFK", "LGA"]},
        time_column=None,
        split_time=None,
        classes=classes,
    )


def _trained(monkeypatch, tmp_path: Path, trainable: str, task: str) -> tuple[Path, object]:
    """The model folder the built-in ``trainable`` reports to Tune as its final checkpoint."""
    from airflow_mlops.ml import trainables

    final: dict = {}

    def report(metrics, *, model_files=None, meta=None):
        if model_files is not None:
            final.update(files=model_files, meta=meta)

    monkeypatch.setattr(trainables, "report", report)
    data = _training_set(task)
    config = {"max_iter": 20, "num_boost_round": 20, "n_estimators": 10, "report_every": 5, "seed": 0}
    getattr(trainables, trainable)(config, data)
    folder = tmp_path / trainable
    folder.mkdir()
    for name, blob in final["files"].items():
        (folder / name).write_bytes(blob)
    (folder / "model.json").write_text(json.dumps(final["meta"], default=str))
    return folder, data


@pytest.mark.parametrize("trainable", sorted(BUILT_IN))
def test_every_built_in_trainables_model_registers_and_loads(
    registry_state, monkeypatch, tmp_path, trainable
):
    folder, data = _trained(monkeypatch, tmp_path, trainable, BUILT_IN[trainable])
    hook = BentoMLHook()
    record = hook.register("trust", folder, {})
    assert record["record_hmac"].startswith("hmac-sha256:")
    assert isinstance(record["trusted_types"], list)

    predictions = BentoMLHook().load("trust", record["version"]).predict(data.x_valid)
    assert len(predictions) == len(data.x_valid) and np.isfinite(predictions).all()


def test_a_file_that_runs_exec_is_refused_at_registration_and_at_load(registry_state, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _model_dir(tmp_path / "evil", malicious_model(marker))
    hook = BentoMLHook()

    with pytest.raises(UntrustedModelError, match="builtins.exec"):
        hook.register("flight_delay", evil, {})
    assert hook.read_index("flight_delay")["versions"] == {}
    assert not (registry_state / "bentoml" / "models" / "flight_delay").exists()

    # a legit version whose file is later swapped for the crafted one and its hash rewritten in the index
    # by a writer without the key: refused by the HMAC; even a record re-signed with the key over the
    # crafted file's hash is refused by the type check
    from sklearn.linear_model import LogisticRegression

    frame = _frame()
    good = LogisticRegression().fit(frame[["distance"]], np.arange(len(frame)) % 2)
    record = hook.register("flight_delay", _model_dir(tmp_path / "good", good), {})
    folder = hook.model_dir("flight_delay", record["version"])
    (folder / "model.skops").write_bytes((evil / "model.skops").read_bytes())
    from airflow_mlops.artifacts import sha256_of

    with hook.locked("flight_delay") as index:
        index["versions"][record["version"]]["files_sha256"]["model.skops"] = sha256_of(
            folder / "model.skops"
        )
    with pytest.raises(ModelIntegrityError, match="signature that does not verify"):
        BentoMLHook().load("flight_delay", record["version"])
    with hook.locked("flight_delay") as index:
        hook.sign_record("flight_delay", index["versions"][record["version"]])
    with pytest.raises(UntrustedModelError, match="builtins.exec"):
        BentoMLHook().load("flight_delay", record["version"]).predict(_frame(3))
    assert not marker.exists()


def test_a_record_edited_without_the_key_is_refused_before_load(registry_state, tmp_path):
    from sklearn.linear_model import LogisticRegression

    frame = _frame()
    model = LogisticRegression().fit(frame[["distance"]], np.arange(len(frame)) % 2)
    hook = BentoMLHook()
    folder = _model_dir(tmp_path / "m", model)
    version = hook.register("flight_delay", folder, {})["version"]
    # a writer of the state database without the signing key
    index = hook.read_index("flight_delay")
    index["versions"][version]["trusted_types"] = ["builtins.exec"]
    hook.write_index("flight_delay", index)

    for action in (
        lambda: BentoMLHook().load("flight_delay", version),
        lambda: BentoMLHook().served_record("flight_delay", version),
        lambda: BentoMLHook().model_dir("flight_delay", version),
    ):
        with pytest.raises(ModelIntegrityError) as refused:
            action()
        assert f"flight_delay:{version}" in str(refused.value)
        assert "register the version again" in refused.value.fix

    # what the error says to do works: registering the same content again replaces the record
    assert BentoMLHook().register("flight_delay", folder, {})["version"] == version
    reloaded = BentoMLHook().load("flight_delay", version).model
    assert reloaded.predict(_frame(4)[["distance"]]).shape == (4,)


def test_the_embedded_key_is_private_and_a_connection_key_replaces_it(registry_state, monkeypatch, tmp_path):
    from sklearn.linear_model import LogisticRegression

    frame = _frame()
    model = LogisticRegression().fit(frame[["distance"]], np.arange(len(frame)) % 2)
    version = BentoMLHook().register("flight_delay", _model_dir(tmp_path / "m", model), {})["version"]
    key_file = registry_state / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # the same key from connection mlops_registry: records signed under the file key no longer verify
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLOPS_REGISTRY", json.dumps({"conn_type": "generic", "password": "x" * 40})
    )
    with pytest.raises(ModelIntegrityError, match="under another key"):
        BentoMLHook().load("flight_delay", version)
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_REGISTRY", json.dumps({"conn_type": "generic"}))
    with pytest.raises(Exception, match="has no registry signing key"):
        BentoMLHook().load("flight_delay", version)
    monkeypatch.delenv("AIRFLOW_CONN_MLOPS_REGISTRY")
    os.chmod(key_file, 0o644)
    with pytest.raises(Exception, match="can be read by other users"):
        BentoMLHook().load("flight_delay", version)


def test_the_model_server_environment_carries_the_connection_key(registry_state, monkeypatch):
    from airflow_mlops.hooks.bentoml import registry_key_env, registry_signing_key

    assert registry_key_env() == {}  # embedded default: the server finds the key file in its state folder
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLOPS_REGISTRY", json.dumps({"conn_type": "generic", "password": "k" * 40})
    )
    env = registry_key_env()
    assert list(env) == ["AIRFLOW_CONN_MLOPS_REGISTRY"]
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_REGISTRY", env["AIRFLOW_CONN_MLOPS_REGISTRY"])
    assert registry_signing_key() == b"k" * 40
