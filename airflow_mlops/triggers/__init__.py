"""triggers of airflow-mlops."""
