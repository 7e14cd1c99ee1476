"""Live progress counts from local workers to the launcher.

Beam metrics of the local runner can be read only after the run, so for a
live display the launcher listens on a loopback UDP port and names it in the
environment; worker processes of a local run (threads or subprocesses)
inherit it and send their cumulative counts twice a second. Where the
variable is not set (Dataflow, Flink, tests) reporting costs nothing.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from typing import Optional

ENV = "GBIF_EMBED_PROGRESS"
INTERVAL_S = 0.5


class _Reporter:
    """One per process: counts, and a daemon thread that sends them."""

    def __init__(self, address: tuple[str, int]):
        self._address = address
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        threading.Thread(target=self._loop, daemon=True, name="progress").start()

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n

    def send(self) -> None:
        with self._lock:
            message = json.dumps({"pid": os.getpid(), "counts": dict(self._counts)})
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            pass  # the launcher is gone or busy: progress is best effort

    def _loop(self) -> None:
        while True:
            time.sleep(INTERVAL_S)
            self.send()


_reporter: Optional[_Reporter] = None
_reporter_lock = threading.Lock()


def report(name: str, n: int = 1) -> None:
    """Counts `n` more of `name` (fetched, embedded, failed) for the display."""
    global _reporter
    if _reporter is None:
        value = os.environ.get(ENV)
        if not value:
            return
        with _reporter_lock:
            if _reporter is None:
                host, _, port = value.rpartition(":")
                _reporter = _Reporter((host, int(port)))
    _reporter.add(name, n)


def flush() -> None:
    """Sends now, so that the last counts arrive before a bundle's end."""
    if _reporter is not None:
        _reporter.send()


class Listener:
    """The launcher's end: sums the latest cumulative counts of every process."""

    def __init__(self, base: Optional[dict] = None):
        # Counts the launcher knows before the pipeline starts (what planning
        # read and finished: transforms/compare/planning.py), added to the workers'.
        self._base = dict(base or {})
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._latest: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="progress-listener")

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()
        return f"{host}:{port}"

    def __enter__(self) -> "Listener":
        os.environ[ENV] = self.address
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        os.environ.pop(ENV, None)
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()

    def totals(self) -> dict[str, int]:
        with self._lock:
            totals: collections.Counter = collections.Counter(self._base)
            for counts in self._latest.values():
                totals.update(counts)
        return dict(totals)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self._socket.recvfrom(65536)
                message = json.loads(data)
            except (socket.timeout, OSError, ValueError):
                continue
            with self._lock:
                self._latest[int(message["pid"])] = message["counts"]
