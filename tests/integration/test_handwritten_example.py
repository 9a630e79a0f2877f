"""The hand-written example DAGs (``tests/lifecycle/handwritten/``), the ones ``docs/operators.md``
quotes, parse without import errors and the Seattle rain lifecycle among them runs through Airflow.

Twenty weeks of Seattle's real daily weather of 2012 (``vega_datasets``) land as weekly batches; the DAGs
of ``example_seattle_rain.py`` run with ``dag.test()``: ingest per week, features once over all the
days, train with Ray Tune on the session's Ray cluster (2 trials), then one monitor run: drift of the
last four weeks against the promoted model's training snapshot, and its AUC on them against its
holdout. Of ``example_operations.py`` the backfill and the serve DAG run (the model then answers over
HTTP, its features from the online store); the rollback DAG is parsed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from mlops_testing import ROOT, asset_events, run_python, seattle_weather
from mlops_testing import land_seattle_week as land_week
from mlops_testing import task_states as states
from mlops_testing import task_xcom as xcom
from mlops_testing import utc_midnight as at

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "tests" / "lifecycle" / "handwritten"
FIRST_WEEK = date(2012, 1, 1)
WEEKS = 20  # 2012-01-01 .. 2012-05-19
LAST_DAY = FIRST_WEEK + timedelta(weeks=WEEKS, days=-1)
DATA_END = FIRST_WEEK + timedelta(weeks=WEEKS)  # 2012-05-20
HEAVY = ["ray", "feast", "great_expectations", "evidently", "bentoml", "sklearn", "lightgbm", "pandas"]
DAG_IDS = {
    "example_seattle_rain.py": [
        "example_seattle_rain_features",
        "example_seattle_rain_ingest",
        "example_seattle_rain_monitor",
        "example_seattle_rain_train",
    ],
    "example_operations.py": [
        "example_seattle_rain_approval",
        "example_seattle_rain_batch_scoring",
        "example_seattle_rain_operate",
        "example_seattle_rain_rollback",
        "example_seattle_rain_serve",
        "example_seattle_rain_shadow",
        "example_seattle_rain_shared_endpoint",
        "example_seattle_weather_history",
    ],
}


@dataclass
class Runs:
    state: Path
    ingest: dict[date, Any]
    features: Any
    train: Any
    monitor: Any
    scoring: Any
    history: Any
    serve: Any

    def offline(self, *parts: str) -> Path:
        return self.state.joinpath("offline", *parts)


@pytest.fixture(scope="module")
def runs(airflow_db, ray_cluster) -> Runs:
    from airflow.dag_processing.dagbag import DagBag

    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.net import free_port
    from airflow_mlops.operators.serving import LocalDeploymentTarget

    state = Path(os.environ["AIRFLOW__MLOPS__STATE_DIR"]) / "handwritten-example"
    shutil.rmtree(state, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
        for key in ("MLOPS_FEAST_DIR", "MLOPS_OFFLINE_ROOT", "MLOPS_STATE_DIR"):
            mp.delenv(key, raising=False)
        # dag.test() writes the DAGs to the metadata database from their bundle: the examples' folder
        bundle = {
            "name": "handwritten-examples",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        }
        mp.setenv(
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST",
            json.dumps([{**bundle, "kwargs": {"path": str(EXAMPLES)}}]),
        )
        bag = DagBag(dag_folder=str(EXAMPLES))
        assert bag.import_errors == {}

        weather = seattle_weather()
        landing = state / "landing"
        for week in range(WEEKS):
            land_week(weather, landing, FIRST_WEEK + timedelta(weeks=week))
        history = landing / "seattle" / "history" / "weather.parquet"
        history.parent.mkdir(parents=True)
        weather.to_parquet(history, index=False)

        ingest = bag.get_dag("example_seattle_rain_ingest")
        ingest.get_task("wait_for_batch").timeout = 60  # a batch that never comes fails fast
        weeks = {}
        for week in range(WEEKS):
            first = FIRST_WEEK + timedelta(weeks=week)
            weeks[first] = ingest.test(logical_date=at(first + timedelta(days=7)))
        features = bag.get_dag("example_seattle_rain_features").test(
            run_conf={"day": FIRST_WEEK.isoformat(), "last_day": LAST_DAY.isoformat()}
        )
        train_dag = bag.get_dag("example_seattle_rain_train")
        train_dag.get_task("tune").num_samples = 2  # the example's 4 trials, halved for the test
        # by hand: the DAG's default params, training 2012-01-08 .. 04-14 and holdout 04-15 .. 05-19
        train = train_dag.test(logical_date=at(DATA_END))
        monitor = bag.get_dag("example_seattle_rain_monitor").test(logical_date=at(DATA_END))
        scoring_dag = bag.get_dag("example_seattle_rain_batch_scoring")
        # the monitor's 28 days instead of the example's week, with the label, to compare the two
        scoring_dag.get_task("score_week").window_days = 28
        scoring_dag.get_task("score_week").carry_columns += ["rain"]
        scoring = scoring_dag.test(logical_date=at(DATA_END))
        backfill = bag.get_dag("example_seattle_weather_history").test()
        serve_dag = bag.get_dag("example_seattle_rain_serve")
        serve_dag.get_task("deploy").port = free_port()  # the example's port may be taken on this machine
        try:
            serve = serve_dag.test()
            yield Runs(
                state=state,
                ingest=weeks,
                features=features,
                train=train,
                monitor=monitor,
                scoring=scoring,
                history=backfill,
                serve=serve,
            )
        finally:
            LocalDeploymentTarget(BentoMLHook()).teardown("seattle_rain")


# ------------------------------------------------------------------------------------------ parsing
def test_the_example_files_parse_into_their_dags_without_heavy_imports():
    code = f"""
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(EXAMPLES)!r})
assert not bag.import_errors, bag.import_errors
import json, pathlib
print("@@" + json.dumps({{name: sorted(d for d, dag in bag.dags.items() if pathlib.Path(dag.fileloc).name == name)
                          for name in {sorted(DAG_IDS)!r}}}))
import sys
print("@@" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    dags, heavy = [json.loads(line[2:]) for line in result.stdout.splitlines() if line.startswith("@@")]
    assert dags == DAG_IDS
    assert heavy == []  # the scheduler parses DAG files often: no ML library at parse time


# ------------------------------------------------------------------------------------------ ingest
def test_each_week_is_validated_and_published_as_daily_partitions(runs):
    import pandas as pd

    for first, dag_run in runs.ingest.items():
        assert dag_run.state == "success", (first, states(dag_run))
        summary = xcom(dag_run, "validate_batch")
        assert (summary["success"], summary["rows"], summary["failed"]) == (True, 7, 0)
    days = sorted(p.name for p in runs.offline("seattle_weather").iterdir())
    assert days == [f"date={d.date().isoformat()}" for d in pd.date_range(FIRST_WEEK, LAST_DAY)]
    published = pd.read_parquet(runs.offline("seattle_weather", "date=2012-03-04", "part-0.parquet"))
    weather = seattle_weather()
    expected = weather[weather["date"] == pd.Timestamp("2012-03-04", tz="UTC")].reset_index(drop=True)
    pd.testing.assert_frame_equal(published, expected, check_dtype=False)

    last = runs.ingest[FIRST_WEEK + timedelta(weeks=WEEKS - 1)]
    events = [e for e in asset_events("seattle_weather_offline") if e["run_id"] == last.run_id]
    assert [e["extra"]["partitions"] for e in events] == [
        [f"date={(DATA_END - timedelta(days=7 - k)).isoformat()}" for k in range(7)]
    ]


# ------------------------------------------------------------------------------------------ features
def test_the_features_run_writes_and_materializes_every_day(runs):
    from airflow_mlops.hooks.feast import FeastHook

    dag_run = runs.features
    assert dag_run.state == "success", states(dag_run)
    days = (LAST_DAY - FIRST_WEEK).days + 1
    assert xcom(dag_run, "daily_features")["rows"] == days
    weather = seattle_weather()
    in_range = weather[(weather["date"].dt.date >= FIRST_WEEK) & (weather["date"].dt.date <= LAST_DAY)]
    labelled = xcom(dag_run, "labelled_days")
    assert (labelled["rows"], labelled["positive"]) == (days, int((in_range["precipitation"] > 0).sum()))
    # (the fixture's environment holds while the module's tests run: its state folder)
    repo = ROOT / "tests" / "lifecycle" / "seattle" / "feature_repo"
    online = FeastHook(repo_path=str(repo)).online_features("rain_model", [{"station": "SEA"}])
    last = weather[weather["date"].dt.date == LAST_DAY].iloc[0]
    assert online["seattle_daily__temp_max"] == [pytest.approx(float(last["temp_max"]))]
    assert online["seattle_daily__as_of"] == [at(DATA_END)]


# ------------------------------------------------------------------------------------------ train
def test_the_train_dag_registers_and_promotes_the_tuned_model(runs):
    from airflow_mlops.hooks.bentoml import BentoMLHook

    dag_run = runs.train
    assert dag_run.state == "success", states(dag_run)
    training, holdout = xcom(dag_run, "training_set"), xcom(dag_run, "holdout_set")
    assert (training["rows"], holdout["rows"]) == (98, 35)
    assert training["time_range"]["end"] < holdout["time_range"]["start"]

    tune = xcom(dag_run, "tune")
    assert tune["counts"]["trials"] == 2
    assert 0.5 < tune["best_metric"] <= 1

    version = xcom(dag_run, "register")["version"]
    promotion = xcom(dag_run, "promote")
    assert promotion["promoted"], promotion["reason"]  # the first model: the floor decides
    index = BentoMLHook().read_index("seattle_rain")
    assert index["production"] == version
    record = index["versions"][version]
    assert record["metrics"]["auc"] == pytest.approx(tune["best_metric"])
    assert record["training_manifest"]["uri"] == training["manifest_uri"]
    assert [h["action"] for h in index["history"]] == ["register", "promote"]
    baseline = xcom(dag_run, "drift_baseline")
    assert (baseline["version"], baseline["rows"]) == (version, 98)


# ------------------------------------------------------------------------------------------ monitor
def test_batch_scoring_gives_the_production_models_answers_the_monitor_scored(runs):
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from airflow_mlops.hooks.bentoml import BentoMLHook

    dag_run = runs.scoring
    assert dag_run.state == "success", states(dag_run)
    result = xcom(dag_run, "score_week")
    production = BentoMLHook().production_version("seattle_rain")
    days = [(LAST_DAY - timedelta(days=27 - k)).isoformat() for k in range(28)]
    assert (result["version"], result["rows"], result["days"]) == (production, 28, days)
    table = pd.concat(
        pd.read_parquet(runs.offline("seattle_rain_predictions", f"date={d}", "part-0.parquet")) for d in days
    )
    assert set(table["model_version"]) == {production} and table["probability"].between(0, 1).all()
    # the rain model's store features were joined point in time, as the monitor joins them: same AUC
    monitored = xcom(runs.monitor, "drift")["quality"]["auc"]
    assert roc_auc_score(table["rain"].astype(int), table["probability"]) == pytest.approx(monitored)


def test_the_monitor_finds_the_spring_drift_against_the_production_model(runs):
    dag_run = runs.monitor
    assert dag_run.state == "success", states(dag_run)
    result = xcom(dag_run, "drift")
    assert result["window"] == {
        "start": (LAST_DAY - timedelta(days=27)).isoformat(),
        "end": LAST_DAY.isoformat(),
        "rows": 28,
        "source": "offline_store",
    }
    assert result["reference"]["rows"] == 98  # the promoted model's training snapshot, January to mid-April
    assert sorted(result["columns"]) == ["precipitation", "temp_max", "temp_min", "weather", "wind"]
    # May is warmer and drier than the winter the model learnt from
    assert result["drift_detected"] and {"temp_max", "temp_min"} <= set(result["drifted_columns"])
    # quality: the production model's AUC on the window's labelled days against its holdout AUC
    weather = seattle_weather()
    days = weather[
        (weather["date"].dt.date > LAST_DAY - timedelta(days=28)) & (weather["date"].dt.date <= LAST_DAY)
    ]
    quality = result["quality"]
    assert (quality["labelled_rows"], quality["unlabelled_rows"]) == (28, 0)
    rainy = int((days["precipitation"] > 0).sum())
    assert quality["labels"]["rows_per_class"] == {"0": 28 - rainy, "1": rainy}
    assert quality["holdout_auc"] == pytest.approx(xcom(runs.train, "promote")["candidate_score"])
    assert 0.5 < quality["auc"] <= 1  # still better than chance on the new days
    assert quality["auc_decay"] == pytest.approx(quality["holdout_auc"] - quality["auc"])
    assert (quality["metric"], quality["decay"]) == ("auc", pytest.approx(quality["auc_decay"]))
    assert result["decay_detected"] is (quality["decay"] > 0.1)  # the example's max_decay
    # nothing was served in 2012: no prediction to compare (the serve DAG runs after the monitor)
    assert result["prediction_drift"]["rows"] == 0
    assert "temp_max" in Path(result["report_uri"].removeprefix("file://")).read_text()
    events = [e for e in asset_events("seattle_rain_drift") if e["run_id"] == dag_run.run_id]
    # the event that starts example_seattle_rain_train, with the data time a retraining moves its windows to
    assert [(e["extra"]["data_time"], e["extra"]["drift_detected"]) for e in events] == [
        (LAST_DAY.isoformat(), True)
    ]


# ------------------------------------------------------------------------------------------ backfill
def test_the_backfill_publishes_the_history_as_a_feast_source(runs):
    import pandas as pd

    assert runs.history.state == "success", states(runs.history)
    table = pd.read_parquet(runs.offline("seattle_weather_history", "part-0.parquet"))
    weather = seattle_weather()
    assert len(table) == len(weather) == 1461  # 2012-01-01 .. 2015-12-31
    assert (table["event_timestamp"] == table["date"]).all()
    assert xcom(runs.history, "weather_history")["rows"] == 1461


# ------------------------------------------------------------------------------------------ serving
def test_the_served_model_answers_with_features_from_the_online_store(runs):
    import httpx

    from airflow_mlops.hooks.bentoml import BentoMLHook

    assert runs.serve.state == "success", states(runs.serve)
    production = BentoMLHook().read_index("seattle_rain")["production"]
    deployed = xcom(runs.serve, "deploy")
    assert (deployed["version"], xcom(runs.serve, "build")["version"]) == (production, production)
    with httpx.Client(base_url=deployed["url"], timeout=30) as client:
        # the request holds the entity key and the request feature; the station's weather comes from Feast
        answer = client.post("/predict", json={"row": {"station": "SEA", "day_of_year": 141}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["model_version"]) == ("seattle_rain", production)
        assert 0 <= body["probability"] <= 1
        missing = client.post("/predict", json={"row": {"day_of_year": 141}})
    assert missing.status_code == 400 and "station" in missing.text
