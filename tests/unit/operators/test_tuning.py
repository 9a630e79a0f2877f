"""RayTuneOperator, RayJobTrigger and RayHook without Ray: template fields, search-space checks,
deferral to the right trigger, the trigger's serialisation and events."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_mlops.exceptions import MLOpsArgumentError, TuningError
from airflow_mlops.hooks.ray import RayHook, bytecode_cache_env
from airflow_mlops.ml.search_space import SearchSpaceError, grid_size, parse_search_space
from airflow_mlops.operators.tuning import RayTuneOperator, job_prefix
from airflow_mlops.triggers.ray import RayJobTrigger

CONTEXT = {
    "ti": SimpleNamespace(
        dag_id="d", run_id="manual__2013-04-01T00:00:00+00:00", task_id="tune", try_number=3
    )
}


def _op(**kwargs) -> RayTuneOperator:
    arguments = {
        "task_id": "tune",
        "training_data_uri": "{{ ti.xcom_pull('training_set')['manifest_uri'] }}",
        "trainable": "lightgbm_classifier",
        "search_space": {"learning_rate": {"loguniform": [0.01, 0.3]}},
        "metric": "auc",
        **kwargs,
    }
    return RayTuneOperator(**arguments)


def test_templated_arguments_are_kept_as_given():
    op = _op(label="{{ params.label }}", time_column="{{ params.t }}")
    assert set(op.template_fields) >= {
        "training_data_uri",
        "label_column",
        "search_space",
        "trainable",
        "time_column",
    }
    assert op.training_data_uri.startswith("{{") and op.label_column == "{{ params.label }}"


def test_search_space_forms():
    space = parse_search_space(
        "learning_rate: {loguniform: [0.01, 0.3]}\nmodel: {choice: [a, b]}\ndepth: {grid_search: [3, 5, 7]}\nfixed: 4"
    )
    assert space == {
        "learning_rate": {"loguniform": [0.01, 0.3]},
        "model": {"choice": ["a", "b"]},
        "depth": {"grid_search": [3, 5, 7]},
        "fixed": 4,
    }
    assert parse_search_space('{"a": {"qrandint": [1, 10, 2]}}') == {"a": {"qrandint": [1, 10, 2]}}
    assert grid_size(space) == 3


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "non-empty mapping"),
        ([1, 2], "non-empty mapping"),
        ({"a": {"uniform": [1]}}, "parameter 'a': uniform takes 2 numbers"),
        ({"a": {"uniform": [2, 1]}}, "parameter 'a': uniform needs low < high"),
        ({"a": {"randint": [1.5, 4]}}, "parameter 'a': randint takes integers"),
        ({"a": {"choice": []}}, "parameter 'a': choice needs at least one value"),
        ({"a": {"choice": [1], "uniform": [0, 1]}}, "exactly one key"),
        ({"a": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"a": {"quniform": [0, 1, 0]}}, "needs q > 0"),
    ],
)
def test_malformed_search_spaces_name_the_parameter(space, message):
    with pytest.raises(SearchSpaceError, match=message):
        parse_search_space(space)


def test_build_spec_rejects_a_bad_space_and_an_unknown_metric_mode():
    with pytest.raises(MLOpsArgumentError, match="malformed search_space: parameter 'lr'"):
        _op(search_space={"lr": {"loguniform": [-1, 1]}}).build_spec(CONTEXT)
    with pytest.raises(MLOpsArgumentError, match="mode is needed for metric 'f1'"):
        _op(metric="f1").build_spec(CONTEXT)


def test_the_metric_follows_the_task_and_is_checked_against_it():
    spec = _op(metric=None).build_spec(CONTEXT)
    assert spec.metric is None and spec.mode is None  # resolved from the task once the data is read
    assert _op(metric=None, task="multiclass").build_spec(CONTEXT).metric == "macro_f1"
    assert _op(metric=None, task="regression").build_spec(CONTEXT).mode == "min"
    with pytest.raises(MLOpsArgumentError, match=r"metric 'rmse' does not fit a binary model.*auc"):
        _op(metric="rmse", task="binary").build_spec(CONTEXT)
    with pytest.raises(MLOpsArgumentError, match=r"mode 'max' contradicts metric 'rmse'"):
        _op(metric="rmse", mode="max").build_spec(CONTEXT)


def test_a_trainable_refuses_a_task_it_does_not_train():
    from airflow_mlops.ml.search import resolve_trainable, trainable_task

    full, fn = resolve_trainable("lightgbm_classifier")
    assert trainable_task(fn, full, None) is None  # binary or multiclass: the label decides
    assert trainable_task(fn, full, "classification") == "binary"
    full, fn = resolve_trainable("lightgbm_regressor")
    assert trainable_task(fn, full, None) == "regression"
    with pytest.raises(MLOpsArgumentError, match=r"trains regression models, not multiclass"):
        trainable_task(fn, full, "multiclass")


def test_build_spec_places_tune_state_under_the_task_artifacts():
    spec = _op(scheduler={"type": "ASHA", "grace_period": 1}).build_spec(CONTEXT)
    assert spec.mode == "max" and spec.scheduler == {"type": "asha", "grace_period": 1}
    assert spec.output_uri.endswith("/d/manual__2013-04-01T00-00-00+00-00/tune/tuning")
    assert spec.storage_path == spec.output_uri + "/tune_state"
    assert spec.resources_per_trial == {"cpu": 1} and spec.reuse_actors is True


def test_deferrable_on_a_cluster_defers_to_the_job_trigger():
    op = _op(ray_conn_id="ray_cluster", deferrable=True, poll_interval=3)
    hook = mock.MagicMock(is_local=False, address="http://head:8265")
    hook.jobs_with_prefix.return_value = {}
    with (
        mock.patch.object(RayTuneOperator, "hook", hook),
        mock.patch("airflow_mlops.ml.search.prepare", return_value=(json.dumps, mock.MagicMock())),
    ):
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(CONTEXT)
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger)
    # the job's id is the task instance's: a later try finds it
    job_id = job_prefix("d", "manual__2013-04-01T00:00:00+00:00", "tune", -1) + "try3"
    assert trigger.job_id == job_id and trigger.ray_conn_id == "ray_cluster" and trigger.poll_interval == 3
    assert trigger.result_uri.endswith("/tune/tuning/result.json")
    assert deferred.value.method_name == "execute_complete"
    # the deferral's state travels with it, not in the operator
    assert deferred.value.kwargs == {"job_id": job_id, "result_uri": trigger.result_uri}
    entrypoint = hook.submit_job.call_args.args[0]
    assert entrypoint.startswith("python -m airflow_mlops.ml.search ") and entrypoint.endswith(
        "/tuning/spec.json"
    )
    assert hook.submit_job.call_args.kwargs["submission_id"] == job_id


def test_job_ids_differ_per_task_instance_and_not_per_try():
    assert job_prefix("d", "r", "tune", -1) == job_prefix("d", "r", "tune", None)
    others = {
        job_prefix("d", "r", "tune", 0),
        job_prefix("d", "r2", "tune", -1),
        job_prefix("d", "r", "t2", -1),
    }
    assert job_prefix("d", "r", "tune", -1) not in others and len(others) == 3


def test_execute_complete_takes_everything_from_the_event(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"metric": "auc", "best_metric": 0.7, "model_uri": "m"}))
    op = _op()
    result = op.execute_complete(
        CONTEXT,
        {
            "status": "success",
            "job_id": "j1",
            "job_status": "SUCCEEDED",
            "result_uri": f"file://{tmp_path / 'result.json'}",
        },
    )
    assert result == {"metric": "auc", "best_metric": 0.7, "model_uri": "m", "ray_job_id": "j1"}
    with pytest.raises(TuningError, match="the tuning job failed: Ray Job j1 ended FAILED"):
        op.execute_complete(
            CONTEXT,
            {
                "status": "error",
                "job_id": "j1",
                "job_status": "FAILED",
                "result_uri": "x",
                "message": "Ray Job j1 ended FAILED.",
            },
        )


def test_trigger_serialize_round_trips():
    trigger = RayJobTrigger(
        job_id="j1", ray_conn_id="ray_cluster", result_uri="file:///r.json", poll_interval=2.5
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_mlops.triggers.ray.RayJobTrigger"
    again = RayJobTrigger(**kwargs)
    assert again.serialize() == (path, kwargs)


def _events(trigger: RayJobTrigger) -> list:
    async def collect():
        return [event async for event in trigger.run()]

    return asyncio.run(collect())


class FakeJobsApi:
    """Ray's Jobs REST API as far as the trigger reads it, on a local port: each job answers the next of
    its scripted statuses (then keeps the last), and its log; unknown jobs get a 404 as from Ray."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.statuses: dict[str, list[str]] = {}
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append((self.path, self.headers.get("Authorization")))
                parts = self.path.strip("/").split("/")  # api, jobs, <id>[, logs]
                job = parts[2] if len(parts) >= 3 else ""
                if job not in api.statuses:
                    self._answer(404, {"detail": f"Job {job} does not exist"})
                elif parts[3:] == ["logs"]:
                    self._answer(200, {"logs": api.logs.get(job, "")})
                else:
                    queue = api.statuses[job]
                    self._answer(200, {"status": queue.pop(0) if len(queue) > 1 else queue[0], "job_id": job})

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def jobs_api(monkeypatch):
    api = FakeJobsApi()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_JOBS",
        json.dumps({"conn_type": "ray", "host": "127.0.0.1", "port": api.port, "password": "s3cret"}),
    )
    yield api
    api.server.shutdown()


def _trigger(job_id: str = "j1") -> RayJobTrigger:
    return RayJobTrigger(
        job_id=job_id, ray_conn_id="ray_jobs", result_uri="file:///r.json", poll_interval=0.01
    )


def test_trigger_polls_the_jobs_api_until_the_job_ends(jobs_api):
    jobs_api.statuses["j1"] = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    events = _events(_trigger())
    assert [e.payload for e in events] == [
        {"status": "success", "job_id": "j1", "job_status": "SUCCEEDED", "result_uri": "file:///r.json"}
    ]
    assert [path for path, _ in jobs_api.requests] == ["/api/jobs/j1"] * 4
    assert {auth for _, auth in jobs_api.requests} == {"Bearer s3cret"}  # the connection's token


def test_trigger_reports_a_failed_job_with_its_log_tail(jobs_api):
    jobs_api.statuses["j1"] = ["RUNNING", "FAILED"]
    jobs_api.logs["j1"] = "line\n" * 2000 + "ValueError: bad trainable"
    (event,) = _events(_trigger())
    assert event.payload["status"] == "error" and event.payload["job_status"] == "FAILED"
    assert (
        event.payload["message"].endswith("ValueError: bad trainable")
        and len(event.payload["message"]) < 4200
    )


def test_trigger_names_a_job_the_cluster_does_not_know(jobs_api):
    (event,) = _events(_trigger("gone"))
    assert event.payload["status"] == "error"
    assert "does not know job 'gone'" in event.payload["message"]


def test_trigger_ends_with_an_error_event_when_the_cluster_is_gone(jobs_api):
    jobs_api.server.shutdown()
    jobs_api.server.server_close()
    (event,) = _events(_trigger())
    assert event.payload["status"] == "error"
    assert "cannot get the status of Ray Job j1: ConnectError" in event.payload["message"]


def test_the_trigger_polls_without_importing_ray(jobs_api):
    """A triggerer runs many triggers in one process: importing Ray there (seconds of CPU) would stall
    every other trigger."""
    jobs_api.statuses["j1"] = ["RUNNING", "SUCCEEDED"]
    code = (
        "import asyncio, sys\n"
        "from airflow_mlops.triggers.ray import RayJobTrigger\n"
        "async def main():\n"
        "    t = RayJobTrigger(job_id='j1', ray_conn_id='ray_jobs', result_uri='r', poll_interval=0.01)\n"
        "    return [e.payload['status'] async for e in t.run()]\n"
        "print(asyncio.run(main()), 'ray' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['success'] False"


@pytest.mark.parametrize(
    ("conn", "address"),
    [
        ({"host": "10.0.0.5"}, "http://10.0.0.5:8265"),
        ({"host": "10.0.0.5", "port": 9000, "schema": "https"}, "https://10.0.0.5:9000"),
        ({"host": "https://ray.example.com/"}, "https://ray.example.com:8265"),
    ],
)
def test_hook_address(monkeypatch, conn, address):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_X", json.dumps({"conn_type": "ray", **conn}))
    hook = RayHook("ray_x")
    assert not hook.is_local and hook.address == address


def test_hook_empty_host_or_no_connection_is_local(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_L", json.dumps({"conn_type": "ray", "extra": {"runtime_env": {"pip": ["a"]}}})
    )
    assert RayHook("ray_l").is_local and RayHook(None).is_local
    assert RayHook("ray_l").runtime_env({"pip": ["b"], "env_vars": {"X": "1"}}) == {
        "pip": ["a", "b"],
        "env_vars": {"X": "1"},
    }


def _import_in_child(module_dir) -> None:
    subprocess.run(
        [sys.executable, "-c", "import probe_module"], cwd=module_dir, check=True, env=dict(os.environ)
    )


def test_processes_started_for_local_ray_cache_their_bytecode_outside_the_sources(monkeypatch, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "probe_module.py").write_text("VALUE = 1\n")
    cache = tmp_path / "pycache"
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)

    with bytecode_cache_env(cache) as used:
        assert used == str(cache)
        _import_in_child(source)  # a Ray worker started here inherits this environment
    cached = list(cache.rglob("probe_module*.pyc"))
    assert len(cached) == 1, list(cache.rglob("*"))
    assert not (source / "__pycache__").exists(), "bytecode was written beside the sources"
    # this process's environment is as it was: later children write no bytecode at all
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1" and "PYTHONPYCACHEPREFIX" not in os.environ
    cached[0].unlink()
    _import_in_child(source)
    assert not list(cache.rglob("probe_module*.pyc")) and not (source / "__pycache__").exists()


def test_bytecode_cache_leaves_an_environment_that_writes_bytecode_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    with bytecode_cache_env(tmp_path) as used:
        assert used is None and "PYTHONPYCACHEPREFIX" not in os.environ
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "theirs"))
    with bytecode_cache_env(tmp_path / "ours") as used:
        assert used is None and os.environ["PYTHONPYCACHEPREFIX"] == str(tmp_path / "theirs")


def test_hook_bearer_token_from_the_password(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_T",
        json.dumps({"conn_type": "ray", "host": "h", "password": "tok", "extra": {"headers": {"X-A": "1"}}}),
    )
    assert RayHook("ray_t")._headers() == {"X-A": "1", "Authorization": "Bearer tok"}


# ------------------------------------------------------------------ best-iteration models (no Ray)


def _overfitting_set():
    """A small noisy training set on which boosting with a high learning rate overfits after a few rounds."""
    import numpy as np
    import pandas as pd

    from airflow_mlops.ml.dataset import build_training_set

    rng = np.random.default_rng(7)
    n = 1200
    frame = pd.DataFrame(
        {
            "t": pd.date_range("2013-01-01", periods=n, freq="h"),
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "kind": rng.choice(["a", "b", "c"], size=n),
        }
    )
    frame["y"] = ((frame["x1"] + rng.normal(scale=1.5, size=n)) > 0).astype(int)
    data = build_training_set(frame, label="y", task="binary", time_column="t")
    data.metric, data.mode = "auc", "max"
    return data


@pytest.mark.parametrize("trainable", ["hist_gradient_boosting_classifier", "lightgbm_classifier"])
def test_boosting_trainables_keep_the_best_iteration_and_stop_early(trainable):
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from airflow_mlops.ml import trainables

    data = _overfitting_set()
    rounds = "max_iter" if trainable.startswith("hist") else "num_boost_round"
    config = {
        rounds: 300,
        "learning_rate": 0.5,
        "max_leaf_nodes": 63,
        "num_leaves": 63,
        "min_samples_leaf": 2,
        "min_child_samples": 2,
        "report_every": 5,
        "early_stopping_rounds": 20,
        "seed": 1,
    }
    with mock.patch.object(trainables, "report") as report:
        getattr(trainables, trainable)(config, data)
    calls = report.call_args_list
    progress = [c.args[0] for c in calls[:-1]]
    final, files, meta = calls[-1].args[0], calls[-1].kwargs["model_files"], calls[-1].kwargs["meta"]
    # stopped by early stopping, long before 300 rounds, 20 rounds after its best one
    assert final["iterations"] < 300 and final["iterations"] - final["best_iteration"] == 20
    assert meta["iterations"] == final["best_iteration"]
    # every report carries the best metric so far (what ASHA compares), never a worse later one
    aucs = [r["auc"] for r in progress] + [final["auc"]]
    assert aucs == sorted(aucs)
    # the saved model is the best iteration's: its validation AUC is the reported one
    if trainable.startswith("hist"):
        import skops.io as sio

        blob = files["model.skops"]
        model = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
        assert model[-1].n_iter_ == final["best_iteration"]
        prediction = model.predict_proba(data.x_valid)[:, 1]
    else:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=files["model.txt"].decode())
        assert booster.num_trees() == final["best_iteration"]
        prediction = booster.predict(pd.DataFrame(data.x_valid))
    assert roc_auc_score(data.y_valid, prediction) == pytest.approx(final["auc"], abs=1e-12)


def test_early_stopping_can_be_switched_off():
    from airflow_mlops.ml import trainables

    data = _overfitting_set()
    config = {
        "max_iter": 40,
        "learning_rate": 0.5,
        "max_leaf_nodes": 63,
        "min_samples_leaf": 2,
        "report_every": 5,
        "early_stopping_rounds": 0,
    }
    with mock.patch.object(trainables, "report") as report:
        trainables.hist_gradient_boosting_classifier(config, data)
    final = report.call_args_list[-1].args[0]
    assert final["iterations"] == 40 and len(report.call_args_list) == 8


@pytest.mark.parametrize(
    "trainable",
    [
        "hist_gradient_boosting_classifier",
        "lightgbm_classifier",
        "logistic_regression",
        "random_forest_classifier",
    ],
)
def test_classifiers_train_multiclass_models_scored_by_macro_f1(trainable, tmp_path):
    import json

    import numpy as np
    import pandas as pd
    from sklearn.metrics import f1_score

    from airflow_mlops.ml import trainables
    from airflow_mlops.ml.dataset import build_training_set
    from airflow_mlops.ml.model_io import load_model_dir

    rng = np.random.default_rng(5)
    n = 900
    frame = pd.DataFrame({"t": pd.date_range("2013-01-01", periods=n, freq="h"), "x": rng.normal(size=n)})
    frame["kind"] = rng.choice(["a", "b"], size=n)
    frame["y"] = np.select([frame["x"] < -0.4, frame["x"] < 0.4], ["low", "mid"], "high")
    data = build_training_set(
        frame, label="y", task="any", time_column="t", allowed_tasks=("binary", "multiclass")
    )
    assert data.task == "multiclass" and data.classes == ["high", "low", "mid"]
    config = {"num_boost_round": 30, "max_iter": 30, "n_estimators": 20, "report_every": 10, "seed": 1}
    with mock.patch.object(trainables, "report") as report:
        getattr(trainables, trainable)(config, data)
    last = report.call_args_list[-1]
    final, files, meta = last.args[0], last.kwargs["model_files"], last.kwargs["meta"]
    assert "auc" not in final and final["macro_f1"] > 0.8
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    predictor = load_model_dir(tmp_path)
    proba = predictor.predict(data.x_valid)
    assert predictor.classes == ["high", "low", "mid"] and proba.shape == (len(data.y_valid), 3)
    assert f1_score(data.y_valid, proba.argmax(axis=1), average="macro") == pytest.approx(final["macro_f1"])
