"""The flight-delay model's lifecycle DAGs, built from ``flights.yaml`` next to this file.

DAGs: flights_ingest, flights_features, flights_train, flights_monitor. Change the model's lifecycle
by editing the spec (docs/lifecycle-spec.md), not this file.
"""

from pathlib import Path

from airflow_mlops.lifecycle import lifecycle_dags

globals().update(lifecycle_dags(Path(__file__).with_name("flights.yaml")))
