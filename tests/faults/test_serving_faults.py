"""Faults of a live deployment: the disk under the prediction log fills, the model server is killed, the
router is killed during a blue/green switch, the new version dies during the switch.

One deployment for the module (the real ``bentoml serve`` of two registered models behind the router, as
the deploy operator starts them). Its prediction log lives on a small tmpfs of its own (mounted at
``<state>/artifacts/predictions``, unmounted at the end), so "the disk is full" is a real ``ENOSPC``.
Requests are rows of 2013 flights, each with a (distance, hour) pair of its own, so the log rows of a test's requests are
found exactly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
from integration.serving.models import register, training_frame, write_model

from airflow_mlops.hooks.bentoml import BentoMLHook
from airflow_mlops.ml.prediction_log import read_records
from airflow_mlops.net import free_port
from airflow_mlops.operators.serving import BentoDeployOperator, LocalDeploymentTarget

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MODEL = "faults_serving"
API_KEY = "faults-api-key-123"
CONN = "bentoml_faults"
HEADERS = {"X-API-Key": API_KEY}
TMPFS_SIZE = "16m"


def _context(run_id: str = "manual__1") -> dict:
    return {"run_id": run_id, "ti": SimpleNamespace(dag_id="faults", run_id=run_id, task_id="deploy")}


_counter = iter(range(1, 10**9))


def _rows(n: int) -> list[dict]:
    """``n`` request rows, each with a (distance, hour) pair no other request of the module has (within the
    ranges the models' signature accepts: 100..4899 miles, hours 5..22)."""
    base = [("UA", "EWR"), ("B6", "JFK"), ("DL", "LGA"), ("AA", "JFK")]
    rows = []
    for i in range(n):
        carrier, origin = base[i % len(base)]
        number = next(_counter)
        rows.append(
            {
                "carrier": carrier,
                "origin": origin,
                "hour": 5 + (number // 4800) % 18,
                "distance": 100 + number % 4800,
                "month": 5,
            }
        )
    return rows


def _kill_tree(pid: int) -> None:
    """kill -9 a process and everything it started (``bentoml serve`` runs its workers in sessions of their
    own)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=10)


class Stream:
    """Clients sending single-row requests through the stable address until stopped; each answer or
    failure is kept with its time."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []  # (time, version)
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post("/predict", json={"row": _rows(1)[0]})
                    if answer.status_code == 200:
                        self.answers.append((time.monotonic(), answer.json()["model_version"]))
                    else:
                        self.failures.append((time.monotonic(), f"{answer.status_code}: {answer.text[:200]}"))
                except httpx.HTTPError as err:
                    self.failures.append((time.monotonic(), f"{type(err).__name__}: {err}"))
                    time.sleep(0.05)

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[SimpleNamespace]:
    state = tmp_path_factory.mktemp("faults-serving-state")
    predictions = state / "artifacts" / "predictions"
    predictions.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(predictions)], check=True
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AIRFLOW__MLOPS__STATE_DIR", str(state))
            env.setenv(
                f"AIRFLOW_CONN_{CONN.upper()}", json.dumps({"conn_type": "bentoml", "password": API_KEY})
            )
            yield from _served(tmp_path_factory.mktemp("faults-models"), predictions)
    finally:
        subprocess.run(["umount", "-l", str(predictions)], check=False)


def _served(tmp: Path, predictions: Path) -> Iterator[SimpleNamespace]:
    train = training_frame().sample(3000, random_state=1)
    versions = {
        "a": register(MODEL, write_model(tmp / "a", train, max_iter=5), train, entity_keys=["origin"]),
        "b": register(MODEL, write_model(tmp / "b", train, max_iter=10), train, entity_keys=["origin"]),
    }
    port = free_port()

    def deploy(version: str) -> dict:
        return BentoDeployOperator(
            task_id="deploy",
            model_name=MODEL,
            version=version,
            port=port,
            bentoml_conn_id=CONN,
            serve_env={"MLOPS_SERVE_LOG_FLUSH_SECONDS": "0.5"},
            deferrable=False,
            ready_timeout=180,
        ).execute(_context())

    target = LocalDeploymentTarget(BentoMLHook(), drain_timeout=10)
    try:
        first = deploy(versions["a"])
        yield SimpleNamespace(
            url=first["url"],
            versions=versions,
            deploy=deploy,
            target=target,
            predictions=predictions / MODEL,
            client=httpx.Client(base_url=first["url"], headers=HEADERS, timeout=30),
        )
    finally:
        target.teardown(MODEL)


def _logged(served, rows: list[dict]) -> int:
    """How many of ``rows`` are in the prediction log."""
    root = served.predictions
    days = sorted(p.name.removeprefix("date=") for p in root.glob("date=*")) if root.exists() else []
    keys = {(r["distance"], r["hour"]) for r in rows}
    records = read_records(str(root), days)
    return sum(1 for r in records if (r["request"].get("distance"), r["request"].get("hour")) in keys)


def _wait_logged(served, rows: list[dict], timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (found := _logged(served, rows)) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the ballast file."""
    ballast = folder / "ballast.bin"
    with open(ballast, "wb", buffering=0) as out:  # unbuffered: nothing left to write at close
        for size in (1 << 16, 512, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass
    return ballast


def test_disk_full_under_the_prediction_log(served, fault):
    """The disk under the prediction log fills up while the model serves.

    Every request is still answered; once the disk is freed every answered prediction is in the log
    (nothing lost), including those made while it was full.
    """
    before = _rows(20)
    assert served.client.post("/predict_batch", json={"rows": before}).status_code == 200
    assert _wait_logged(served, before) == len(before)

    ballast = _fill(served.predictions.parent)
    during = _rows(300)
    answered = 0
    for start in range(0, len(during), 50):
        reply = served.client.post("/predict_batch", json={"rows": during[start : start + 50]})
        answered += 50 if reply.status_code == 200 else 0
    time.sleep(3)  # several flushes fail meanwhile
    still = served.client.get("/ready").json()
    ballast.unlink()
    after = _rows(20)
    answered_after = (
        50 if served.client.post("/predict_batch", json={"rows": after}).status_code == 200 else 0
    )
    found = _wait_logged(served, during + after, timeout=30)
    lost = answered + len(after) - found
    fault(
        lost=lost,
        detail=f"{answered}/{len(during)} answered while full, {found} of {answered + len(after)} logged after",
    )
    assert answered == len(during) and answered_after and still.get("ready"), still
    assert lost == 0, f"{lost} answered predictions are missing from the log"


def test_model_server_killed(served, fault):
    """kill -9 the live model server (its whole process tree).

    The stable address answers at once with a 502 naming the cause (no hang); the deploy task's retry starts
    the same version again and switches to it: no request fails after the retry.
    """
    state = served.target.read_state(MODEL)
    version = state["active"]["version"]
    _kill_tree(state["active"]["pid"])
    started = time.monotonic()
    outage = served.client.post("/predict", json={"row": _rows(1)[0]})
    answered_in = time.monotonic() - started
    result = served.deploy(version)
    rows = _rows(100)
    failed = sum(served.client.post("/predict", json={"row": row}).status_code != 200 for row in rows)
    fault(
        lost=failed,
        unit="requests",
        detail=f"during the outage: {outage.status_code} in {answered_in:.2f} s; retry switched={result['switched']}",
    )
    assert outage.status_code == 502 and answered_in < 5, outage.text
    assert result["switched"] and result["version"] == version
    assert failed == 0


def test_router_killed_during_a_switch(served, fault, monkeypatch):
    """kill -9 the router while a new version starts (blue/green).

    The deploy starts the router again on the same port and completes the switch: the old version serves
    until the switch, the new one after it, no request fails once the router is back, and the old version
    is stopped.
    """
    state = served.target.read_state(MODEL)
    old_version, old_pid = state["active"]["version"], state["active"]["pid"]
    new_version = served.versions["b" if old_version == served.versions["a"] else "a"]
    real_start = LocalDeploymentTarget.start
    killed: list[float] = []

    def start_then_kill_router(self, spec):
        backend = real_start(self, spec)
        _kill_tree(self.read_state(MODEL)["router"]["pid"])
        killed.append(time.monotonic())
        return backend

    monkeypatch.setattr(LocalDeploymentTarget, "start", start_then_kill_router)
    with Stream(served.url) as stream:
        time.sleep(1)
        result = served.deploy(new_version)
        done = time.monotonic()
        time.sleep(2)
    after = [f for t, f in stream.failures if t > done]
    during = [f for t, f in stream.failures if t <= done]
    versions = [v for _, v in sorted(stream.answers)]
    fault(
        lost=len(after),
        unit="requests",
        detail=f"{len(during)} refused while the router was down ({done - killed[0]:.1f} s), "
        f"{len(stream.answers)} answered",
    )
    assert killed and result["switched"] and result["version"] == new_version
    assert versions[0] == old_version and versions[-1] == new_version
    assert after == []
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE


def test_new_version_killed_during_the_switch(served, fault, monkeypatch):
    """kill -9 the new version right after traffic moved to it, while the old one still runs.

    No client request fails (the router sends them to the old version, which is alive), and the stable
    address keeps answering with the old version after the deploy (which reports the failure).
    """
    state = served.target.read_state(MODEL)
    old_version = state["active"]["version"]
    new_version = served.versions["b" if old_version == served.versions["a"] else "a"]
    real_switch = LocalDeploymentTarget.switch

    def switch_then_kill_new(self, deployment, backend, router, **kwargs):
        real_switch(self, deployment, backend, router, **kwargs)
        if backend["version"] == new_version:
            _kill_tree(backend["pid"])

    monkeypatch.setattr(LocalDeploymentTarget, "switch", switch_then_kill_new)
    error = None
    with Stream(served.url) as stream:
        time.sleep(1)
        try:
            served.deploy(new_version)
        except Exception as err:  # the deploy may report the dead version; the clients must not notice
            error = err
        time.sleep(2)
    monkeypatch.undo()
    probe = served.client.post("/predict", json={"row": _rows(1)[0]})
    fault(
        lost=len(stream.failures),
        unit="requests",
        detail=f"{len(stream.answers)} answered; deploy {'raised ' + type(error).__name__ if error else 'returned'}; "
        f"afterwards {probe.status_code}; first failure: {stream.failures[0][1][:80] if stream.failures else '-'}",
    )
    assert stream.failures == []
    assert probe.status_code == 200 and probe.json()["model_version"] == old_version, probe.text
