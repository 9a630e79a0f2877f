"""Any tabular model, from spec to a live endpoint: three models of three task types on one real table,
each run through ingest -> features -> train -> live endpoint answering over HTTP -> monitor, with no code
of their own in ``airflow_mlops``.

The data is real and ships in a PyPI package: Seattle's daily weather 2012-2015 from ``vega_datasets``
(``seattle-weather.csv``). Everything model-specific lives in ``tests/lifecycle/seattle/``: three specs, one
expectation suite, one Feast repository and the feature steps (plain functions named by ``callable:``):

- ``seattle.yaml``: **binary**, "will it rain on day D" (``rain``), logistic regression, AUC;
- ``seattle_sky.yaml``: **multiclass**, "what will the sky be on D" (``weather``: drizzle, fog, rain,
  snow, sun), logistic regression, macro-F1;
- ``seattle_temp.yaml``: **regression**, "how warm will D get" (``temp_max``, degrees C), ridge, RMSE.

All three predict from the weather known at the end of D-1. The expensive part is shared, as a team with
three models on one table would share it: twenty weeks of 2012 land as weekly batches, the rain spec's
ingest DAG runs per week (and a bad week ends in quarantine), its features DAG runs once over all the days
(feature tables, ``feast apply``, materialization). Then each spec's train DAG runs through Airflow
(``dag.test``): Ray Tune on the session's Ray cluster, registration with the model's signature, the
promotion gate, a Bento build and a blue/green deploy to a live ``bentoml serve``, and real holdout rows
sent to it; then each spec's monitor DAG: data drift, quality decay with the task's metric where labels
have arrived, prediction drift of the served predictions. The servers are stopped when the module ends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from mlops_testing import asset_events, seattle_weather
from mlops_testing import land_seattle_week as land_week
from mlops_testing import task_states as states
from mlops_testing import task_xcom as xcom
from mlops_testing import utc_midnight as at

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEATTLE = ROOT / "tests" / "lifecycle" / "seattle"
SPECS = {
    "binary": SEATTLE / "seattle.yaml",
    "multiclass": SEATTLE / "seattle_sky.yaml",
    "regression": SEATTLE / "seattle_temp.yaml",
}
MODELS = {"binary": "seattle_rain", "multiclass": "seattle_sky", "regression": "seattle_temp"}
PREFIXES = {"binary": "seattle", "multiclass": "seattle_sky", "regression": "seattle_temp"}
LABELS = {"binary": "rain", "multiclass": "weather", "regression": "temp_max"}
METRICS = {"binary": "auc", "multiclass": "macro_f1", "regression": "rmse"}
TASKS = list(SPECS)
FIRST_WEEK = date(2012, 1, 1)
WEEKS = 20  # 2012-01-01 .. 2012-05-19: training 01-08 .. 04-14, holdout 04-15 .. 05-19
BAD_WEEK = FIRST_WEEK + timedelta(weeks=WEEKS)  # 2012-05-20: one day with temp_min > temp_max
LAST_DAY = FIRST_WEEK + timedelta(weeks=WEEKS, days=-1)
TRAIN_CONF = {"train_start": "2012-01-08", "holdout_start": "2012-04-15", "holdout_end": "2012-05-20"}
#: the classes of the sky model: the weather of the training days (fog first shows in July 2012)
SKY_CLASSES = ["drizzle", "rain", "snow", "sun"]
SAMPLE_ROWS = 20
#: the DAG folder of a team with three models on one table: the rain spec's four DAGs, and only the
#: train and monitor DAGs of the two specs that share its ingest and features
DAG_FILE = """from airflow_mlops.lifecycle import lifecycle_dags

globals().update(lifecycle_dags({rain!r}))
for spec in ({sky!r}, {temp!r}):
    globals().update({{k: v for k, v in lifecycle_dags(spec).items() if k.endswith(("_train", "_monitor", "_operate"))}})
"""


def logged_predictions(model: str) -> list[dict[str, Any]]:
    """Every record of ``model``'s prediction log (all days)."""
    from airflow_mlops.artifacts import as_path
    from airflow_mlops.ml.prediction_log import log_root, read_records

    root = log_root(model)
    folder = as_path(root)
    days = sorted(p.name.removeprefix("date=") for p in folder.iterdir()) if folder.exists() else []
    return read_records(root, days)


def wait_for_log(model: str, rows: int, timeout: float = 60) -> None:
    """Wait until the service has flushed ``rows`` predictions of ``model`` to its log."""
    deadline = time.monotonic() + timeout
    while len(logged_predictions(model)) < rows:
        assert time.monotonic() < deadline, f"{model}: fewer than {rows} predictions logged in {timeout}s"
        time.sleep(1)


def served_traffic(model: str) -> dict[str, Any]:
    """The monitor's drift operator over the traffic the endpoint served today (``source="prediction_log"``).

    The service stamps each prediction with the wall clock, while the monitor DAG above replays 2012: its
    window holds no served prediction. Live, data time and wall clock are the same days.
    """
    from types import SimpleNamespace

    from airflow_mlops.operators.drift import EvidentlyDriftOperator

    today = datetime.now(UTC).date()
    context = {
        "ti": SimpleNamespace(
            dag_id="seattle_traffic", run_id=f"traffic-{model}", task_id="drift", xcom_push=lambda **_: None
        ),
        "run_id": f"traffic-{model}",
        "outlet_events": {},
    }
    return EvidentlyDriftOperator(
        task_id="drift",
        model_name=model,
        source="prediction_log",
        window_end=today.isoformat(),
        window_days=2,  # a run across midnight UTC
        columns={"day_of_year": {"kind": "numerical"}},
        prediction_drift=True,
    ).execute(context)


@dataclass
class Model:
    task: str
    train: Any
    monitor: Any
    url: str
    deployment: dict[str, Any]
    traffic: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return MODELS[self.task]


@dataclass
class Lifecycle:
    state: Path
    ingest: dict[date, Any]
    bad_batch: bytes
    features: Any
    models: dict[str, Model] = field(default_factory=dict)

    def offline(self, *parts: str) -> Path:
        return self.state.joinpath("offline", *parts)


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory) -> Path:
    """A DAG folder holding one DAG file over the three Seattle specs."""
    folder = tmp_path_factory.mktemp("seattle-dags")
    text = DAG_FILE.format(
        rain=str(SPECS["binary"]), sky=str(SPECS["multiclass"]), temp=str(SPECS["regression"])
    )
    (folder / "seattle_lifecycle.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def lifecycle(airflow_db, ray_cluster, dags_folder) -> Lifecycle:
    import pandas as pd

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.lifecycle import lifecycle_dags
    from airflow_mlops.net import free_port
    from airflow_mlops.operators.serving import LocalDeploymentTarget

    state = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "seattle-lifecycle"
    shutil.rmtree(state, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
        for key in ("MLOPS_FEAST_DIR", "MLOPS_OFFLINE_ROOT", "MLOPS_STATE_DIR"):
            mp.delenv(key, raising=False)
        # dag.test() writes the DAGs to the metadata database from their bundle: this folder only
        bundle = {
            "name": "seattle-lifecycle",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        }
        mp.setenv(
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST",
            json.dumps([{**bundle, "kwargs": {"path": str(dags_folder)}}]),
        )
        # nothing is put on sys.path: the factory finds the feature steps (seattle_features.py) next to the spec

        weather = seattle_weather()
        landing = state / "landing"
        for week in range(WEEKS):
            land_week(weather, landing, FIRST_WEEK + timedelta(weeks=week))
        bad = land_week(weather, landing, BAD_WEEK)
        frame = pd.read_parquet(bad)
        frame.loc[2, "temp_min"] = frame.loc[2, "temp_max"] + 4.0  # a day colder at its warmest
        frame.to_parquet(bad, index=False)
        bad_batch = bad.read_bytes()

        # ports of our own: other suites (and other test sessions on the machine) serve on the spec's ones
        dags = {
            task: lifecycle_dags(spec, {"serving": {"port": free_port()}}) for task, spec in SPECS.items()
        }
        rain = dags["binary"]
        ingest = rain["seattle_ingest"]
        ingest.get_task("wait_for_batch").timeout = 60  # a batch that never comes fails fast
        runs = {}
        for week in [*range(WEEKS), WEEKS]:
            first = FIRST_WEEK + timedelta(weeks=week)
            runs[first] = ingest.test(logical_date=at(first + timedelta(days=7)))
        features = rain["seattle_features"].test(
            run_conf={"day": FIRST_WEEK.isoformat(), "last_day": LAST_DAY.isoformat()}
        )
        result = Lifecycle(state=state, ingest=runs, bad_batch=bad_batch, features=features)
        target = LocalDeploymentTarget(BentoMLHook())
        try:
            for task in TASKS:
                prefix = PREFIXES[task]
                train = dags[task][f"{prefix}_train"].test(logical_date=at(BAD_WEEK), run_conf=TRAIN_CONF)
                deployment = target.read_state(MODELS[task])
                if train.state == "success":
                    # the served-traffic check reads the prediction log: wait for the service to flush it
                    wait_for_log(MODELS[task], SAMPLE_ROWS)
                monitor = dags[task][f"{prefix}_monitor"].test(
                    logical_date=at(BAD_WEEK), run_conf={"window_days": 28}
                )
                router = deployment.get("router") or {}
                result.models[task] = Model(
                    task=task, train=train, monitor=monitor, url=router.get("url", ""), deployment=deployment
                )
                if train.state == "success":
                    result.models[task].traffic = served_traffic(MODELS[task])
            yield result
        finally:
            import psutil

            pids = []
            for task in TASKS:
                deployed = target.read_state(MODELS[task])
                pids += [(deployed.get(k) or {}).get("pid") for k in ("router", "active", "pending")]
                target.teardown(MODELS[task])
            alive = [p for p in pids if p and psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            assert not alive, f"model servers left running: {alive}"


def index_of(task: str) -> dict[str, Any]:
    """The registry's index of the task's model (the module's state folder is set while its tests run)."""
    from airflow_mlops.hooks.bentoml import BentoMLHook

    return BentoMLHook().read_index(MODELS[task])


# ------------------------------------------------------------------------------------------ ingest
def test_good_weeks_are_validated_and_published_as_daily_partitions(lifecycle):
    import pandas as pd

    weather = seattle_weather()
    for first in (FIRST_WEEK + timedelta(weeks=w) for w in range(WEEKS)):
        dag_run = lifecycle.ingest[first]
        assert states(dag_run) == dict.fromkeys(
            ("wait_for_batch", "validate_batch", "publish_to_offline_store"), "success"
        ), first
        summary = xcom(dag_run, "validate_batch")
        assert (summary["success"], summary["rows"], summary["failed"]) == (True, 7, 0)
    days = sorted(p.name for p in lifecycle.offline("seattle_weather").iterdir())
    assert days == [f"date={d.date().isoformat()}" for d in pd.date_range(FIRST_WEEK, LAST_DAY)]
    published = pd.read_parquet(lifecycle.offline("seattle_weather", "date=2012-03-04", "part-0.parquet"))
    expected = weather[weather["date"] == pd.Timestamp("2012-03-04", tz="UTC")].reset_index(drop=True)
    pd.testing.assert_frame_equal(published, expected, check_dtype=False)

    last = lifecycle.ingest[BAD_WEEK - timedelta(weeks=1)]
    events = [e for e in asset_events("seattle_weather_offline") if e["run_id"] == last.run_id]
    assert [e["extra"]["partitions"] for e in events] == [
        [f"date={(BAD_WEEK - timedelta(days=7 - k)).isoformat()}" for k in range(7)]
    ]


def test_a_bad_week_is_quarantined_with_the_failed_expectation_named(lifecycle):
    dag_run = lifecycle.ingest[BAD_WEEK]
    assert dag_run.state == "failed"
    assert states(dag_run) == {
        "wait_for_batch": "success",
        "validate_batch": "failed",
        "publish_to_offline_store": "upstream_failed",
    }
    assert not lifecycle.offline("seattle_weather", f"date={BAD_WEEK.isoformat()}").exists()
    assert not [e for e in asset_events("seattle_weather_offline") if e["run_id"] == dag_run.run_id]
    landed = lifecycle.state / "landing" / "seattle" / f"week={BAD_WEEK.isoformat()}" / "weather.parquet"
    assert not landed.exists()
    quarantined = lifecycle.state / "quarantine" / "seattle" / f"week={BAD_WEEK.isoformat()}"
    assert (quarantined / "weather.parquet").read_bytes() == lifecycle.bad_batch
    beside = json.loads((quarantined / "weather.parquet.validation.json").read_text())
    assert [(f["expectation"], f["column"]) for f in beside["failed_expectations"]] == [
        ("expect_column_pair_values_a_to_be_greater_than_b", "temp_max")
    ]
    assert beside["failed_expectations"][0]["observed"]["unexpected_count"] == 1
    # the Data Docs page of the failed validation is kept for the user to read
    assert Path(beside["docs_uri"].removeprefix("file://")).read_text().startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------------------------------ features
def test_the_features_run_writes_the_days_and_materializes_them(lifecycle):
    import pandas as pd

    from airflow_mlops.hooks.feast import FeastHook

    dag_run = lifecycle.features
    assert dag_run.state == "success", states(dag_run)
    days = (LAST_DAY - FIRST_WEEK).days + 1
    assert xcom(dag_run, "daily_features")["rows"] == days
    labelled = xcom(dag_run, "labelled_days")
    assert (labelled["rows"], labelled["positive"]) == (days, 84)  # 84 of the 140 days had rain
    # one entity row per day holds the three models' labels: rain (0/1), weather (class), temp_max (C)
    row = pd.read_parquet(lifecycle.offline("seattle_labelled", "date=2012-03-04", "part-0.parquet"))
    weather = seattle_weather()
    observed = weather[weather["date"] == pd.Timestamp("2012-03-04", tz="UTC")].iloc[0]
    assert (row["rain"].item(), row["weather"].item(), row["temp_max"].item()) == (
        int(observed["precipitation"] > 0),
        observed["weather"],
        observed["temp_max"],
    )

    # the online store holds the features of the last day, known at the midnight that ended it
    online = FeastHook(repo_path=str(SEATTLE / "feature_repo")).online_features(
        "rain_model", [{"station": "SEA"}]
    )
    assert online["seattle_daily__temp_max"] == [pytest.approx(19.4)]  # 2012-05-19
    assert online["seattle_daily__as_of"] == [datetime(2012, 5, 20, tzinfo=UTC)]
    # its own registry and online store, beside (not instead of) the flights repository's files
    assert sorted(p.name for p in (lifecycle.state / "feast").glob("seattle_*.db")) == [
        "seattle_online_store.db",
        "seattle_registry.db",
    ]
    assert not (lifecycle.state / "feast" / "online_store.db").exists()
    events = [e for e in asset_events("feast_seattle_daily") if e["run_id"] == dag_run.run_id]
    assert [e["extra"]["rows"] for e in events] == [1]


# ------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("task", TASKS)
def test_the_train_dag_registers_the_model_with_its_task_metric_and_signature(lifecycle, task):
    model = lifecycle.models[task]
    dag_run = model.train
    assert dag_run.state == "success", states(dag_run)

    training, holdout = xcom(dag_run, "training_set"), xcom(dag_run, "holdout_set")
    assert (training["rows"], holdout["rows"]) == (98, 35)
    assert training["time_range"]["end"] < holdout["time_range"]["start"]
    assert "seattle_daily:rain_days_7d" in training["feature_refs"]

    metric = METRICS[task]
    tune = xcom(dag_run, "tune")
    assert tune["counts"]["trials"] >= 3
    version = xcom(dag_run, "register")["version"]
    promotion = xcom(dag_run, "promote")
    assert promotion["promoted"], promotion["reason"]  # the first model: the floor decides
    index = index_of(task)
    assert index["production"] == version
    record = index["versions"][version]
    assert record["metrics"][metric] == pytest.approx(tune["best_metric"])
    assert record["training_manifest"]["uri"] == training["manifest_uri"]

    signature = record["signature"]
    assert (signature["task"], signature["label"]) == (task, LABELS[task])
    assert signature["feature_service"] == {"binary": "rain_model", "multiclass": "sky_model"}.get(
        task, "temp_model"
    )
    assert signature["classes"] == {"binary": [0, 1], "multiclass": SKY_CLASSES, "regression": []}[task]
    # a request names the station (looked up in the online store) and the day of the year; the weather
    # of the days before comes from the feature service, and no observation of the day itself is a feature
    assert [f["name"] for f in signature["entity_keys"]] == ["station"]
    assert [f["name"] for f in signature["request_features"]] == ["day_of_year"]
    assert not {"weather", "temp_max", "precipitation", "rain"} & set(signature["features"])


@pytest.mark.parametrize("task", TASKS)
def test_the_gate_scores_the_holdout_with_the_tasks_metric(lifecycle, task):
    """The figure the gate compared is the task's metric of the model on the holdout days: a probability
    ranking (AUC), classes (macro-F1 over the model's classes), degrees (RMSE); the floor is the spec's."""
    promotion = xcom(lifecycle.models[task].train, "promote")
    assert promotion["metric"] == METRICS[task]
    assert promotion["candidate_score"] == pytest.approx(holdout_score(lifecycle, task), rel=1e-6)
    index = index_of(task)
    decision = index["versions"][index["production"]]["decisions"][-1]
    assert (decision["metric"], decision["task"]) == (METRICS[task], task)
    assert decision["floor"] == {"binary": 0.5, "multiclass": None, "regression": 5.0}[task]
    if task == "regression":
        assert 0 < promotion["candidate_score"] < 5.0  # degrees C; below the floor (a ceiling for RMSE)
    else:
        assert 0 < promotion["candidate_score"] <= 1


# ------------------------------------------------------------------------------------------ serving
def _answer_shape(task: str, answer: dict[str, Any]) -> None:
    if task == "binary":
        assert 0 <= answer["probability"] <= 1
        assert answer["label"] == (1 if answer["probability"] >= 0.5 else 0)
    elif task == "multiclass":
        assert sorted(answer["probabilities"]) == SKY_CLASSES
        assert sum(answer["probabilities"].values()) == pytest.approx(1)
        assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
    else:
        assert math.isfinite(answer["value"]) and -10 < answer["value"] < 40  # degrees C in spring


@pytest.mark.parametrize("task", TASKS)
def test_the_train_dag_sends_real_holdout_rows_to_the_live_endpoint(lifecycle, task):
    model = lifecycle.models[task]
    version = xcom(model.train, "register")["version"]
    deploy = xcom(model.train, "deploy")
    assert deploy["url"] == model.url and model.url.startswith("http://127.0.0.1:")
    sample = xcom(model.train, "sample_predictions")
    assert sample["requests"] == SAMPLE_ROWS and sample["versions"] == [version]
    for answer in sample["answers"]:
        _answer_shape(task, answer)
    values = [
        json.dumps({k: answer[k] for k in ("probability", "probabilities", "value") if k in answer})
        for answer in sample["answers"]
    ]
    assert len(set(values)) > 1  # the rows differ, so do the answers


@pytest.mark.parametrize("task", TASKS)
def test_the_endpoint_answers_over_http_with_its_task_shape(lifecycle, task):
    import httpx

    model = lifecycle.models[task]
    version = index_of(task)["production"]
    with httpx.Client(base_url=model.url, timeout=30) as client:
        answer = client.post("/predict", json={"row": {"station": "SEA", "day_of_year": 141}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["model_version"]) == (model.name, version)
        _answer_shape(task, body)
        fields = {"binary": {"probability", "label"}, "multiclass": {"label", "probabilities"}}
        assert set(body) == fields.get(task, {"value"}) | {"model", "model_version"}

        # a value of the wrong type is refused with a 4xx that names the field
        bad = client.post("/predict", json={"row": {"station": "SEA", "day_of_year": "late May"}})
        assert 400 <= bad.status_code < 500 and "day_of_year" in bad.text
        missing = client.post("/predict", json={"row": {"day_of_year": 141}})
        assert 400 <= missing.status_code < 500 and "station" in missing.text


@pytest.mark.parametrize("task", TASKS)
def test_the_openapi_document_shows_the_models_own_fields(lifecycle, task):
    import httpx

    document = httpx.get(lifecycle.models[task].url + "/docs.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    text = json.dumps(schemas)
    request = next(s for s in schemas.values() if {"station", "day_of_year"} <= set(s.get("properties", {})))
    assert set(request["required"]) >= {"station", "day_of_year"}
    assert request["properties"]["day_of_year"]["type"] == "integer"
    answer_field = {"binary": "probability", "multiclass": "probabilities", "regression": "value"}[task]
    assert any(answer_field in s.get("properties", {}) for s in schemas.values())
    # nothing of the flights model is left in the document
    assert "carrier" not in text and "delay_probability" not in text


def test_the_answers_are_logged_for_the_monitor(lifecycle):
    """Each model's prediction log holds what its endpoint answered, with its version and task."""
    for task in TASKS:
        model = lifecycle.models[task]
        version = index_of(task)["production"]
        records = logged_predictions(model.name)
        sample = xcom(model.train, "sample_predictions")
        assert len(records) >= SAMPLE_ROWS
        assert {(r["model"], r["version"], r["task"]) for r in records} == {(model.name, version, task)}
        key = {"binary": "probability", "multiclass": "label", "regression": "value"}[task]
        served = sorted(json.dumps(a[key]) for a in sample["answers"])
        assert sorted(json.dumps(r["prediction"]) for r in records[:SAMPLE_ROWS]) == served


# ------------------------------------------------------------------------------------------ monitor
def test_the_monitor_finds_the_spring_drift_against_the_training_snapshot(lifecycle):
    dag_run = lifecycle.models["binary"].monitor
    assert dag_run.state == "success", states(dag_run)
    result = xcom(dag_run, "drift")
    assert result["window"] == {
        "start": "2012-04-22",
        "end": "2012-05-19",
        "rows": 28,
        "source": "offline_store",
    }
    assert result["reference"]["rows"] == 98  # the model's training snapshot, January to mid-April
    assert sorted(result["columns"]) == ["precipitation", "temp_max", "temp_min", "weather", "wind"]
    # May is warmer and drier than the winter the model learnt from
    assert result["drift_detected"] and {"temp_max", "temp_min"} <= set(result["drifted_columns"])
    report = Path(result["report_uri"].removeprefix("file://"))
    assert "temp_max" in report.read_text()
    events = [e for e in asset_events("seattle_rain_drift") if e["run_id"] == dag_run.run_id]
    assert [(e["extra"]["data_time"], e["extra"]["drift_detected"]) for e in events] == [("2012-05-19", True)]


def holdout_score(lifecycle: Lifecycle, task: str, since: str | None = None) -> float:
    """The production model's score on the holdout set the train DAG drew from Feast (from ``since`` on),
    computed here with the model loaded from the registry and the task's metric."""
    import pandas as pd

    from airflow_mlops.artifacts import as_path
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.ml.metrics import encode_labels, scores

    model = lifecycle.models[task]
    with as_path(xcom(model.train, "holdout_set")["data_uri"]).open("rb") as handle:
        rows = pd.read_parquet(handle)
    if since:
        rows = rows[rows["event_timestamp"] >= pd.Timestamp(since, tz="UTC")]
    predictor = BentoMLHook().load(model.name, index_of(task)["production"])
    prediction = predictor.predict(rows)
    y = rows[LABELS[task]]
    if task != "regression":
        y = encode_labels(y, predictor.classes)
    return scores(task, y, prediction)[METRICS[task]]


@pytest.mark.parametrize("task", TASKS)
def test_the_monitor_measures_quality_decay_with_the_tasks_metric(lifecycle, task):
    from airflow_mlops.ml.metrics import decay

    model = lifecycle.models[task]
    assert model.monitor.state == "success", states(model.monitor)
    result = xcom(model.monitor, "drift")
    quality = result["quality"]
    metric = METRICS[task]
    assert (quality["metric"], quality["task"]) == (metric, task)
    assert quality["labelled_rows"] == 28  # every day of the window has its label
    # the holdout score is the one the promotion gate measured
    holdout = xcom(model.train, "promote")["candidate_score"]
    assert quality["holdout_score"] == pytest.approx(holdout)
    # the window's score is what the production model scores on those days
    # (the window 04-22 .. 05-19 lies inside the holdout 04-15 .. 05-19)
    assert quality["score"] == pytest.approx(holdout_score(lifecycle, task, since="2012-04-22"), rel=1e-6)
    assert quality["decay"] == pytest.approx(decay(metric, holdout, quality["score"]))
    assert quality["max_decay"] == {"binary": 0.1, "multiclass": 0.1, "regression": 0.25}[task]
    assert result["decay_detected"] == (quality["decay"] > quality["max_decay"])


@pytest.mark.parametrize("task", TASKS)
def test_prediction_drift_reads_the_served_predictions(lifecycle, task):
    model = lifecycle.models[task]
    version = index_of(task)["production"]
    # the monitor DAG replays 2012: nothing was served in its window, and it says so
    replayed = xcom(model.monitor, "drift")["prediction_drift"]
    assert replayed["rows"] == 0 and "2012-04-22..2012-05-19" in replayed["reason"]
    # today's traffic: the holdout rows the train DAG sent, against the model's predictions on its holdout
    traffic = model.traffic
    assert traffic["model_version"] == version
    drift = traffic["prediction_drift"]
    assert (drift["rows"], drift["reference_rows"]) == (SAMPLE_ROWS, 35)
    assert drift["kind"] == ("categorical" if task == "multiclass" else "numerical")
    assert math.isfinite(drift["score"]) and isinstance(drift["drift_detected"], bool)
    assert Path(drift["report_uri"].removeprefix("file://")).is_file()


# ------------------------------------------------------------------------------------------ DAG folder
def test_three_specs_share_one_ingest_in_a_dag_folder_without_import_errors(dags_folder):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder))
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == [
        "seattle_features",
        "seattle_ingest",
        "seattle_monitor",
        "seattle_operate",
        "seattle_sky_monitor",
        "seattle_sky_operate",
        "seattle_sky_train",
        "seattle_temp_monitor",
        "seattle_temp_operate",
        "seattle_temp_train",
        "seattle_train",
    ]
    assert bag.get_dag("seattle_ingest").tags and "seattle" in bag.get_dag("seattle_ingest").tags


def test_the_howto_quotes_the_regression_example_as_it_is():
    """docs/howto-lifecycle.md builds its regression lifecycle from this example: every YAML and Python
    snippet it shows is a piece of the example's files, word for word."""
    import re

    doc = (ROOT / "docs" / "howto-lifecycle.md").read_text()
    sources = {
        "yaml": [SPECS["regression"], SEATTLE / "feature_repo" / "feature_store.yaml"],
        "python": [SEATTLE / "feature_repo" / "definitions.py"],
    }
    quoted = 0
    for kind, files in sources.items():
        texts = [path.read_text() for path in files]
        for block in re.findall(rf"```{kind}\n(.*?)```", doc, flags=re.DOTALL):
            if "lifecycle_dags" in block:  # the DAG files are the reader's own
                continue
            assert any(block in text for text in texts), f"not in {[f.name for f in files]}:\n{block}"
            quoted += 1
    assert quoted >= 8
