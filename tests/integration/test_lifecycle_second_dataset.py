"""Reuse proven: the lifecycle factory builds and runs a second, different model from its own spec, with
no code of its own in ``airflow_mlops``.

The data is real and ships in a PyPI package: Seattle's daily weather 2012-2015 from ``vega_datasets``
(``seattle-weather.csv``). The task is another classification, "will it rain on day D" from the weather
known at the end of D-1. Everything model-specific lives in ``tests/lifecycle/seattle/``: the spec, the
expectation suite, the Feast repository and the feature steps (plain functions named by ``callable:``).

Twenty weeks of 2012 land as weekly batches; the four DAGs built by ``lifecycle_dags()`` run through
Airflow (``dag.test``): ingest per week (and a bad week that ends in quarantine), features once over
all the days, train with Ray Tune on the session's Ray cluster (register, promotion gate, drift
baseline), then one monitor run against the model's training snapshot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEATTLE = ROOT / "tests" / "lifecycle" / "seattle"
SPEC = SEATTLE / "seattle.yaml"
FIRST_WEEK = date(2012, 1, 1)
WEEKS = 20  # 2012-01-01 .. 2012-05-19: training 01-08 .. 04-14, holdout 04-15 .. 05-19
BAD_WEEK = FIRST_WEEK + timedelta(weeks=WEEKS)  # 2012-05-20: one day with temp_min > temp_max
LAST_DAY = FIRST_WEEK + timedelta(weeks=WEEKS, days=-1)
TRAIN_CONF = {"train_start": "2012-01-08", "holdout_start": "2012-04-15", "holdout_end": "2012-05-20"}
DAG_FILE = """from airflow_mlops.lifecycle import lifecycle_dags

globals().update(lifecycle_dags({spec!r}))
"""


def seattle_weather():
    """The data set, read by file path from the installed package (its module is never imported)."""
    import pandas as pd

    spec = importlib.util.find_spec("vega_datasets")
    assert spec is not None and spec.submodule_search_locations, "vega_datasets is not installed"
    csv = Path(next(iter(spec.submodule_search_locations))) / "_data" / "seattle-weather.csv"
    frame = pd.read_csv(csv, parse_dates=["date"])
    frame["date"] = frame["date"].dt.tz_localize("UTC").astype("datetime64[us, UTC]")
    return frame


def land_week(frame, landing: Path, first: date) -> Path:
    """Land the week starting ``first`` where the spec's ingest waits for it."""
    import pandas as pd

    start = pd.Timestamp(first, tz="UTC")
    week = frame[(frame["date"] >= start) & (frame["date"] < start + pd.Timedelta(days=7))]
    target = landing / "seattle" / f"week={first.isoformat()}" / "weather.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    week.to_parquet(target, index=False)
    return target


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def xcom(dag_run, task_id: str) -> Any:
    ti = next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id)


def asset_events(name: str) -> list[dict[str, Any]]:
    """Events of the Asset ``name`` in Airflow's database, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == name)
            .order_by(AssetEvent.id)
        )
        return [{"run_id": e.source_run_id, "extra": dict(e.extra or {})} for e in events]


@dataclass
class Lifecycle:
    state: Path
    ingest: dict[date, Any]
    bad_batch: bytes
    features: Any
    train: Any
    monitor: Any

    def offline(self, *parts: str) -> Path:
        return self.state.joinpath("offline", *parts)


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory) -> Path:
    """A DAG folder holding one three-line DAG file over the Seattle spec."""
    folder = tmp_path_factory.mktemp("seattle-dags")
    (folder / "seattle_lifecycle.py").write_text(DAG_FILE.format(spec=str(SPEC)))
    return folder


@pytest.fixture(scope="module")
def lifecycle(airflow_db, ray_cluster, dags_folder) -> Lifecycle:
    import pandas as pd

    from airflow_mlops.lifecycle import lifecycle_dags

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
        mp.syspath_prepend(str(SEATTLE))  # the spec's feature steps: seattle_features.<function>

        weather = seattle_weather()
        landing = state / "landing"
        for week in range(WEEKS):
            land_week(weather, landing, FIRST_WEEK + timedelta(weeks=week))
        bad = land_week(weather, landing, BAD_WEEK)
        frame = pd.read_parquet(bad)
        frame.loc[2, "temp_min"] = frame.loc[2, "temp_max"] + 4.0  # a day colder at its warmest
        frame.to_parquet(bad, index=False)
        bad_batch = bad.read_bytes()

        dags = lifecycle_dags(SPEC)
        ingest = dags["seattle_ingest"]
        ingest.get_task("wait_for_batch").timeout = 60  # a batch that never comes fails fast
        runs = {}
        for week in [*range(WEEKS), WEEKS]:
            first = FIRST_WEEK + timedelta(weeks=week)
            runs[first] = ingest.test(logical_date=at(first + timedelta(days=7)))
        features = dags["seattle_features"].test(
            run_conf={"day": FIRST_WEEK.isoformat(), "last_day": LAST_DAY.isoformat()}
        )
        train = dags["seattle_train"].test(logical_date=at(BAD_WEEK), run_conf=TRAIN_CONF)
        # the reference: the training snapshot the model was trained on (its manifest)
        manifest = (xcom(train, "training_set") or {}).get("manifest_uri")
        monitor = dags["seattle_monitor"].test(
            logical_date=at(BAD_WEEK), run_conf={"reference_uri": manifest, "window_days": 28}
        )
        yield Lifecycle(
            state=state,
            ingest=runs,
            bad_batch=bad_batch,
            features=features,
            train=train,
            monitor=monitor,
        )


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
    from airflow_mlops.hooks.feast import FeastHook

    dag_run = lifecycle.features
    assert dag_run.state == "success", states(dag_run)
    days = (LAST_DAY - FIRST_WEEK).days + 1
    assert xcom(dag_run, "daily_features")["rows"] == days
    labelled = xcom(dag_run, "labelled_days")
    assert (labelled["rows"], labelled["positive"]) == (days, 84)  # 84 of the 140 days had rain

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
def test_the_train_dag_registers_a_model_and_the_gate_decides(lifecycle):
    from airflow_mlops.hooks.bentoml import BentoMLHook

    dag_run = lifecycle.train
    assert dag_run.state == "success", states(dag_run)
    assert "deploy" not in states(dag_run)  # serving target none: no Bento build or deploy

    training, holdout = xcom(dag_run, "training_set"), xcom(dag_run, "holdout_set")
    assert (training["rows"], holdout["rows"]) == (98, 35)
    assert training["time_range"]["end"] < holdout["time_range"]["start"]
    assert "seattle_daily:rain_days_7d" in training["feature_refs"]

    tune = xcom(dag_run, "tune")
    assert tune["counts"]["trials"] == 4
    assert 0.5 < tune["best_metric"] <= 1

    version = xcom(dag_run, "register")["version"]
    promotion = xcom(dag_run, "promote")
    assert promotion["promoted"], promotion["reason"]  # the first model: the floor (AUC 0.5) decides
    assert promotion["candidate_score"] > 0.5
    index = BentoMLHook().read_index("seattle_rain")
    assert index["production"] == version
    record = index["versions"][version]
    assert record["metrics"]["auc"] == pytest.approx(tune["best_metric"])
    assert record["training_manifest"]["uri"] == training["manifest_uri"]
    assert [h["action"] for h in index["history"]] == ["register", "promote"]


# ------------------------------------------------------------------------------------------ monitor
def test_the_monitor_finds_the_spring_drift_against_the_training_snapshot(lifecycle):
    dag_run = lifecycle.monitor
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


# ------------------------------------------------------------------------------------------ DAG folder
def test_the_spec_parses_in_a_dag_folder_without_import_errors(dags_folder):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder))
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == ["seattle_features", "seattle_ingest", "seattle_monitor", "seattle_train"]
    assert bag.get_dag("seattle_ingest").tags and "seattle" in bag.get_dag("seattle_ingest").tags
