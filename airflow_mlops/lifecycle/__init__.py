"""Reusable lifecycle DAGs: a YAML spec (:mod:`.spec`) and the factory that turns it into DAGs
(:mod:`.factory`). See docs/lifecycle-spec.md."""

from __future__ import annotations

from airflow_mlops.lifecycle.factory import lifecycle_dags
from airflow_mlops.lifecycle.spec import LifecycleSpec, LifecycleSpecError, load_spec

__all__ = ["LifecycleSpec", "LifecycleSpecError", "lifecycle_dags", "load_spec"]
