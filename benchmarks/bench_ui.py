"""The UI's figures (issue 15), in one run, on a throw-away Airflow home (SQLite) of its own:

1. the model page of a model with 20 versions and a year of weekly drift checks (52, five columns each),
   loaded in headless Chromium (Debian's ``chromium`` through Playwright): the time from navigation start
   until the versions table shows its 20 rows, and until the drift charts show their 260 points, read in
   the browser (``performance.now()`` polled on each animation frame); median of ``--loads`` first loads
   of the page in a new browser context (after its login, which loads Airflow's own UI once) and of as
   many reloads in one context (our bundle cached too), and of as many clicks on the model's link on the
   Models page (a route inside Airflow's UI, which is not loaded again: how users reach the page), timed
   from the click. Also printed: when Airflow's UI asked for the plugin's bundle, the part of a page load
   spent before the plugin's code runs at all. Target: under 1 s.
2. the API server's start (``airflow api-server``, one worker) with and without the plugin: the time from
   the process start until ``/api/v2/monitor/health`` answers, median of ``--starts`` alternated starts.
   Without the plugin = the same command with the ``airflow.plugins`` entry point of airflow-mlops hidden
   from Airflow (a ``sitecustomize`` on ``PYTHONPATH`` filters the distribution's entry points; the plugin
   code is untouched). Target: under 10 % more with it.

    nice -n 19 .venv/bin/python benchmarks/bench_ui.py [--loads 7] [--starts 3]

The model's records are written with the project's own writers (``BentoMLHook.write_index`` in the
shape ``RegisterModelOperator``/``PromoteModelOperator`` record, ``record_drift_check`` with what
``EvidentlyDriftOperator`` returns): running 20 trainings and 52 monitor runs would take an hour and
measure the same page. The UI tests (tests/ui) check the pages on records the real operators wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
MODEL = "year_model"
VERSIONS = 20
CHECKS = 52
COLUMNS = {"temp": 4.0, "dewp": 3.0, "hour": 0.1, "distance": 0.1, "carrier": 0.1}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: what both kinds of start import first (a ``sitecustomize`` on ``PYTHONPATH``), so they differ by the plugin only
SITE = """
import importlib.metadata as _md

try:  # what Airflow reads entry points with on Python < 3.12
    import importlib_metadata as _imd
except ImportError:
    _imd = None
"""
#: ... and, without the plugin, hides airflow-mlops' ``airflow.plugins`` entry point from Airflow
HIDE_PLUGIN = (
    SITE
    + """

def _hide(module):
    entry_points = module.Distribution.entry_points

    def without_mlops_plugin(self):
        found = entry_points.fget(self)
        if (self.metadata["Name"] or "").lower().replace("_", "-") != "airflow-mlops":
            return found
        return module.EntryPoints([e for e in found if e.group != "airflow.plugins"])

    module.Distribution.entry_points = property(without_mlops_plugin)


for _module in (_md, _imd):
    if _module is not None:
        _hide(_module)
"""
)


def free_port() -> int:
    from airflow_mlops.net import free_port as port

    return port()


def environment(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__MLOPS__STATE_DIR": str(home / "mlops"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


# ------------------------------------------------------------------------------------------ the state
def write_year(env: dict[str, str]) -> None:
    """20 versions (one in production, the others archived or rejected, each with its gate decision) and
    52 weekly drift checks of model ``year_model``, in the state database of ``env``."""
    os.environ.update({k: env[k] for k in ("AIRFLOW__MLOPS__STATE_DIR", "AIRFLOW_HOME")})
    from airflow_mlops.hooks.bentoml import BentoMLHook
    from airflow_mlops.hooks.history import record_drift_check

    start = datetime(2013, 1, 7, tzinfo=UTC)
    index = {"model": MODEL, "production": None, "versions": {}, "history": []}
    production_score = None
    for i in range(VERSIONS):
        version = f"v{i:02d}{(i + 1) * 7919:014x}"
        at = (start + timedelta(weeks=i * 52 // VERSIONS)).isoformat()
        score = 0.70 + 0.003 * i + (0.01 if i % 3 == 0 else -0.004)
        promote = production_score is None or score >= production_score + 0.002
        entry = {
            "at": at,
            "action": "promote" if promote else "reject",
            "version": version,
            "previous_production": index["production"],
            "metric": "auc",
            "candidate_score": score,
            "production_score": production_score,
            "reason": "beats production" if promote else "does not beat production by 0.002 auc",
            "user": None,
            "dag_id": "year_train",
            "dag_run_id": f"train-{i:02d}",
        }
        record = {
            "version": version,
            "tag": f"{MODEL}:{version}",
            "stage": "rejected",
            "metric": "auc",
            "metrics": {"auc": score - 0.01, "log_loss": 0.5 - i * 0.001, "accuracy": 0.8 + i * 0.001},
            "training_manifest": {
                "uri": f"file:///tmp/{version}/manifest.json",
                "time_range": {
                    "start": (start + timedelta(weeks=i * 2 - 13)).isoformat(),
                    "end": (start + timedelta(weeks=i * 2)).isoformat(),
                },
            },
            "dag_id": "year_train",
            "dag_run_id": f"train-{i:02d}",
            "registered_at": at,
            "decisions": [entry],
        }
        index["versions"][version] = record
        if promote:
            if index["production"]:
                index["versions"][index["production"]]["stage"] = "archived"
            record["stage"], index["production"], production_score = "production", version, score
        index["history"].append(entry)
    BentoMLHook().write_index(MODEL, index)

    for week in range(CHECKS):
        interval = start + timedelta(weeks=week)
        shift = week / CHECKS
        columns = {
            name: {"score": threshold * (0.4 + 1.2 * shift), "method": "wasserstein", "threshold": threshold}
            for name, threshold in COLUMNS.items()
        }
        for figures in columns.values():
            figures["drifted"] = figures["score"] >= figures["threshold"]
        share = sum(f["drifted"] for f in columns.values()) / len(columns)
        result = {
            "model": MODEL,
            "model_version": index["production"],
            "window": {
                "start": interval.date().isoformat(),
                "end": (interval + timedelta(days=6)).date().isoformat(),
                "rows": 6000,
            },
            "drift_detected": share >= 0.3,
            "drift_share": share,
            "drift_share_threshold": 0.3,
            "columns": columns,
            "quality": {
                "metric": "auc",
                "score": 0.72 - 0.05 * shift,
                "holdout_score": 0.72,
                "decay": 0.05 * shift,
                "max_decay": 0.05,
            },
            "report_uri": None,
        }
        context = {
            "ti": SimpleNamespace(
                dag_id="year_monitor", run_id=f"scheduled__{interval.date()}", task_id="drift", map_index=-1
            ),
            "data_interval_start": interval,
            "data_interval_end": interval + timedelta(weeks=1),
        }
        record_drift_check(result, context)


# ------------------------------------------------------------------------------------------ the API server
@contextlib.contextmanager
def api_server(env: dict[str, str], logs: Path, *, plugin: bool):
    """``airflow api-server`` (one worker) on a free port; yields (url, seconds until it answered)."""
    port = free_port()
    site = logs / ("site-with" if plugin else "site-without")
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE if plugin else HIDE_PLUGIN)
    run_env = {**env, "PYTHONPATH": os.pathsep.join([str(site), env["PYTHONPATH"]])}
    airflow = str(Path(sys.executable).with_name("airflow"))
    with open(logs / f"api-server-{'with' if plugin else 'without'}.log", "ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [airflow, "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = started + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the API server did not start; see {log.name}")
            time.sleep(0.05)
        yield url, time.perf_counter() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def plugin_mounted(url: str) -> bool:
    import httpx

    # without the plugin Airflow's UI answers an unknown path with its own HTML page (200), not a 404
    answer = httpx.get(f"{url}/mlops/api/models", timeout=30)
    return answer.headers.get("content-type", "").startswith("application/json")


# ------------------------------------------------------------------------------------------ the page
ROWS = (
    "() => document.querySelectorAll('[data-testid=versions-row]').length >= %d ? performance.now() : false"
)
POINTS = "() => document.querySelectorAll('[data-testid=drift-column] [data-testid=chart-point]').length >= %d ? performance.now() : false"


#: when Airflow's UI asked for the plugin's bundle (its own start before that: the part the plugin cannot change)
BUNDLE = "() => (performance.getEntriesByType('resource').find(e => e.name.includes('/mlops/ui/main.js')) || {}).startTime ?? null"


def page_load(page, url: str) -> tuple[float, float, float]:
    """Milliseconds from navigation start to the 20 version rows, to the 260 drift points, and to the
    request of the plugin's bundle by Airflow's UI."""
    page.goto(f"{url}/plugin/mlops-models/{MODEL}", wait_until="commit")
    rows = page.wait_for_function(ROWS % VERSIONS, polling="raf", timeout=120_000).json_value()
    points = page.wait_for_function(
        POINTS % (CHECKS * len(COLUMNS)), polling="raf", timeout=120_000
    ).json_value()
    return float(rows), float(points), float(page.evaluate(BUNDLE) or "nan")


#: on the Models page: click the model's link (a route inside Airflow's UI: no page load), from that moment
CLICK = (
    "() => { window.__clicked = performance.now(); document.querySelector("
    "'[data-testid=models-row][data-key=%s] [data-testid=model-link]').click(); }"
)


def navigation(page, url: str) -> tuple[float, float, float]:
    """Milliseconds from the click on the model's link on the Models page (how a user reaches the model
    page inside Airflow's UI, which is not loaded again) to the 20 version rows and the 260 drift points."""
    page.goto(f"{url}/plugin/mlops-models")
    page.locator(f"[data-testid=models-row][data-key={MODEL}]").wait_for(timeout=120_000)
    page.evaluate(CLICK % MODEL)
    rows = page.wait_for_function(ROWS % VERSIONS, polling="raf", timeout=120_000).json_value()
    points = page.wait_for_function(
        POINTS % (CHECKS * len(COLUMNS)), polling="raf", timeout=120_000
    ).json_value()
    clicked = float(page.evaluate("() => window.__clicked"))
    return float(rows) - clicked, float(points) - clicked, 0.0


def measure_page(url: str, loads: int, shots: Path) -> dict[str, list[tuple[float, float, float]]]:
    from playwright.sync_api import sync_playwright

    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    executable = shutil.which("chromium")
    if executable is None:
        raise SystemExit("Debian's chromium is not installed: make system-packages")
    cold, warm = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            for i in range(loads):
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                page = context.new_page()
                page.goto(f"{url}/auth/token/login?next=/")  # all-admins: the session cookie, no form
                cold.append(page_load(page, url))
                if i == 0:
                    page.screenshot(path=str(shots / "bench-model-page.png"), full_page=True)
                context.close()
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(f"{url}/auth/token/login?next=/")
            page_load(page, url)
            for _ in range(loads):
                warm.append(page_load(page, url))
            clicks = [navigation(page, url) for _ in range(loads)]
            context.close()
        finally:
            browser.close()
    return {"cold": cold, "warm": warm, "click": clicks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=7, help="page loads per kind (median)")
    parser.add_argument("--starts", type=int, default=3, help="API server starts with and without the plugin")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, screenshot)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mlops-bench-ui-"))
    try:
        for folder in ("airflow", "dags", "mlops"):
            (home / folder).mkdir()
        env = environment(home)
        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=900)
        write_year(env)

        starts: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.starts):
            for plugin in (True, False):
                with api_server(env, home, plugin=plugin) as (url, seconds):
                    assert plugin_mounted(url) == plugin, f"the plugin is {'not ' if plugin else ''}mounted"
                    starts[plugin].append(seconds)

        with api_server(env, home, plugin=True) as (url, _):
            page = measure_page(url, args.loads, home)

        print(
            f"model page of {MODEL}: {VERSIONS} versions, {CHECKS} weekly drift checks x {len(COLUMNS)} columns"
        )
        for kind, label in (
            ("cold", "new browser context"),
            ("warm", "reload in one context"),
            ("click", "link on the Models page"),
        ):
            rows = statistics.median(r for r, _, _ in page[kind])
            points = statistics.median(p for _, p, _ in page[kind])
            bundle = statistics.median(b for _, _, b in page[kind])
            loaded = (
                "Airflow's UI already running"
                if kind == "click"
                else f"Airflow's UI asked for the plugin's bundle at {bundle:4.0f} ms"
            )
            print(
                f"  {label:<23} versions table {rows:5.0f} ms   drift charts {points:5.0f} ms   "
                f"({loaded}; median of {len(page[kind])}; target < 1000 ms: {'met' if rows < 1000 else 'NOT met'})"
            )
        with_plugin, without = statistics.median(starts[True]), statistics.median(starts[False])
        ratio = with_plugin / without
        print(
            f"API server start until /api/v2/monitor/health answers: with the plugin {with_plugin:.2f} s, "
            f"without {without:.2f} s (medians of {args.starts}); ratio {ratio:.3f} "
            f"({(ratio - 1) * 100:+.1f} %; target < +10 %: {'met' if ratio < 1.10 else 'NOT met'})"
        )
        print(json.dumps({"page_ms": page, "start_s": {"with": starts[True], "without": starts[False]}}))
        if args.keep:
            print(f"kept: {home}")
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
