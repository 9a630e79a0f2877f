"""ml of airflow-mlops."""
