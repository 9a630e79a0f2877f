"""plugins of airflow-mlops."""
