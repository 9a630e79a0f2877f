"""Import once, before Airflow forks its task processes, the libraries the provider's tasks use.

Every Airflow 3 task runs in a process of its own, forked from an executor worker, and the provider's
operators import their libraries inside ``execute`` (DAG parsing stays light). On a 2-core machine that
import is most of a short task: Great Expectations ~12 s, Evidently ~15 s, Feast ~8 s, scikit-learn
~9 s, LightGBM ~6 s, each time. Airflow 3.3 can have its ``multiprocessing`` fork server import modules
up front (``[core] mp_forkserver_preload``, used when ``mp_start_method`` is ``forkserver``); the
LocalExecutor's workers start from that server and the task processes fork from the workers, so every
task finds these modules imported, shared copy-on-write::

    [scheduler]
    mp_start_method = forkserver
    [core]
    mp_forkserver_preload = airflow_mlops.preload

(environment: ``AIRFLOW__SCHEDULER__MP_START_METHOD=forkserver``,
``AIRFLOW__CORE__MP_FORKSERVER_PRELOAD=airflow_mlops.preload``). The fork server pays the imports once
when the scheduler starts its first worker. See docs/scaling.md ("Task start-up").

Only imports: nothing here starts a thread, opens a file or connects anywhere, so a fork after it is as
safe as the fork of a fresh interpreter. A library that is not installed is skipped. Ray is left out:
``ray.init`` in a task starts its own processes, and the tuning task is one per training.
"""

from __future__ import annotations

import gc
import importlib
import logging

log = logging.getLogger(__name__)

#: what the provider's tasks import, in the order they are needed
MODULES = (
    "pandas",
    "pyarrow.parquet",
    "sklearn.pipeline",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.compose",
    "sklearn.impute",
    "sklearn.preprocessing",
    "lightgbm",
    "skops.io",
    "great_expectations",
    "great_expectations.core",
    "great_expectations.expectations.expectation_configuration",
    "great_expectations.render.renderer.page_renderer",
    "great_expectations.render.view.view",
    "feast",
    "feast.repo_operations",
    "feast.infra.offline_stores.duckdb",
    "evidently",
    "evidently.metrics",
    "evidently.presets",
    "bentoml",
    # last: Airflow's own modules (skops scans what is imported before it)
    "airflow.sdk",
    "airflow_mlops.artifacts",
    # what parsing a lifecycle DAG file imports (every task parses its DAG file first): the spec, the
    # factory and the operators it builds DAGs from
    "airflow_mlops.lifecycle",
    "airflow.providers.standard.operators.python",
    "airflow.providers.standard.sensors.date_time",
    "airflow_mlops.sensors.landing",
    "airflow_mlops.operators.validation",
    "airflow_mlops.operators.offline_store",
    "airflow_mlops.operators.features",
    "airflow_mlops.operators.drift",
    "airflow_mlops.operators.registry",
    "airflow_mlops.operators.tuning",
    "airflow_mlops.operators.serving",
    "airflow_mlops.operators.shadow",
    "airflow_mlops.operators.multi_model",
    "airflow_mlops.operators.batch_scoring",
)

#: modules this process failed to import (not installed): skipped
skipped: list[str] = []

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except ImportError as _err:  # an optional library of the provider that is not installed
        skipped.append(_name)
        log.debug("airflow_mlops.preload: %s not imported: %s", _name, _err)

# The modules' objects live as long as the process: out of the garbage collector's sight, a collection in
# a forked task neither spends time on them (~0.45 s for a full one here) nor copies the pages it would
# touch (Python's documented use of gc.freeze before fork).
gc.freeze()
