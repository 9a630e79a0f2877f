"""Many models behind one endpoint, without a server: the least-recently-used cache under a memory budget,
one load for concurrent first requests, refused models, the deployments file, the 404 of an unknown model."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from airflow_mlops.exceptions import MLOpsConfigError, MLOpsError
from airflow_mlops.ml.multi_model import (
    MB,
    DeploymentsWatcher,
    Loaded,
    ModelCache,
    ModelDeployment,
    read_deployments,
    register_deployment,
    restore_deployment,
)


class FakeProcess:
    """Models whose loading grows the process' memory by a known amount (what RSS would show)."""

    def __init__(self, sizes_mb: dict[str, float], delay: float = 0.0) -> None:
        self.sizes = sizes_mb
        self.delay = delay
        self.rss = 100 * MB
        self.loads: list[str] = []
        self.refuse: set[str] = set()

    def memory(self) -> int:
        return self.rss

    def load(self, deployment: ModelDeployment) -> Loaded:
        time.sleep(self.delay)
        if deployment.name in self.refuse:
            raise MLOpsError(f"record of {deployment.name} does not verify.")
        self.loads.append(deployment.name)
        self.rss += int(self.sizes[deployment.name] * MB)
        return Loaded(model=f"model {deployment.name}", version=deployment.version or "v1")


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def _cache(process: FakeProcess, executor, budget_mb: float) -> ModelCache:
    return ModelCache(
        process.load, lambda: int(budget_mb * MB), executor, memory=process.memory, release=lambda: None
    )


def _get(cache: ModelCache, *names: str) -> list:
    async def run():
        return [await cache.get(ModelDeployment(name)) for name in names]

    return asyncio.run(run())


def test_loading_past_the_budget_unloads_the_least_recently_used_which_reloads_on_its_next_request(executor):
    process = FakeProcess({"a": 10, "b": 10, "c": 10})
    cache = _cache(process, executor, budget_mb=25)
    _get(cache, "a", "b", "a")  # b is now the least recently used
    assert list(cache.models) == ["b", "a"] and cache.used_bytes() == 20 * MB
    _get(cache, "c")
    assert sorted(cache.models) == ["a", "c"], "loading c must unload b, the least recently used"
    assert cache.evictions == 1
    (b,) = _get(cache, "b")
    assert b.model == "model b" and process.loads == ["a", "b", "c", "b"]
    assert sorted(cache.models) == ["b", "c"], "a was used before c: it goes when b comes back"
    assert cache.models["c"].hits == 1 and cache.models["b"].memory_bytes == 10 * MB
    assert cache.models["b"].loads == 2 and cache.models["c"].loads == 1


def test_memory_is_what_loading_grew_the_process_by_and_never_less_than_before(executor):
    process = FakeProcess({"a": 12, "b": 3})
    cache = _cache(process, executor, budget_mb=14)
    _get(cache, "a", "b")  # b evicts a
    assert list(cache.models) == ["b"]
    process.sizes["a"] = 0  # the allocator reuses freed memory: the reload shows no growth
    _get(cache, "a")
    assert cache.models["a"].memory_bytes == 12 * MB and cache.models["a"].rss_delta_bytes == 0
    assert list(cache.models) == ["a"], "a is still charged 12 MB: b must go"


def test_concurrent_first_requests_load_the_model_once(executor):
    process = FakeProcess({"a": 1}, delay=0.2)
    cache = _cache(process, executor, budget_mb=100)

    async def run():
        return await asyncio.gather(*(cache.get(ModelDeployment("a")) for _ in range(20)))

    got = asyncio.run(run())
    assert process.loads == ["a"]
    assert all(g is got[0] for g in got) and got[0].hits == 20


def test_a_lowered_budget_unloads_the_least_recently_used_until_it_fits(executor):
    process = FakeProcess({"a": 10, "b": 10, "c": 10})
    budget = [100.0]
    cache = ModelCache(
        process.load, lambda: int(budget[0] * MB), executor, memory=process.memory, release=lambda: None
    )
    _get(cache, "a", "b", "c", "a")
    budget[0] = 15
    assert [m.name for m in cache.trim()] == ["b", "c"] and list(cache.models) == ["a"]


def test_a_model_alone_over_the_budget_stays_loaded_and_the_others_go(executor):
    process = FakeProcess({"a": 5, "big": 50})
    cache = _cache(process, executor, budget_mb=20)
    _get(cache, "a", "big")
    assert list(cache.models) == ["big"]


def test_a_refused_model_is_never_loaded_and_its_error_is_answered_without_retrying_at_once(executor):
    process = FakeProcess({"a": 1, "bad": 1})
    process.refuse.add("bad")
    cache = _cache(process, executor, budget_mb=100)
    _get(cache, "a")
    for _ in range(2):
        with pytest.raises(MLOpsError, match="does not verify"):
            _get(cache, "bad")
    assert list(cache.models) == ["a"] and process.loads == ["a"]


def test_a_newly_pinned_version_replaces_the_loaded_one(executor):
    process = FakeProcess({"a": 1})
    cache = _cache(process, executor, budget_mb=100)

    async def run():
        first = await cache.get(ModelDeployment("a", "v1"))
        same = await cache.get(ModelDeployment("a", None))  # production: whatever is loaded
        second = await cache.get(ModelDeployment("a", "v2"))
        return first, same, second

    first, same, second = asyncio.run(run())
    assert first is same and first.version == "v1" and second.version == "v2"
    assert cache.models["a"] is second and len(process.loads) == 2


# ------------------------------------------------------------------------------ the deployments file
def test_the_deployments_file_is_written_atomically_and_read_back(tmp_path):
    path = tmp_path / "multi" / "shared.models.json"
    assert read_deployments(path).models == {}, "no file yet: no model"
    assert register_deployment(path, "shared", "delays", "v1", memory_budget_mb=64, by="d/r/t") is None
    previous = register_deployment(path, "shared", "delays", "v2")
    register_deployment(path, "shared", "demand", None, feature_service="demand_fs")
    deployments = read_deployments(path)
    assert deployments.endpoint == "shared" and deployments.generation == 3
    assert deployments.models["delays"] == ModelDeployment("delays", "v2")
    assert deployments.models["demand"] == ModelDeployment("demand", None, "demand_fs")
    assert deployments.memory_budget_mb == 64
    restore_deployment(path, "delays", previous)
    restore_deployment(path, "demand", None)
    assert {n: d.version for n, d in read_deployments(path).models.items()} == {"delays": "v1"}
    assert not list(path.parent.glob(".*tmp*")), "no temporary file left behind"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not JSON"),
        ("[]", "is not a JSON object"),
        ('{"models": {"Bad Name!": {}}}', "not a valid model name"),
        ('{"models": {"a": {"version": 3}}}', "version 3"),
        ('{"models": {"a": "v1"}}', "gives model 'a' a str"),
        ('{"models": {}, "memory_budget_mb": -5}', "memory_budget_mb to -5"),
    ],
)
def test_a_bad_deployments_file_is_refused_naming_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "e.models.json"
    path.write_text(content)
    with pytest.raises(MLOpsConfigError, match="e.models.json") as err:
        read_deployments(path)
    assert problem in str(err.value)
    assert "MultiModelDeployOperator" in (err.value.fix or "")


def test_a_deploy_never_writes_a_file_the_server_would_refuse(tmp_path):
    path = tmp_path / "e.models.json"
    register_deployment(path, "e", "a", "v1")
    with pytest.raises(MLOpsConfigError):
        register_deployment(path, "e", "a", "v1", memory_budget_mb=0)
    assert read_deployments(path).models["a"].version == "v1"


def test_the_server_keeps_the_last_good_deployments_when_the_file_breaks(tmp_path):
    path = tmp_path / "e.models.json"
    register_deployment(path, "e", "a", "v1")
    watcher = DeploymentsWatcher(path, every=0)
    assert set(watcher.get().models) == {"a"} and watcher.error is None
    path.write_text("{broken")
    assert set(watcher.get().models) == {"a"} and "is not JSON" in watcher.error
    register_deployment(tmp_path / "other.json", "e", "b", None)
    (tmp_path / "other.json").replace(path)
    assert set(watcher.get().models) == {"b"} and watcher.error is None


# ------------------------------------------------------------------------------ HTTP, without a server
def test_an_unknown_model_gets_a_404_with_the_models_the_endpoint_serves(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from airflow_mlops.ml import multi_service
    from airflow_mlops.ml.service import ServeSettings, ServingState

    path = tmp_path / "shared.models.json"
    register_deployment(path, "shared", "delays", "v1")
    register_deployment(path, "shared", "demand", "v1")
    settings = multi_service.MultiSettings(
        endpoint="shared",
        deployments=path,
        memory_budget_mb=10,
        serve=ServeSettings.from_env(),
    )
    server = multi_service.MultiModelServer(settings, ServingState())
    monkeypatch.setattr(multi_service, "SERVER", server)
    monkeypatch.setattr(multi_service, "SETTINGS", settings)
    try:
        client = TestClient(multi_service.app)
        for path_ in ("/models/flights/predict", "/models/flights/predict_batch"):
            response = client.post(path_, json={"row": {}})
            assert response.status_code == 404
            assert response.json() == {
                "error": "model 'flights' is not deployed on endpoint 'shared'.",
                "models": ["delays", "demand"],
            }
        listing = client.get("/models").json()
        assert listing["endpoint"] == "shared" and listing["memory_budget_mb"] == 10
        assert {n: m["loaded"] for n, m in listing["models"].items()} == {"delays": False, "demand": False}
        ready = client.get("/ready").json()
        assert ready["ready"] and ready["models"] == ["delays", "demand"] and ready["loaded"] == []
    finally:
        server.close()


def test_concurrent_loads_run_in_the_load_thread_not_the_event_loop(executor):
    process = FakeProcess({"a": 1})
    seen: list[str] = []
    original = process.load

    def load(deployment):
        seen.append(threading.current_thread().name)
        return original(deployment)

    cache = ModelCache(load, lambda: 100 * MB, executor, memory=process.memory, release=lambda: None)
    _get(cache, "a")
    assert seen and seen[0] != threading.main_thread().name
