"""Batch scoring of a month of real 2013 flights from the offline store, against the live endpoint.

Registered models (a binary delay classifier and a regression of the arrival delay, request features
only) score June 2013 from the session's offline store (``feast_data``: daily partitions of the real
flights) with :class:`BatchScoringOperator`; a real ``bentoml serve`` of the same version answers the
same rows through ``/predict_batch``. Both must agree row for row. Scoring on Ray must give the same table
as scoring in the task's process, and a rerun must replace the month's partitions, not add to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pandas as pd
import pytest
from mlops_testing import run_python
from serving.models import register, training_frame, write_model
from serving.servers import start_backends, stop_backends

from airflow_mlops.exceptions import MLOpsArgumentError, MLOpsInputError
from airflow_mlops.operators.batch_scoring import BatchScoringOperator
from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator

pytestmark = pytest.mark.integration

JUNE = {"window_start": "2013-06-01", "window_end": "2013-06-30"}


def _context() -> dict:
    return {
        "ti": SimpleNamespace(dag_id="batch_it", run_id="manual__1", task_id="score"),
        "outlet_events": {},
    }


@pytest.fixture(scope="module")
def models(feast_data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path_factory.mktemp("batch-state")))
        tmp = tmp_path_factory.mktemp("batch-models")
        train = training_frame().sample(6000, random_state=3)
        versions = {
            task: register(
                f"batch_{task}",
                write_model(tmp / task, train, max_iter=30, task=task),
                train,
                entity_keys=["origin"],
            )
            for task in ("binary", "regression")
        }
        yield SimpleNamespace(versions=versions, offline=feast_data.settings.offline_root, root=Path(tmp))


def _score(models, task: str, output: str, **kwargs) -> dict:
    return BatchScoringOperator(
        task_id="score",
        model_name=f"batch_{task}",
        version=models.versions[task],
        table="flights",
        output_table=output,
        offline_root=models.offline,
        carry_columns=["flight", "tailnum", "time_hour"],
        **{**JUNE, **kwargs},
    ).execute(_context())


def _score_in_a_task_process(models, task: str, output: str) -> dict:
    """:func:`_score` on Ray (every row, 7,000 per Ray task), in a process of its own as Airflow runs each
    task: the Ray it starts and stops stays out of the suite's process, whose later tests start their own."""
    code = f"""
import json
from types import SimpleNamespace
from airflow_mlops.operators.batch_scoring import BatchScoringOperator
result = BatchScoringOperator(
    task_id="score", model_name="batch_{task}", version={models.versions[task]!r}, table="flights",
    output_table={output!r}, offline_root={models.offline!r}, carry_columns=["flight", "tailnum", "time_hour"],
    window_start={JUNE["window_start"]!r}, window_end={JUNE["window_end"]!r}, parallel_min_rows=0, chunk_rows=7000,
).execute({{"ti": SimpleNamespace(dag_id="batch_it", run_id="manual__1", task_id="score"), "outlet_events": {{}}}})
print("@@" + json.dumps(result))
"""
    done = run_python(code, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line[2:] for line in done.stdout.splitlines() if line.startswith("@@")))


def _read(models, output: str) -> pd.DataFrame:
    root = Path(models.offline.removeprefix("file://")) / output
    parts = sorted(root.glob("date=*/part-0.parquet"))
    return pd.concat([pd.read_parquet(p).assign(date=p.parent.name) for p in parts], ignore_index=True)


def test_a_month_scored_in_batch_gets_the_endpoints_answers(models):
    result = _score(models, "binary", "batch_binary_june")
    table = _read(models, "batch_binary_june")
    flights = Path(models.offline.removeprefix("file://")) / "flights"
    june = sum(len(pd.read_parquet(p)) for p in flights.glob("date=2013-06-*/part-0.parquet"))
    assert result["rows"] == len(table) == june > 20_000
    assert result["partitions"] == [f"date=2013-06-{d:02d}" for d in range(1, 31)] and not result["on_ray"]
    assert set(table["model_version"]) == {models.versions["binary"]}
    assert table["probability"].between(0, 1).all() and set(table["prediction"]) <= {0, 1}

    sample = table.sample(400, random_state=0)
    rows = sample[["origin", "carrier", "hour", "distance", "month"]].to_dict("records")
    rows = [{k: v.item() if hasattr(v, "item") else v for k, v in r.items()} for r in rows]
    backends = start_backends([{"model": "batch_binary", "version": models.versions["binary"]}])
    try:
        answer = httpx.post(backends[0]["url"] + "/predict_batch", json={"rows": rows}, timeout=60)
    finally:
        stop_backends(backends)
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert [a["model_version"] for a in served] == [models.versions["binary"]] * len(rows)
    np.testing.assert_allclose([a["probability"] for a in served], sample["probability"], rtol=0, atol=1e-9)
    assert [a["label"] for a in served] == sample["prediction"].tolist()


def test_scoring_on_ray_gives_the_same_table_and_a_rerun_replaces_it(models):
    here = _score(models, "regression", "batch_regression_june")
    first = _read(models, "batch_regression_june")
    on_ray = _score_in_a_task_process(models, "regression", "batch_regression_june")
    again = _read(models, "batch_regression_june")
    assert on_ray["on_ray"] and not here["on_ray"]
    assert on_ray["rows"] == here["rows"] == len(again)  # replaced, not appended
    pd.testing.assert_frame_equal(first, again)
    assert {"flight", "tailnum", "time_hour", "origin", "carrier", "prediction"} <= set(again.columns)
    assert np.isfinite(again["prediction"]).all()


def test_a_window_without_data_or_a_table_without_features_writes_nothing(models, tmp_path):
    with pytest.raises(MLOpsInputError, match=r"nothing to score.*2014-01-01"):
        _score(models, "binary", "batch_nothing", window_start="2014-01-01", window_end="2014-01-31")
    assert not (Path(models.offline.removeprefix("file://")) / "batch_nothing").exists()
    # a table of flights without the carrier, published by the offline-store writer
    flights = _read(models, "batch_binary_june").drop(columns=["carrier", "date"]).head(50)
    flights.to_parquet(tmp_path / "landed.parquet")
    offline = f"file://{tmp_path}/offline"
    OfflinePartitionWriteOperator(
        task_id="publish",
        source_uri=str(tmp_path / "landed.parquet"),
        table="no_carrier",
        partition="date=2013-06-01",
        offline_root=offline,
    ).execute(_context())
    with pytest.raises(MLOpsInputError, match=r"lacks the features \['carrier'\]"):
        BatchScoringOperator(
            task_id="score",
            model_name="batch_binary",
            version=models.versions["binary"],
            table="no_carrier",
            offline_root=offline,
            window_end="2013-06-01",
        ).execute(_context())
    assert not (tmp_path / "offline" / "batch_binary_predictions").exists()
    with pytest.raises(MLOpsArgumentError, match="is the table being scored"):
        _score(models, "binary", "flights")
