"""``python -m airflow_mlops.demo run``: the whole story on a real Airflow (see :mod:`airflow_mlops.demo.story`).

The environment names the demo's state: ``AIRFLOW__MLOPS__STATE_DIR`` (default ``$AIRFLOW_HOME/mlops``),
``AIRFLOW_HOME`` and ``AIRFLOW__CORE__DAGS_FOLDER`` (``make demo`` sets all three). Airflow's metadata
database is the PostgreSQL in ``<state>/postgres``, created and migrated at the first run
(:mod:`airflow_mlops.demo.postgres`).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from airflow_mlops.demo.story import Story, StoryPlan


def spec_cadence(default: str = "weekly") -> str:
    """The batch cadence of the flights lifecycle spec in ``[core] dags_folder`` (what its ingest DAG
    expects), else ``default``."""
    from pathlib import Path

    from airflow.sdk.configuration import conf

    path = Path(conf.get("core", "dags_folder")) / "flights.yaml"
    if not path.exists():
        return default
    from airflow_mlops.lifecycle import load_spec

    return load_spec(path).ingest.cadence


def main(
    *,
    cadence: str | None = None,
    last_day: str | None = None,
    keep_serving: bool = False,
) -> int:
    from airflow_mlops.config import check_settings, load_settings
    from airflow_mlops.exceptions import MLOpsError

    try:
        cadence = cadence or spec_cadence()
    except MLOpsError as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    plan = StoryPlan(cadence=cadence)  # type: ignore[arg-type]
    if last_day:
        plan = replace(plan, last_day=last_day)
    try:
        settings = load_settings()
        check_settings(settings)
        Story(state=settings.state_dir, plan=plan, keep_serving=keep_serving).run()
    except KeyboardInterrupt:
        print("\ninterrupted: Airflow's components were stopped; the state is kept (`make demo` resumes).")
        return 130
    except MLOpsError as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    return 0
