"""EvidentlyDriftOperator on the real flights of 2013, with the real Evidently 0.7.

Reference: January-March flights joined with their origin's weather. The current windows are written
as offline-store partitions (``<offline_root>/flights/date=YYYY-MM-DD/part-0.parquet``) and joined with
the weather table at check time, as the monitor DAG does. A spring week is calm, a July week drifts
(its weather is far outside the winter reference), and only the drifted run emits the Asset event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlops_testing import ROOT

from airflow_mlops.artifacts import ArtifactStore, as_path
from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.lifecycle.spec import load_spec
from airflow_mlops.operators.drift import EvidentlyDriftOperator, emitted_drift_events

#: the flights spec's monitoring settings (dags/flights.yaml): drift columns with their methods and
#: thresholds, the drifted share, and the training snapshot's names of the weather and hour columns
_MONITORING = load_spec(ROOT / "dags" / "flights.yaml").monitoring
FLIGHTS_DRIFT_COLUMNS: dict[str, dict[str, Any]] = dict(_MONITORING.columns)  # type: ignore[arg-type]
FLIGHTS_DRIFT_SHARE = _MONITORING.drift_share
FLIGHTS_REFERENCE_COLUMNS = dict(_MONITORING.reference_columns)
#: the flights label: arrival delay above 15 minutes
FLIGHTS_LABEL_RULE: dict[str, Any] = {"column": "arr_delay", "gt": 15}

WEATHER = ["temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
SPRING = ("2013-05-01", "2013-05-07")
JULY = ("2013-07-15", "2013-07-21")


class FakeTI:
    def __init__(self, run_id: str) -> None:
        self.dag_id, self.run_id, self.task_id = "monitor", run_id, "drift"
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@pytest.fixture(scope="module")
def flights_store(tmp_path_factory) -> dict[str, str]:
    """Reference parquet (Jan-Mar with weather) and offline partitions of the spring and July weeks."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_mlops.demo.data import read_table

    root = tmp_path_factory.mktemp("drift")
    flights = read_table("flights")
    weather = read_table("weather")[["origin", "time_hour", *WEATHER]]
    day = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    reference = flights[day < "2013-04-01"].merge(weather, on=["origin", "time_hour"], how="left")
    reference_uri = root / "reference.parquet"
    reference.to_parquet(reference_uri, index=False)
    offline = root / "offline"
    for start, end in (SPRING, JULY):
        for date in pd.date_range(start, end).strftime("%Y-%m-%d"):
            part = offline / "flights" / f"date={date}" / "part-0.parquet"
            part.parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(flights[day == date], preserve_index=False), part)
    (offline / "weather").mkdir()
    weather.to_parquet(offline / "weather" / "weather.parquet", index=False)
    return {"reference_uri": f"file://{reference_uri}", "offline_root": f"file://{offline}"}


def run_check(store: dict[str, str], window_end: str, run_id: str, **kwargs: Any) -> tuple[dict, Any, FakeTI]:
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    asset = Asset(name="flight_delay_drift", uri="mlops://models/flight_delay/drift")
    op = EvidentlyDriftOperator(
        task_id="drift",
        model_name="flight_delay",
        reference_uri=store["reference_uri"],
        offline_root=store["offline_root"],
        table="flights",
        joins=[{"uri": "weather/weather.parquet", "on": ["origin", "time_hour"], "columns": WEATHER}],
        columns=FLIGHTS_DRIFT_COLUMNS,
        drift_share=FLIGHTS_DRIFT_SHARE,
        window_end=window_end,
        window_days=7,
        drift_asset=asset,
        **kwargs,
    )
    ti = FakeTI(run_id)
    events = OutletEventAccessors()
    result = op.execute({"ti": ti, "outlet_events": events, "run_id": run_id})
    return result, emitted_drift_events(op, events), ti


def _normed_wasserstein(store: dict[str, str], window: tuple[str, str], column: str) -> float:
    """Wasserstein distance of ``column`` between the reference and the window's flights (joined with
    their weather), over the reference's standard deviation."""
    import numpy as np
    import pandas as pd
    from scipy.stats import wasserstein_distance

    reference = pd.read_parquet(as_path(store["reference_uri"]).path)[column].dropna()
    offline = Path(as_path(store["offline_root"]).path)
    days = pd.date_range(*window).strftime("%Y-%m-%d")
    flights = pd.concat(pd.read_parquet(offline / "flights" / f"date={d}") for d in days)
    weather = pd.read_parquet(offline / "weather" / "weather.parquet")
    current = flights.merge(weather, on=["origin", "time_hour"], how="left")[column].dropna()
    return float(wasserstein_distance(reference, current) / np.std(reference))


def test_spring_week_is_calm_and_emits_nothing(flights_store: dict[str, str]) -> None:
    result, alias_events, ti = run_check(flights_store, SPRING[1], "spring")

    assert result["drift_detected"] is False
    assert result["window"] == {
        "start": SPRING[0],
        "end": SPRING[1],
        "rows": result["window"]["rows"],
        "source": "offline_store",
    }
    assert 6000 < result["window"]["rows"] < 8000
    assert result["drift_share"] < FLIGHTS_DRIFT_SHARE
    assert set(result["columns"]) == set(FLIGHTS_DRIFT_COLUMNS)
    # spring is warmer than winter, and the check measures by how much: its score is the Wasserstein
    # distance between the two weeks' temperatures in reference standard deviations, computed here
    # from the same rows with scipy; that real shift stays below the spec's threshold (no false alarm)
    shift = _normed_wasserstein(flights_store, SPRING, "temp")
    assert result["columns"]["temp"]["score"] == pytest.approx(shift, rel=1e-3)
    assert shift < FLIGHTS_DRIFT_COLUMNS["temp"]["threshold"]
    assert alias_events == []
    assert Path(as_path(result["report_uri"]).path).stat().st_size > 10_000
    assert ti.xcom["_link_DriftReportLink"].endswith("drift_report.html")


def test_july_week_drifts_writes_report_and_emits_event_with_figures(flights_store: dict[str, str]) -> None:
    result, alias_events, _ = run_check(flights_store, JULY[1], "july")

    assert result["drift_detected"] is True
    assert result["drift_share"] >= FLIGHTS_DRIFT_SHARE
    assert {"temp", "dewp"} <= set(result["drifted_columns"])
    assert result["drifted_columns"]["temp"] >= FLIGHTS_DRIFT_COLUMNS["temp"]["threshold"]
    # network and schedule columns did not move: the drift is the weather
    assert not {"carrier", "origin", "hour"} & set(result["drifted_columns"])

    report = Path(as_path(result["report_uri"]).path)
    assert report.name == "drift_report.html" and "monitor/july/drift" in str(report)
    assert "temp" in report.read_text(errors="replace")
    summary = json.loads(Path(as_path(result["summary_uri"]).path).read_text())
    assert summary["drifted_columns"] == result["drifted_columns"]

    [event] = alias_events
    assert event.key.name == "flight_delay_drift"
    assert event.extra["model_page"].endswith("/plugin/mlops-models/flight_delay")
    assert event.extra["drift_share"] == result["drift_share"]
    assert event.extra["drifted_columns"] == result["drifted_columns"]
    assert event.extra["window_end"] == JULY[1] and event.extra["data_time"] == JULY[1]
    assert event.extra["event_id"] == result["event_id"]
    json.dumps(event.extra)  # the figures are plain JSON


def test_reference_statistics_are_cached_once(flights_store: dict[str, str]) -> None:
    first, _, _ = run_check(flights_store, SPRING[1], "cache-1")
    stats = Path(as_path(first["reference"]["stats_uri"]).path)
    written = stats.stat().st_mtime_ns
    second, _, _ = run_check(flights_store, JULY[1], "cache-2")
    assert second["reference"]["key"] == first["reference"]["key"]
    assert stats.stat().st_mtime_ns == written
    body = json.loads(stats.read_text())
    assert body["meta"]["rows"] == first["reference"]["rows"] > 80_000
    assert abs(sum(body["columns"]["temp"]["shares"]) - 1) < 1e-9
    assert ArtifactStore().settings.artifact_root in first["reference"]["stats_uri"]


def test_empty_window_fails_clearly(flights_store: dict[str, str]) -> None:
    with pytest.raises(MLOpsInputError, match=r"drift window 2013-09-01\.\.2013-09-07 is empty"):
        run_check(flights_store, "2013-09-07", "empty")


def test_a_window_whose_joined_weather_is_missing_names_the_empty_columns(flights_store) -> None:
    import pandas as pd

    offline = Path(flights_store["offline_root"].removeprefix("file://"))
    july = pd.read_parquet(offline / "flights" / f"date={JULY[1]}" / "part-0.parquet")
    july["time_hour"] = july["time_hour"] + pd.Timedelta(days=365)  # a day the weather table does not cover
    part = offline / "flights" / "date=2014-07-21" / "part-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    july.to_parquet(part, index=False)
    with pytest.raises(
        MLOpsInputError, match=r"drift columns \['temp', 'dewp'\] have no values in the window"
    ):
        run_check(flights_store, "2014-07-21", "no-weather")


# ----------------------------------------------------------------------------- AUC decay
SCHEDULE_COLUMNS = {c: FLIGHTS_DRIFT_COLUMNS[c] for c in ("hour", "distance", "carrier", "origin")}


@pytest.fixture(scope="module")
def served_models(tmp_path_factory) -> dict[str, Any]:
    """One real model (the serving tests' pipeline on carrier, origin, hour, distance, month) trained on
    January-March, registered and promoted twice in a registry of its own: ``delay_april`` on an honest
    holdout (April), ``delay_february`` on a holdout it was trained on (February), so its recorded
    holdout AUC overstates it, as a leaky or stale holdout would. The registry lives in a state folder
    of this module's own (the artifact store stays the session's)."""
    from serving.models import FEATURES, LABEL, training_frame, write_model

    from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator

    tmp = tmp_path_factory.mktemp("decay")
    flights = training_frame(months=(1, 2, 3, 4))
    train = flights[flights["month"] <= 3]

    def manifest(name: str, frame: Any) -> str:
        data = tmp / f"{name}.parquet"
        frame.assign(event_timestamp=frame["time_hour"])[[*FEATURES, LABEL, "event_timestamp"]].to_parquet(
            data
        )
        path = tmp / f"{name}.json"
        path.write_text(json.dumps({"data_uri": f"file://{data}", "label": LABEL, "rows": len(frame)}))
        return f"file://{path}"

    model = write_model(tmp / "model", train, max_iter=60)
    train_manifest = manifest("train", train)
    holdouts = {
        "delay_april": manifest("april", flights[flights["month"] == 4]),
        "delay_february": manifest("february", flights[flights["month"] == 2]),
    }
    context = {"run_id": "decay", "ti": type("TI", (), {"dag_id": "flights_train"})()}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp / "state"))
        promoted = {}
        for name, holdout in holdouts.items():
            version = RegisterModelOperator(
                task_id="register",
                model_name=name,
                model_uri=str(model),
                metrics={},
                training_manifest_uri=train_manifest,
            ).execute(context)["version"]
            promoted[name] = PromoteModelOperator(
                task_id="promote",
                model_name=name,
                candidate_version=version,
                holdout_uri=holdout,
                floor=0.55,
            ).execute(context)
        yield {"state": tmp / "state", "model_dir": model, "promoted": promoted}


def _window_auc(model_dir: Path, offline_root: str, start: str, end: str) -> tuple[float, int]:
    """AUC of the model on the window's flights whose arrival delay is known, computed here directly."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from airflow_mlops.ml.model_io import load_model_dir

    root = Path(as_path(offline_root).path) / "flights"
    frame = pd.concat(
        pd.read_parquet(root / f"date={d}" / "part-0.parquet")
        for d in pd.date_range(start, end).strftime("%Y-%m-%d")
    )
    frame = frame[frame["arr_delay"].notna()]
    return float(roc_auc_score(frame["arr_delay"] > 15, load_model_dir(model_dir).predict(frame))), len(frame)


@pytest.mark.parametrize("model", ["delay_april", "delay_february"])
def test_auc_decay_of_the_production_model_on_a_calm_week(
    flights_store: dict[str, str], served_models: dict[str, Any], monkeypatch, model: str
) -> None:
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(served_models["state"]))
    asset = Asset(name=f"{model}_drift")
    op = EvidentlyDriftOperator(
        task_id="drift",
        model_name=model,  # no reference_uri: the production version's training snapshot
        offline_root=flights_store["offline_root"],
        table="flights",
        columns=SCHEDULE_COLUMNS,
        drift_share=FLIGHTS_DRIFT_SHARE,
        window_end=SPRING[1],
        window_days=7,
        label_column="delayed",
        label_rule=FLIGHTS_LABEL_RULE,
        max_decay={"auc": 0.03},
        drift_asset=asset,
    )
    events = OutletEventAccessors()
    result = op.execute({"ti": FakeTI(f"decay-{model}"), "outlet_events": events, "run_id": f"decay-{model}"})

    promotion = served_models["promoted"][model]
    expected_auc, labelled = _window_auc(served_models["model_dir"], flights_store["offline_root"], *SPRING)
    quality = result["quality"]
    assert result["drift_detected"] is False  # the schedule of a spring week looks like the winter's
    assert promotion["promoted"] is True
    assert result["model_version"] == promotion["version"] == quality["model_version"]
    assert quality["labelled_rows"] == labelled and quality["unlabelled_rows"] > 0  # cancelled flights
    assert quality["auc"] == pytest.approx(expected_auc, abs=1e-9)
    assert quality["holdout_auc"] == pytest.approx(promotion["candidate_score"])
    assert quality["auc_decay"] == pytest.approx(promotion["candidate_score"] - expected_auc)
    # the generic figures: the metric the model was promoted on, its score and drop
    assert (quality["metric"], quality["max_decay"]) == ("auc", 0.03)
    assert quality["score"] == quality["auc"] and quality["holdout_score"] == quality["holdout_auc"]
    assert quality["decay"] == pytest.approx(quality["auc_decay"])
    alias_events = emitted_drift_events(op, events)
    if model == "delay_april":  # an honest holdout: the model is as good on May as on April
        assert quality["auc_decay"] < 0.03 and result["decay_detected"] is False
        assert alias_events == []
    else:  # the February figure overstates it: decay past the threshold, and the event goes out
        assert quality["auc_decay"] > 0.03 and result["decay_detected"] is True
        [event] = alias_events
        assert event.extra["decay_detected"] is True and event.extra["drift_detected"] is False
        assert event.extra["auc"] == quality["auc"] and event.extra["holdout_auc"] == quality["holdout_auc"]
        assert event.extra["auc_decay"] == quality["auc_decay"]
        assert (event.extra["metric"], event.extra["decay"]) == ("auc", quality["decay"])


def test_prediction_drift_of_the_served_flights_model(
    flights_store: dict[str, str], served_models: dict[str, Any], monkeypatch
) -> None:
    """The spring week answered by the production version of ``delay_april`` (a real model loaded from the
    registry), logged by the service's writer; the monitor compares those delay probabilities with the
    model's probabilities on the April holdout it was promoted on."""
    import numpy as np
    import pandas as pd
    from scipy.stats import wasserstein_distance

    from airflow_mlops.ml.model_io import load_model_dir
    from airflow_mlops.ml.prediction_log import PredictionLogWriter, make_record

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(served_models["state"]))
    version = served_models["promoted"]["delay_april"]["version"]
    model = load_model_dir(served_models["model_dir"])
    offline = Path(as_path(flights_store["offline_root"]).path) / "flights"
    days = pd.date_range(*SPRING).strftime("%Y-%m-%d")
    week = pd.concat(pd.read_parquet(offline / f"date={d}" / "part-0.parquet") for d in days)
    served = model.predict(week)
    writer = PredictionLogWriter("delay_april", flush_seconds=3600)
    writer.append(
        [
            make_record(
                model="delay_april",
                version=version,
                task="binary",
                request={f: row[f] for f in model.features},
                features={f: row[f] for f in model.features},
                prediction=float(p),
                answer={"probability": float(p), "label": int(p >= 0.5)},
                time=row["time_hour"].isoformat(),
            )
            for row, p in zip(week.to_dict("records"), served, strict=True)
        ]
    )
    writer.close()

    result = EvidentlyDriftOperator(
        task_id="drift",
        model_name="delay_april",
        offline_root=flights_store["offline_root"],
        table="flights",
        columns=SCHEDULE_COLUMNS,
        window_end=SPRING[1],
        window_days=7,
        prediction_drift=True,
    ).execute({"ti": FakeTI("predictions"), "run_id": "predictions"})

    from airflow_mlops.operators.drift import production_model

    holdout_uri = production_model("delay_april")["promotion"]["holdout_uri"]  # recorded by the promotion
    holdout = pd.read_parquet(as_path(json.loads(as_path(holdout_uri).read_text())["data_uri"]).path)
    reference = model.predict(holdout)
    predictions = result["prediction_drift"]
    # the log's days are UTC days (time_hour): the evening flights of the week's last New York day fall after it
    logged = week["time_hour"].dt.strftime("%Y-%m-%d").between(*SPRING)
    assert predictions["rows"] == int(logged.sum()) > 5000
    assert predictions["reference_rows"] == len(holdout)
    assert predictions["method"] == "Wasserstein distance (normed)" and predictions["threshold"] == 0.1
    expected = wasserstein_distance(reference, served[logged.to_numpy()]) / np.std(reference)
    assert predictions["score"] == pytest.approx(expected, rel=1e-6)
    # the spring week is answered as the April holdout was: no prediction drift
    assert expected < 0.1 and predictions["drift_detected"] is False


#: features of a model trained like ``flights_train``'s: request fields plus each view of ``delay_model``
FEAST_FEATURES = [
    "carrier",
    "origin",
    "distance",
    "sched_hour",
    "weather_hourly__temp",
    "weather_hourly__dewp",
    "weather_hourly__precip",
    "weather_hourly__visib",
    "plane__seats",
    "carrier_daily__delayed_rate_7d",
    "carrier_daily__arr_delay_mean_7d",
    "origin_daily__delayed_rate_7d",
]


def test_monitor_of_a_feast_trained_model_joins_its_features_for_the_auc(
    feast_env, tmp_path, monkeypatch
) -> None:
    """The flights monitor's set-up against a model trained on the ``delay_model`` feature service: the
    reference is its Feast training snapshot (weather under ``weather_hourly__*``, hour as ``sched_hour``);
    the labels are the ``flights_labelled`` rows the features DAG writes; the model's features are joined
    point in time from Feast for the AUC."""
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors
    from serving.models import LABEL, write_model
    from sklearn.metrics import roc_auc_score

    from airflow_mlops.ml.model_io import load_model_dir
    from airflow_mlops.operators.drift import DriftBaselineOperator
    from airflow_mlops.operators.features import FeastTrainingDatasetOperator
    from airflow_mlops.operators.registry import PromoteModelOperator, RegisterModelOperator

    offline = feast_env.settings.offline_root
    context = {"run_id": "feast-decay", "ti": FakeTI("feast-decay"), "outlet_events": OutletEventAccessors()}

    def training_set(name: str, start: str, end: str) -> dict:
        return FeastTrainingDatasetOperator(
            task_id=name,
            repo_path=str(feast_env.repo),
            entity_uri=f"{offline}/flights_labelled",
            feature_service="delay_model",
            label_column="delayed",
            start=start if "T" in start else f"{start}T00:00:00+00:00",
            end=end if "T" in end else f"{end}T00:00:00+00:00",
            name=name,
        ).execute(context)

    train = training_set("training_set", "2013-02-01", "2013-04-01")
    holdout = training_set("holdout", "2013-04-01", "2013-04-15")
    frame = pd_read(train["data_uri"])
    model_dir = write_model(
        tmp_path / "model",
        frame.assign(**{LABEL: frame["delayed"].astype(int)}),
        max_iter=60,
        features=FEAST_FEATURES,
    )
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path / "state"))  # a registry of its own
    version = RegisterModelOperator(
        task_id="register",
        model_name="flight_delay",
        model_uri=str(model_dir),
        metrics={},
        training_manifest_uri=train["manifest_uri"],
        feature_service="delay_model",
        feast_repo_path=str(feast_env.repo),
    ).execute(context)["version"]
    promotion = PromoteModelOperator(
        task_id="promote",
        model_name="flight_delay",
        candidate_version=version,
        holdout_uri=holdout["manifest_uri"],
        floor=0.55,
    ).execute(context)
    assert promotion["promoted"] is True
    # what flights_train does after promotion: the monitor's reference of the new production model
    baseline = DriftBaselineOperator(
        task_id="drift_baseline",
        model_name="flight_delay",
        columns=FLIGHTS_DRIFT_COLUMNS,
        reference_columns=FLIGHTS_REFERENCE_COLUMNS,
    ).execute(context)

    asset = Asset(name="flight_delay_drift")
    result = EvidentlyDriftOperator(
        task_id="drift",
        model_name="flight_delay",
        offline_root=offline,
        table="flights",
        joins=[{"uri": "weather", "on": ["origin", "time_hour"], "columns": ["temp", "dewp"]}],
        columns=FLIGHTS_DRIFT_COLUMNS,
        reference_columns=FLIGHTS_REFERENCE_COLUMNS,
        drift_share=FLIGHTS_DRIFT_SHARE,
        window_end="2013-06-14",
        window_days=7,
        label_column="delayed",
        labels_table="flights_labelled",
        feature_repo=str(feast_env.repo),
        feast_conn_id=None,
        drift_asset=asset,
    ).execute(context)

    # drift against the Feast snapshot, its columns read under their snapshot names
    assert set(result["columns"]) == set(FLIGHTS_DRIFT_COLUMNS)
    assert result["reference"]["source_uri"] == train["data_uri"]
    assert result["reference"]["rows"] == train["rows"]
    assert result["reference"]["key"] == baseline["key"]  # the baseline prepared what the monitor reads
    # the AUC of the served model on the week's labelled flights, with the features Feast joins for them
    # the same flights: the window's days are New York days (the partitions), 04:00 UTC to 04:00 UTC in June
    window = training_set("window", "2013-06-08T04:00:00+00:00", "2013-06-15T04:00:00+00:00")
    rows = pd_read(window["data_uri"])
    expected = roc_auc_score(rows["delayed"].astype(int), load_model_dir(model_dir).predict(rows))
    quality = result["quality"]
    assert quality["labelled_rows"] == window["rows"] > 5000
    assert quality["unlabelled_rows"] == window["dropped_unlabelled"]
    assert quality["auc"] == pytest.approx(expected, abs=1e-9)
    assert quality["holdout_auc"] == pytest.approx(promotion["candidate_score"])
    assert quality["auc_decay"] == pytest.approx(promotion["candidate_score"] - expected)
    assert result["decay_detected"] is (quality["decay"] > 0.05)
    assert quality["decay"] == pytest.approx(quality["auc_decay"])


def pd_read(uri: str) -> Any:
    import pandas as pd

    with as_path(uri).open("rb") as handle:
        return pd.read_parquet(handle)
