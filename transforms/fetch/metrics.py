"""Fetch metrics counted on pool threads, handed to Beam on the bundle's thread."""
from __future__ import annotations

import threading
from typing import Any

from apache_beam.metrics import Metrics


class MetricBuffer:
    """Beam metrics updated from pool threads would be lost: Beam keeps the
    metrics container per thread. Counts are kept here and moved into Beam
    from the bundle's own thread in `flush`."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._latencies: list[int] = []
        self._counters: dict[str, Any] = {}
        self._latency = Metrics.distribution(namespace, "latency_ms")

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def latency_ms(self, ms: int) -> None:
        with self._lock:
            self._latencies.append(ms)

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            latencies, self._latencies = self._latencies, []
        for name, n in counts.items():
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(self._namespace, name)
            counter.inc(n)
        for ms in latencies:
            self._latency.update(ms)
