"""The airflow-mlops UI plugin: model pages inside Airflow's UI, their JSON API and the reports of tasks.

Registered through the ``airflow.plugins`` entry point only (not also in ``get_provider_info``: Airflow
loads provider plugins as well when ``[core] lazy_discover_providers`` is off, and then skipped the second
registration with a plugin import error). It adds:

- the FastAPI app at ``<base_url>mlops/`` (:mod:`airflow_mlops.plugins.api`): ``api/...`` (JSON),
  ``reports/<path>`` (task reports, sandboxed, authorized per DAG) and ``ui/main.js`` (the React bundle);
- three React apps (``react_apps``) of that bundle: "MLOps Models" in the navigation, "MLOps Model" on DAG
  runs and "MLOps Report" on task instances.

This module stays light: every task process loads the plugins (for their listeners), so the app and
Airflow's API server modules are imported only when the API server asks for ``fastapi_apps``.
See ``docs/ui.md``.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/mlops"
#: the React bundle, relative to the UI's base URI
BUNDLE_URL = "mlops/ui/main.js"
#: browser path of the Models page (``plugin/<url_route>``)
MODELS_ROUTE = "mlops-models"


def base_url() -> str:
    """Airflow's ``[api] base_url`` ending with ``/`` (``/`` when it is not set)."""
    from airflow.configuration import conf

    value = (conf.get("api", "base_url", fallback="") or "").strip()
    if not value:
        return "/"
    return value.rstrip("/") + "/"


def artifact_url(uri: str) -> str | None:
    """The browser URL of artifact ``uri`` served by the plugin (``<base_url>mlops/reports/<path>``),
    for extra links; None when it is outside the artifact root."""
    from airflow_mlops.config import load_settings

    root = load_settings().artifact_root.rstrip("/") + "/"
    if not uri.startswith(root):
        return None
    return f"{base_url()}mlops/reports/{uri[len(root) :]}"


def model_page_url(model: str) -> str:
    """The browser URL of a model's page: ``<base_url>plugin/mlops-models/<model>``."""
    return f"{base_url()}plugin/{MODELS_ROUTE}/{quote(model, safe='')}"


@functools.cache
def served_app() -> Any:
    """The app the API server mounts, built once, when it asks for the plugin's apps.

    Not at import: every task process loads the plugins (for their listeners), and the app imports the
    API server's security module (~1.1 s of each task's start on a 2-core machine, measured in ``make
    demo``'s task logs between "Pre Execute" and "DAG bundles loaded").
    """
    return create_app()


def create_app(**kwargs: Any) -> Any:
    """A new FastAPI app of the plugin (:func:`airflow_mlops.plugins.api.create_app`)."""
    from airflow_mlops.plugins.api import create_app as build

    return build(**kwargs)


class MLOpsPlugin(AirflowPlugin):
    """Registers the plugin's app and its React pages."""

    name = "airflow_mlops"

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # a property: only the API server reads it (airflow.plugins_manager.get_fastapi_plugins)
        return [{"app": served_app(), "url_prefix": URL_PREFIX, "name": "MLOps"}]

    # One bundle, three apps. The Airflow UI imports ``bundle_url`` and reads ``globalThis.AirflowPlugin``
    # after resetting it; a module imported once is not run again, so each app gets its own URL (a query
    # string) and the bundle runs once per app. The component tells them apart by its props (dagId, runId,
    # taskId) and the location.
    react_apps = [
        {
            "name": "MLOps Models",
            "bundle_url": BUNDLE_URL,
            "destination": "nav",
            "url_route": MODELS_ROUTE,
            "nav_top_level": True,
        },
        {
            "name": "MLOps Model",
            "bundle_url": f"{BUNDLE_URL}?app=run",
            "destination": "dag_run",
            "url_route": "mlops-run",
        },
        {
            "name": "MLOps Report",
            "bundle_url": f"{BUNDLE_URL}?app=task",
            "destination": "task_instance",
            "url_route": "mlops-task",
        },
    ]
