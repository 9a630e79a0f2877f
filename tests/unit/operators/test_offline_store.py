"""The offline store's day partitions: batches that carry rows of the same day are merged, a rerun of a
batch never duplicates rows, batches that cannot be merged are refused before anything is written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_mlops.exceptions import MLOpsInputError
from airflow_mlops.operators.offline_store import OfflinePartitionWriteOperator


class _Events(dict):
    def __missing__(self, key):
        self[key] = event = SimpleNamespace(extra=None)
        return event


def _land(folder: Path, flights: list[tuple[str, datetime, float]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "flight": [f for f, _, _ in flights],
            "time_hour": pa.array([t for _, t, _ in flights], pa.timestamp("us", tz="UTC")),
            "arr_delay": [d for _, _, d in flights],
        }
    )
    pq.write_table(table, folder / "batch.parquet")
    return str(folder)


def _publish(source: str, offline: Path, **kwargs) -> dict:
    op = OfflinePartitionWriteOperator(
        task_id="publish",
        source_uri=source,
        table="flights",
        partition="date={date}",
        partition_column="time_hour",
        offline_root=str(offline),
        **kwargs,
    )
    return op.execute({"outlet_events": _Events()})


def _day(offline: Path, day: str) -> pd.DataFrame:
    rows = pd.read_parquet(offline / "flights" / f"date={day}" / "part-0.parquet")
    return rows.sort_values(["time_hour", "flight"]).reset_index(drop=True)


MAR4 = datetime(2013, 3, 4, 8, tzinfo=UTC)


def test_a_later_batch_with_rows_of_a_published_day_adds_them(tmp_path):
    offline = tmp_path / "offline"
    week = _land(tmp_path / "landing" / "week1", [("A1", MAR4, 1.0), ("A2", MAR4 + timedelta(days=1), 2.0)])
    late = _land(tmp_path / "landing" / "week2", [("B1", MAR4 + timedelta(hours=3), 3.0)])
    _publish(week, offline)
    result = _publish(late, offline)

    assert result["partitions"] == ["date=2013-03-04"]
    assert _day(offline, "2013-03-04")["flight"].tolist() == ["A1", "B1"]
    assert _day(offline, "2013-03-05")["flight"].tolist() == ["A2"]
    # whoever lists or reads the table sees its partitions only, not the batches' own rows
    assert sorted(p.name for p in (offline / "flights").iterdir()) == ["date=2013-03-04", "date=2013-03-05"]
    assert len(pd.read_parquet(offline / "flights")) == 3


def test_a_rerun_of_a_batch_adds_no_duplicates_and_keeps_the_other_batches_rows(tmp_path):
    offline = tmp_path / "offline"
    week = _land(tmp_path / "landing" / "week1", [("A1", MAR4, 1.0)])
    late = _land(tmp_path / "landing" / "week2", [("B1", MAR4 + timedelta(hours=3), 3.0)])
    _publish(week, offline)
    _publish(late, offline)
    before = _day(offline, "2013-03-04")
    _publish(late, offline)
    _publish(week, offline)
    pd.testing.assert_frame_equal(_day(offline, "2013-03-04"), before)
    assert len(before) == 2


def test_a_corrected_batch_replaces_its_own_rows_only(tmp_path):
    offline = tmp_path / "offline"
    week = tmp_path / "landing" / "week1"
    _land(week, [("A1", MAR4, 1.0), ("A9", MAR4, 99.0)])
    late = _land(tmp_path / "landing" / "week2", [("B1", MAR4 + timedelta(hours=3), 3.0)])
    _publish(str(week), offline)
    _publish(late, offline)
    _land(week, [("A1", MAR4, 1.5)])  # the source corrected A1 and withdrew A9
    _publish(str(week), offline)
    day = _day(offline, "2013-03-04")
    assert day[["flight", "arr_delay"]].values.tolist() == [["A1", 1.5], ["B1", 3.0]]


def test_the_same_key_in_two_batches_is_kept_once_whichever_batch_is_published_first(tmp_path):
    results = []
    for order in ((1, 2), (2, 1)):
        offline = tmp_path / f"offline{order}"
        sources = {
            1: _land(tmp_path / "landing" / "week1", [("A1", MAR4, 1.0)]),
            2: _land(tmp_path / "landing" / "week2", [("A1", MAR4, 7.0), ("B1", MAR4, 3.0)]),
        }
        for batch in order:
            _publish(sources[batch], offline, key_columns=["flight"])
        results.append(_day(offline, "2013-03-04"))
    pd.testing.assert_frame_equal(results[0], results[1])
    assert results[0][["flight", "arr_delay"]].values.tolist() == [["A1", 7.0], ["B1", 3.0]]


def test_a_batch_whose_columns_differ_is_refused_and_changes_nothing(tmp_path):
    offline = tmp_path / "offline"
    _publish(_land(tmp_path / "landing" / "week1", [("A1", MAR4, 1.0)]), offline)
    before = (offline / "flights" / "date=2013-03-04" / "part-0.parquet").read_bytes()
    other = tmp_path / "landing" / "week2"
    other.mkdir(parents=True)
    pq.write_table(
        pa.table({"flight": ["B1"], "time_hour": pa.array([MAR4], pa.timestamp("us", tz="UTC"))}),
        other / "batch.parquet",
    )
    with pytest.raises(MLOpsInputError, match=r"batch .*week2.* cannot be merged"):
        _publish(str(other), offline)
    assert (offline / "flights" / "date=2013-03-04" / "part-0.parquet").read_bytes() == before


def test_a_partition_published_before_batches_were_recorded_keeps_its_rows(tmp_path):
    offline = tmp_path / "offline"
    part = offline / "flights" / "date=2013-03-04" / "part-0.parquet"
    _publish(_land(tmp_path / "landing" / "old", [("A1", MAR4, 1.0)]), offline)
    # as an earlier version left it: the partition file only
    import shutil

    shutil.rmtree(offline / "_batches")
    assert part.exists()
    _publish(_land(tmp_path / "landing" / "week2", [("B1", MAR4, 3.0)]), offline)
    _publish(_land(tmp_path / "landing" / "week3", [("C1", MAR4, 4.0)]), offline)
    assert _day(offline, "2013-03-04")["flight"].tolist() == ["A1", "B1", "C1"]
