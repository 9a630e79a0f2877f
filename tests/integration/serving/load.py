"""Clients that keep sending single-row ``/predict`` requests to a live endpoint while a deploy runs.

Shared by the live delivery tests and ``benchmarks/bench_delivery.py``: every failed request (a non-200
answer or a connection error) is kept, and the versions that answered are counted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx


class Load:
    """``clients`` threads sending ``{"row": ...}`` to ``url``/predict until the ``with`` block ends.

    :param settle: seconds of load before the block's body runs and after it ends (0: none).
    """

    def __init__(self, url: str, rows: list[dict], clients: int = 4, settle: float = 0.5) -> None:
        self.url, self.rows, self.settle = url, rows, settle
        self.sent = 0
        self.failures: list[str] = []
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = offset
            while not self._stop.is_set():
                try:
                    answer = client.post("/predict", json={"row": self.rows[i % len(self.rows)]})
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    else:
                        self.versions[answer.json()["model_version"]] += 1
                except httpx.HTTPError as err:
                    self.failures.append(f"{type(err).__name__}: {err}")
                self.sent += 1
                i += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        time.sleep(self.settle)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.settle)
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
