"""SQLite connect arguments for the Airflow components of ``tests/system/test_drift_retraining.py``.

Four components and their task processes write to one SQLite file on a loaded machine; the default
busy timeout (5 s) makes a writer give up ("database is locked") while another holds the lock. Loaded
through ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=sqlite_busy_timeout.CONNECT_ARGS``.
"""

CONNECT_ARGS = {"timeout": 60}
