"""The React bundle of the model pages, as Airflow's UI loads it (airflow_mlops/plugins/ui, docs/ui.md
"Pages").

Airflow's UI imports the bundle as an ES module after setting its own React, router and Chakra UI on
``globalThis``, then renders ``globalThis[<react app name>]`` (else ``globalThis.AirflowPlugin``). These
tests import the built file the same way in Node with stand-ins for those globals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from airflow_mlops.plugins.mlops_plugin import MLOpsPlugin

UI = Path(__file__).parents[3] / "airflow_mlops" / "plugins" / "ui"
BUNDLE = UI / "dist" / "main.js"
HOST_GLOBALS = ["React", "ReactDOM", "ReactJSXRuntime", "ReactRouterDOM", "ChakraUI", "EmotionReact"]
#: what Airflow's UI reads after importing each app's bundle_url
PROBE = """
for (const name of %(globals)s) globalThis[name] = {};
const apps = %(apps)s;
const found = {};
for (const [name, query] of apps) {
  globalThis.AirflowPlugin = undefined;  // Airflow's UI resets it before each import
  await import(%(url)s + query);
  found.AirflowPlugin ??= typeof globalThis.AirflowPlugin;  // the export, set by the first run
  found[name] = typeof (globalThis[name] ?? globalThis.AirflowPlugin);
}
console.log(JSON.stringify(found));
"""


@pytest.fixture(scope="module")
def bundle() -> Path:
    if not BUNDLE.is_file():
        pytest.fail(f"{BUNDLE} is not built: run `make ui-bundle` (make install builds it)")
    return BUNDLE


def test_each_react_app_of_the_plugin_finds_a_component_in_the_bundle(bundle, tmp_path):
    """A name the plugin registers that the bundle does not define, or a bundle that does not run without
    its own React, shows "Component failed to load" in Airflow's UI instead of the page. Each app is
    imported at its own bundle_url (the query string included), in the plugin's order."""
    node = shutil.which("node")
    assert node, "Node.js is needed to build and check the UI bundle (see docs/ui.md, Pages)"
    module = tmp_path / "main.mjs"  # an ES module, as the browser's import() takes it
    shutil.copy(bundle, module)
    apps = [(app["name"], urlsplit(app["bundle_url"]).query) for app in MLOpsPlugin.react_apps]
    assert {urlsplit(app["bundle_url"]).path for app in MLOpsPlugin.react_apps} == {"mlops/ui/main.js"}
    names = [name for name, _ in apps]
    script = PROBE % {
        "globals": json.dumps(HOST_GLOBALS),
        "apps": json.dumps([[name, f"?{query}" if query else ""] for name, query in apps]),
        "url": json.dumps(module.as_uri()),
    }
    run = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {**{name: "function" for name in names}, "AirflowPlugin": "function"}


def test_the_bundle_uses_the_react_and_chakra_of_airflows_ui(bundle):
    """A second React copy in the bundle breaks hooks inside Airflow's tree and a second Chakra UI loses
    Airflow's theme; both would also make the page slow to load (the bundle is a few tens of kB)."""
    text = bundle.read_text()
    head = text[:600]
    for name in HOST_GLOBALS[:1] + HOST_GLOBALS[2:5]:
        assert f".{name}" in head, f"the bundle does not take {name} from Airflow's UI: {head}"
    assert "AirflowPlugin" in head
    assert "__CLIENT_INTERNALS_DO_NOT_USE" not in text  # React's own code
    assert "createSystem" not in text  # Chakra UI's own code
    assert len(text.encode()) < 150_000
