"""The lifecycle spec and factory: the reference spec builds the four DAGs wired as documented, and a bad
spec fails parsing with a message naming the file, the field and the fix (also as Airflow's import error)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from mlops_testing import FLIGHTS_SPEC, ROOT, run_python

from airflow_mlops.lifecycle import LifecycleSpecError, lifecycle_dags, load_spec


def write_spec(tmp_path: Path, change) -> Path:
    """The reference spec with ``change(content)`` applied, next to copies of what it points at."""
    content = yaml.safe_load(FLIGHTS_SPEC.read_text())
    content["ingest"]["expectation_suite"] = str(ROOT / "dags" / "expectations" / "flights_batch.json")
    content["features"]["repo"] = str(ROOT / "feature_repo")
    change(content)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_the_reference_spec_builds_four_wired_dags():
    dags = lifecycle_dags(FLIGHTS_SPEC)
    assert sorted(dags) == [
        "flights_features",
        "flights_ingest",
        "flights_monitor",
        "flights_operate",
        "flights_train",
    ]
    ingest, features, train, monitor = (
        dags[f"flights_{s}"] for s in ("ingest", "features", "train", "monitor")
    )

    assert ingest.task_dict["validate_batch"].batch_days == 7
    assert [a.name for a in ingest.task_dict["publish_to_offline_store"].outlets] == ["flights_offline"]
    assert [a.name for a in features.timetable.asset_condition.objects] == ["flights_offline"]
    assert set(features.task_dict["feast_apply"].upstream_task_ids) == {
        "publish_weather",
        "publish_planes",
        "daily_stats",
    }
    # materializations run one after the other (they write the Feast file registry)
    assert features.task_dict["materialize_planes"].upstream_task_ids == {"materialize"}
    assert train.task_dict["retraining_gate"].data_time.endswith("['holdout_end'] }}")
    daily_stats = features.task_dict["daily_stats"]
    assert daily_stats.start_day == "{{ ti.xcom_pull(task_ids='feature_window').first }}"
    assert [a.name for a in train.timetable.asset_condition.objects] == ["flight_delay_drift"]
    assert train.task_dict["retraining_gate"].cooldown_days == 60
    assert [t.task_id for t in train.task_dict["tune"].upstream_list] == ["training_set"]
    assert train.task_dict["promote"].floor == 0.6
    # the task and its metric reach every stage
    assert {train.task_dict[t].task for t in ("training_set", "holdout_set")} == {"binary"}
    assert (train.task_dict["tune"].metric, train.task_dict["tune"].mode) == ("auc", "max")
    assert list(train.task_dict["register"].metrics) == ["auc"]
    assert train.task_dict["register"].feast_repo_path == str(ROOT / "feature_repo")
    assert train.task_dict["promote"].metric == "auc"
    assert set(train.task_dict["sample_predictions"].upstream_task_ids) == {"deploy", "holdout_set"}
    drift = monitor.task_dict["drift"]
    assert drift.columns["temp"]["threshold"] == 4.0 and drift.drift_share == 0.3
    assert (drift.max_decay, drift.prediction_drift, drift.table) == ({"auc": 0.05}, False, "flights")
    assert "AUC" not in monitor.doc_md + train.doc_md
    assert set(monitor.tags) == {"mlops", "flights", "monitor"}


def test_serving_target_none_ends_the_train_dag_at_the_drift_baseline(tmp_path):
    path = write_spec(tmp_path, lambda c: c["serving"].update(target="none"))
    train = lifecycle_dags(path)["flights_train"]
    assert "deploy" not in train.task_dict and train.task_dict["drift_baseline"].downstream_list == []


def test_serving_endpoint_deploys_onto_the_shared_multi_model_endpoint_without_a_bento(tmp_path):
    path = write_spec(tmp_path, lambda c: c["serving"].update(endpoint="shared"))
    train = lifecycle_dags(path)["flights_train"]
    deploy = train.task_dict["deploy"]
    assert type(deploy).__name__ == "MultiModelDeployOperator"
    assert (deploy.endpoint, deploy.model_name, deploy.feast_repo_path) == (
        "shared",
        "flight_delay",
        str(ROOT / "feature_repo"),
    )
    assert "build" not in train.task_dict and deploy.upstream_task_ids == {"drift_baseline"}
    assert set(train.task_dict["sample_predictions"].upstream_task_ids) == {"deploy", "holdout_set"}
    with pytest.raises(LifecycleSpecError, match="endpoint"):
        lifecycle_dags(write_spec(tmp_path, lambda c: c["serving"].update(endpoint="Not A Name")))
    canary = {"endpoint": "shared", "rollout": {"strategy": "canary"}}
    with pytest.raises(LifecycleSpecError, match="no canary or shadow rollout"):
        lifecycle_dags(write_spec(tmp_path, lambda c: c["serving"].update(canary)))


def test_a_batch_scoring_section_adds_its_own_dag(tmp_path):
    section = {"schedule": "weekly", "carry_columns": ["flight"], "parallel_min_rows": 1000}
    path = write_spec(tmp_path, lambda c: c.update(batch_scoring=section))
    dags = lifecycle_dags(path)
    assert sorted(dags) == [
        f"flights_{s}" for s in ("batch_scoring", "features", "ingest", "monitor", "operate", "train")
    ]
    scoring = dags["flights_batch_scoring"]
    score = scoring.task_dict["score"]
    assert (score.table, score.output_table, score.model_name) == (
        "flights",
        "flight_delay_predictions",
        "flight_delay",
    )
    assert (scoring.params["window_days"], score.parallel_min_rows, score.carry_columns) == (
        7,
        1000,
        ["flight"],
    )
    assert score.feature_repo == str(ROOT / "feature_repo")
    assert [a.name for a in score.outlets] == ["flight_delay_predictions"]
    assert scoring.timetable.summary == "7 days, 0:00:00"  # weekly data intervals
    bad = write_spec(
        tmp_path, lambda c: c.update(batch_scoring={"output_table": "no spaces", "chunk_rows": 0})
    )
    with pytest.raises(
        LifecycleSpecError, match=r"batch_scoring\.output_table(.|\n)*batch_scoring\.chunk_rows"
    ):
        load_spec(bad)


def test_feature_window_reads_the_days_of_weekly_events_and_ends_after_the_stats_delay():
    from types import SimpleNamespace

    from airflow_mlops.lifecycle.factory import feature_window

    events = {
        "flights_offline": [
            SimpleNamespace(extra={"partitions": [f"date=2013-01-0{d}" for d in range(1, 8)]}),
            SimpleNamespace(extra={"partition": "date=2013-01-08"}),
        ]
    }
    window = feature_window(
        events, None, timezone="America/New_York", available_after_hours=6, dag_id="flights_features"
    )
    assert window == {
        "first": "2013-01-01",
        "last": "2013-01-08",
        "start": "2013-01-01T05:00:00+00:00",
        "end": "2013-01-09T11:00:00+00:00",
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda c: c["ingest"].update(cadance="weekly"),
            r"ingest\.cadance: unknown field.*remove it or correct",
        ),
        (
            lambda c: c["ingest"].update(cadence="hourly"),
            r"ingest\.cadence: Input should be 'daily' or 'weekly'",
        ),
        (lambda c: c["train"].pop("tuning"), r"train\.tuning: Field required.*add the field"),
        (lambda c: c["train"].update(holdout_start="2012-12-01"), r"train: need train_start < holdout_start"),
        (
            lambda c: c["ingest"].update(batch_timezone="New York"),
            r"ingest\.batch_timezone: 'New York' is not",
        ),
        (lambda c: c["features"]["steps"][0].pop("operator"), r"features\.steps\[0\]: give exactly one"),
        (lambda c: c["promotion"].update(min_improvement=-1), r"promotion\.min_improvement: Input should be"),
        (lambda c: c["ingest"].update(landing_path="flights/all.parquet"), r"does not depend on the data"),
        (
            lambda c: c["ingest"].update(expectation_suite="nowhere.json"),
            r"ingest\.expectation_suite: no file",
        ),
        (lambda c: c["features"].update(repo="/nonexistent"), r"features\.repo: /nonexistent holds no"),
    ],
)
def test_a_bad_field_is_named_with_the_file_and_the_fix(tmp_path, change, named):
    path = write_spec(tmp_path, change)
    with pytest.raises(LifecycleSpecError, match=named) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_several_bad_fields_are_all_named_at_once(tmp_path):
    def change(content):
        content["model"] = "flight delay"
        content["monitoring"]["drift_share"] = 2

    with pytest.raises(LifecycleSpecError, match="2 wrong fields") as err:
        load_spec(write_spec(tmp_path, change))
    assert "model: String should match pattern" in str(err.value)
    assert "monitoring.drift_share: Input should be less than or equal to 1" in str(err.value)


def test_unreadable_and_non_yaml_specs_say_so(tmp_path):
    with pytest.raises(LifecycleSpecError, match="cannot be read"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: x\ningest: {cadence: weekly\n")
    with pytest.raises(LifecycleSpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(LifecycleSpecError, match="must be a YAML mapping"):
        load_spec(listing)


def test_a_step_operator_that_does_not_import_or_fit_is_a_spec_error(tmp_path):
    def unknown(content):
        content["features"]["steps"][2]["operator"] = "airflow_mlops.operators.features.NoSuchOperator"

    with pytest.raises(LifecycleSpecError, match=r"features\.steps\[2\]\.operator .*NoSuchOperator"):
        lifecycle_dags(write_spec(tmp_path, unknown))

    def wrong_args(content):
        content["features"]["steps"][2]["args"]["start_dya"] = "2013-01-01"

    with pytest.raises(LifecycleSpecError, match=r"(?s)features\.steps\[2\]\.args do not fit .*start_dya"):
        lifecycle_dags(write_spec(tmp_path, wrong_args))


def test_airflow_shows_a_bad_spec_as_the_dag_files_import_error(tmp_path):
    spec = write_spec(tmp_path, lambda c: c["monitoring"].update(cooldown_days="a week"))
    (tmp_path / "model_lifecycle.py").write_text(
        textwrap.dedent(
            f"""
            from airflow_mlops.lifecycle import lifecycle_dags

            globals().update(lifecycle_dags({str(spec)!r}))
            """
        )
    )
    code = f"""
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(tmp_path)!r})
print("@@dags", sorted(bag.dags))
for path, error in bag.import_errors.items():
    print("@@error", path)
    print(error)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "@@dags []" in result.stdout
    assert f"@@error {tmp_path / 'model_lifecycle.py'}" in result.stdout
    error = result.stdout.split("@@error", 1)[1]
    assert f"{spec}: monitoring.cooldown_days: Input should be a valid number" in error
    assert "Fix: correct the field named above; the reference is docs/lifecycle-spec.md" in error
    # the traceback stops at the spec loader: no frames from pydantic's internals
    assert "pydantic" not in error.split("LifecycleSpecError")[0]


# ------------------------------------------------------------------------------------------ task and metrics
def _without_metrics(task: str):
    """The reference spec for ``task`` with every metric setting left to the task's defaults."""

    def change(content):
        content["task"] = task
        content["train"]["tuning"].pop("metric", None)
        content["train"]["tuning"].pop("mode", None)
        content["promotion"].pop("metric", None)
        content["promotion"].pop("floor", None)
        content["monitoring"].pop("max_decay", None)

    return change


@pytest.mark.parametrize(
    ("task", "metric", "mode", "floor", "max_decay"),
    [
        ("binary", "auc", "max", 0.5, {"auc": 0.05}),
        ("multiclass", "macro_f1", "max", None, {"macro_f1": 0.05}),
        ("regression", "rmse", "min", None, {"rmse": 0.2}),
    ],
)
def test_metrics_default_to_the_tasks(tmp_path, task, metric, mode, floor, max_decay):
    spec = load_spec(write_spec(tmp_path, _without_metrics(task)))
    assert spec.task == task
    assert (spec.train.tuning.metric, spec.train.tuning.mode) == (metric, mode)
    assert (spec.promotion.metric, spec.promotion.floor) == (metric, floor)
    assert spec.monitoring.max_decay == max_decay


def test_a_regression_lifecycle_is_wired_with_its_metric(tmp_path):
    dags = lifecycle_dags(write_spec(tmp_path, _without_metrics("regression")))
    train, monitor = dags["flights_train"], dags["flights_monitor"]
    assert train.task_dict["training_set"].task == "regression"
    assert (train.task_dict["tune"].metric, train.task_dict["tune"].mode) == ("rmse", "min")
    assert list(train.task_dict["register"].metrics) == ["rmse"]
    assert (train.task_dict["promote"].metric, train.task_dict["promote"].floor) == ("rmse", None)
    assert monitor.task_dict["drift"].max_decay == {"rmse": 0.2}
    assert "rmse" in train.doc_md and "rmse 0.2" in monitor.doc_md


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c.pop("task"), r"task: Field required; fix: write 'task: binary'"),
        (
            lambda c: c.update(task="classification"),
            r"task: Input should be 'binary', 'multiclass' or 'regression'",
        ),
        (
            lambda c: c.update(task="regression"),
            r"train\.tuning\.metric: 'auc' does not fit a regression model; fix: use one of rmse, mae, r2",
        ),
        (
            lambda c: (_without_metrics("regression")(c), c["promotion"].update(metric="auc")),
            r"promotion\.metric: 'auc' does not fit a regression model; fix: use one of rmse, mae, r2",
        ),
        (
            lambda c: (_without_metrics("multiclass")(c), c["monitoring"].update(max_decay={"rmse": 0.1})),
            r"monitoring\.max_decay\.rmse: 'rmse' does not fit a multiclass model; fix: use one of macro_f1",
        ),
        (
            lambda c: c["train"]["tuning"].update(metric="f1_score"),
            r"train\.tuning\.metric: 'f1_score' is not a known metric; fix: for a binary model use one of auc",
        ),
        (
            lambda c: c["train"]["tuning"].update(mode="min"),
            r"train\.tuning\.mode: 'min' contradicts auc, which is better when higher; fix: write mode: max",
        ),
        (
            lambda c: c["monitoring"].update(max_decay={"auc": 0}),
            r"monitoring\.max_decay\.auc: Input should be greater than 0",
        ),
    ],
)
def test_a_task_or_metric_that_does_not_fit_is_named_with_the_fix(tmp_path, change, named):
    path = write_spec(tmp_path, change)
    with pytest.raises(LifecycleSpecError, match=named) as err:
        load_spec(path)
    assert str(path) in str(err.value)


def test_every_metric_that_does_not_fit_is_named_at_once(tmp_path):
    with pytest.raises(LifecycleSpecError, match="3 wrong fields") as err:
        load_spec(write_spec(tmp_path, lambda c: c.update(task="regression")))
    for field in ("train.tuning.metric", "promotion.metric", "monitoring.max_decay.auc"):
        assert f": {field}: 'auc' does not fit a regression model" in str(err.value)


def test_max_auc_decay_is_read_as_the_deprecated_form_of_max_decay(tmp_path):
    def old(content):
        content["monitoring"].pop("max_decay")
        content["monitoring"]["max_auc_decay"] = 0.08

    with pytest.warns(DeprecationWarning, match="max_auc_decay is deprecated"):
        spec = load_spec(write_spec(tmp_path, old))
    assert spec.monitoring.max_decay == {"auc": 0.08}

    def both(content):
        content["monitoring"]["max_auc_decay"] = 0.08

    with pytest.raises(LifecycleSpecError, match=r"monitoring: give max_decay only"):
        load_spec(write_spec(tmp_path, both))

    def old_for_regression(content):
        old(content)
        _without_metrics("regression")(content)
        content["monitoring"]["max_auc_decay"] = 0.08

    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(
            LifecycleSpecError, match=r"monitoring\.max_decay\.auc: 'auc' does not fit a regression"
        ),
    ):
        load_spec(write_spec(tmp_path, old_for_regression))


def test_task_retries_follow_airflows_default_task_retries():
    """A deployment whose workers can die sets ``[core] default_task_retries``: the factory's DAGs take it
    (they used to hard-code ``retries=0``, so a task on a killed Celery worker failed its run)."""
    code = """
from airflow_mlops.lifecycle import lifecycle_dags
dags = lifecycle_dags("dags/flights.yaml")
print("@@retries", sorted({t.retries for d in dags.values() for t in d.tasks}))
"""
    result = run_python(code, env={"AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "2"})
    assert "@@retries [2]" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def test_the_training_window_follows_the_gates_cause_not_only_the_triggering_events():
    """The gate may decide on an event Airflow gave to no run (apache/airflow#56050): the training set and
    the holdout must be those of that event's data time, which the demo and the promotion report name."""
    from types import SimpleNamespace

    from airflow_mlops.lifecycle.factory import train_window

    params = {
        "train_start": "2013-01-01",
        "holdout_start": "2013-03-18",
        "holdout_end": "2013-04-01",
        "train_days": 28,
        "holdout_days": 7,
    }
    triggering = {"drift": [SimpleNamespace(extra={"data_time": "2013-07-29", "event_id": "a"})]}
    by_events = train_window(params, triggering)
    assert by_events["holdout_end"] == "2013-07-30T00:00:00+00:00"
    decided = {"proceed": True, "cause": {"event_id": "b", "data_time": "2013-08-05T00:00:00+00:00"}}
    window = train_window(params, triggering, decided)
    assert window == {
        "train_start": "2013-07-02T00:00:00+00:00",
        "holdout_start": "2013-07-30T00:00:00+00:00",
        "holdout_end": "2013-08-06T00:00:00+00:00",
    }
    # a run by hand: the gate's cause names no event, the params' fixed days apply
    manual = {"proceed": True, "cause": {"event_id": None, "data_time": "2026-11-30T10:00:00+00:00"}}
    assert train_window(params, {}, manual)["holdout_end"] == "2013-04-01T00:00:00+00:00"
    # before the gate decided (its own template), the triggering events decide
    assert train_window(params, triggering, None) == by_events
