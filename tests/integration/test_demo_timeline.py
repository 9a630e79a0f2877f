"""The demo's timeline from a recorded set of records: the month rows, the table, the PNG and HTML page."""

from __future__ import annotations

import base64
import re

import pytest

from airflow_mlops.demo.__main__ import main as demo_main
from airflow_mlops.demo.timeline import (
    Batch,
    DriftCheck,
    Records,
    Training,
    month_rows,
    render_table,
    write_timeline,
)


def _weeks(first: str, count: int, rows: int = 6400) -> list[Batch]:
    from datetime import date, timedelta

    start = date.fromisoformat(first)
    return [
        Batch(
            start=(start + timedelta(days=7 * i)).isoformat(),
            end=(start + timedelta(days=7 * i + 6)).isoformat(),
            state="success",
            rows=rows,
            run_id=f"backfill__{i}",
        )
        for i in range(count)
    ]


@pytest.fixture
def records() -> Records:
    batches = _weeks("2013-01-01", 9) + _weeks("2013-03-05", 4)  # 13 weeks, 2013-01-01 .. 2013-04-01
    batches[3] = Batch(start="2013-01-22", end="2013-01-28", state="failed", quarantined=True, run_id="bad")
    batches += _weeks("2013-06-25", 3)  # June 25, July 2, July 9
    checks = [
        DriftCheck(window_end="2013-06-24", drift_share=0.1, drifted=False, run_id="m1"),
        DriftCheck(window_end="2013-07-01", drift_share=0.62, drifted=True, drifted_columns=["dewp", "temp"]),
        DriftCheck(window_end="2013-07-08", drift_share=0.75, drifted=True, drifted_columns=["dewp", "temp"]),
    ]
    trainings = [
        Training(
            run_id="first_training",
            data_time="2013-03-31",
            trigger="manual",
            state="success",
            version="v1",
            promoted=True,
            production_version="v1",
            candidate_score=0.712,
            served_version="v1",
        ),
        Training(
            run_id="asset_triggered__a",
            data_time="2013-07-01",
            trigger="drift",
            state="success",
            cause={
                "event_id": "e1",
                "data_time": "2013-07-01",
                "drift_share": 0.62,
                "drifted_columns": {"temp": 1},
            },
            version="v2",
            promoted=True,
            production_version="v2",
            candidate_score=0.734,
            production_score=0.701,
            served_version="v2",
        ),
        Training(
            run_id="asset_triggered__b",
            data_time="2013-07-08",
            trigger="drift",
            state="success",
            proceed=False,
            reason="inside the cooldown: last retraining at data time 2013-07-01",
            cause={"event_id": "e2", "data_time": "2013-07-08", "drift_share": 0.75},
        ),
    ]
    return Records(batches=batches, checks=checks, trainings=trainings)


def test_month_rows_follow_what_ran(records):
    rows = {r.month: r for r in month_rows(records)}
    assert list(rows) == [f"2013-0{m}" for m in range(1, 8)]  # May had nothing, and is there
    january = rows["2013-01"]
    assert (january.passed, january.quarantined, january.rows) == (4, 1, 4 * 6400)
    assert january.validation == "4 passed, 1 quarantined"
    assert january.version is None and january.retraining == "no" and january.drift_share is None
    march = rows["2013-03"]
    assert march.retraining == "first training (by hand) -> v1 promoted"
    assert (march.version, march.auc) == ("v1", 0.712)
    assert (rows["2013-05"].rows, rows["2013-05"].validation, rows["2013-05"].version) == (0, "-", "v1")
    assert rows["2013-06"].drift_share == 0.1 and rows["2013-06"].version == "v1"
    july = rows["2013-07"]
    assert july.drift_share == 0.75
    assert "drift 0.62 on 2013-07-01 (temp) -> v2 promoted" in july.retraining
    assert (
        "1 event(s) held back by the gate (inside the cooldown: last retraining at data time 2013-07-01)"
        in (july.retraining)
    )
    assert (july.version, july.auc) == ("v2", 0.734)

    table = render_table(month_rows(records))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["month", "rows"] and len(lines) == 2 + 7
    assert re.search(r"^2013-07\s+12,800\s+2 passed\s+0\.75\s+drift 0\.62", lines[-1])
    assert re.search(r"\bv2\s+0\.734$", lines[-1])


def test_a_rejected_candidate_keeps_the_served_version_and_its_auc(records):
    records.trainings[1].promoted = False
    records.trainings[1].production_version = "v1"
    records.trainings[1].served_version = "v1"
    july = month_rows(records)[-1]
    assert "-> v2 rejected (0.734 vs 0.701)" in july.retraining
    assert (july.version, july.auc) == ("v1", 0.712)


def test_timeline_files_are_written_and_the_cli_redraws_them(records, tmp_path, monkeypatch, capsys):
    written = write_timeline(records, tmp_path)
    png = written["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    page = written["html"].read_text()
    assert page.count("<tr>") == 1 + 7  # header + one row per month
    assert "<td>2013-07</td><td>12,800</td><td>2 passed</td><td>0.75</td>" in page
    assert "1 event(s) held back by the gate" in page
    # self-contained: the chart is inlined, nothing is fetched
    inline = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert inline and base64.b64decode(inline.group(1)) == png
    assert "http://" not in page and "https://" not in page
    assert Records.from_json(written["json"].read_text()) == records

    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path))
    written["png"].unlink()
    assert demo_main(["timeline"]) == 0
    assert written["png"].exists()
    assert "2013-07" in capsys.readouterr().out
    monkeypatch.setenv("AIRFLOW__MLOPS__STATE_DIR", str(tmp_path / "empty"))
    assert demo_main(["timeline"]) == 2
    assert "no timeline records" in capsys.readouterr().err
