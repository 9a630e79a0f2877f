"""The plugin is registered once, whatever ``[core] lazy_discover_providers`` says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = (
    "from airflow import plugins_manager\n"
    "plugins, errors = plugins_manager._get_plugins()\n"
    "print('RESULT', [p.name for p in plugins].count('airflow_mlops'), sorted(errors))\n"
    "apps, views = plugins_manager._get_ui_plugins()\n"
    "print('RESULT', sorted(a['name'] for a in views if a.get('bundle_url', '').startswith('mlops/')))\n"
)


@pytest.mark.parametrize("lazy", ["True", "False"])
def test_airflow_loads_the_plugin_once_without_an_import_error(lazy):
    """With providers discovered eagerly, Airflow used to load the plugin from the provider info as well
    as from the entry point: "Plugin 'airflow_mlops' already registered" and a plugin import error shown
    on the UI's "Plugins" page. Run from the clone, as here, it also finds a second airflow-mlops
    distribution when the editable install's ``airflow_mlops.egg-info`` is left in the clone (``make install``
    removes it)."""
    env = {**os.environ, "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": lazy}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120, env=env
    )
    out = [line.removeprefix("RESULT ") for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert out[0] == "1 []", run.stdout + run.stderr[-2000:]
    assert "already registered" not in run.stdout + run.stderr
    assert out[1] == "['MLOps Model', 'MLOps Models', 'MLOps Report']"
