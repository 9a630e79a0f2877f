"""Work done in separate processes by the shared-state tests (a module of its own: processes started with
``spawn`` import the function they run by name)."""

from __future__ import annotations

import os
import time
from typing import Any


def increment(env: dict[str, str], default_dir: str, times: int, barrier: Any) -> None:
    """``times`` read-modify-writes of the counter ``test/counter``, each recording this process's pid,
    with a pause between the read and the write that a lost update would fall into."""
    os.environ.update(env)
    from airflow_mlops.hooks.state import MLOpsStateHook

    hook = MLOpsStateHook(default_dir=default_dir)
    hook.get("test", "warm-up")  # connect and create the table before the race starts
    barrier.wait(timeout=120)
    for _ in range(times):
        with hook.locked("test", "counter", default=lambda: {"n": 0, "by": []}) as doc:
            n = doc["n"]
            time.sleep(0.002)
            doc["n"] = n + 1
            doc["by"].append(os.getpid())


def race(env: dict[str, str], default_dir: str, times: int = 50) -> None:
    """Two processes, started with ``spawn`` (nothing inherited), each doing :func:`increment`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=increment, args=(env, default_dir, times, barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0, f"a worker failed (exit code {worker.exitcode})"
