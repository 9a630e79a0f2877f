"""The plugin's registration: its app (built only in the API server) and its React pages."""

from __future__ import annotations

import subprocess
import sys

from airflow_mlops.plugins.mlops_plugin import MLOpsPlugin


def test_the_plugin_registers_the_app_and_its_react_pages():
    plugin = MLOpsPlugin()
    assert plugin.fastapi_apps[0]["url_prefix"] == "/mlops"
    assert plugin.fastapi_apps[0]["app"] is MLOpsPlugin().fastapi_apps[0]["app"]  # one app, mounted once
    apps = {a["name"]: a for a in MLOpsPlugin.react_apps}
    assert {n: (a["destination"], a["url_route"]) for n, a in apps.items()} == {
        "MLOps Models": ("nav", "mlops-models"),
        "MLOps Model": ("dag_run", "mlops-run"),
        "MLOps Report": ("task_instance", "mlops-task"),
    }
    # relative to the UI's base URI, and one URL per app: the UI imports each app's bundle_url once and
    # reads the global the bundle sets, so the same URL for two apps would give the second nothing
    urls = [a["bundle_url"] for a in apps.values()]
    assert all(u.startswith("mlops/ui/main.js") for u in urls) and len(set(urls)) == 3
    assert MLOpsPlugin.external_views == []  # the former "MLOps artifacts" menu entry: replaced by the pages


def test_loading_the_plugins_as_a_task_process_does_not_build_the_api_server():
    """Every task process loads the plugins for their listeners: the API server's modules (~1 s to
    import) are loaded only where the plugin's app is asked for."""
    script = (
        "import sys\n"
        "from airflow.listeners.listener import get_listener_manager\n"
        "get_listener_manager()\n"
        "from airflow import plugins_manager\n"
        "assert 'airflow_mlops' in [p.name for p in plugins_manager._get_plugins()[0]], 'plugin not loaded'\n"
        "print('RESULT', 'airflow.api_fastapi.app' in sys.modules)\n"
        "apps, _ = plugins_manager.get_fastapi_plugins()\n"
        "print('RESULT', [a['name'] for a in apps], 'airflow.api_fastapi.app' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    out = [line.removeprefix("RESULT ") for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert out == ["False", "['MLOps'] True"]
