"""airflow-mlops: the managed-ML lifecycle as an Apache Airflow 3 provider.

Importing this package is cheap on purpose: the scheduler parses DAG files often, so nothing here
imports the ML libraries (ray, feast, great_expectations, evidently, bentoml, sklearn, lightgbm, pandas).
They are imported inside ``execute()`` and hook methods, where the work happens.
"""

from __future__ import annotations

__version__ = "0.1.0"
