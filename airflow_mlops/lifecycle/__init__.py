"""lifecycle of airflow-mlops."""
