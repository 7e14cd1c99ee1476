"""One run at a time per output folder: a lease that a crashed run cannot keep.

Two runs writing the same `--output` at once would both fetch the same
images (twice each host's limits) and race to publish. So a run takes
`OUTPUT/LEASE` at launch, before anything is fetched, renews it while it
runs (the launcher waits for the job on every runner), and gives it back at
the end. A second run finds it held and stops with a message naming the
first. The lease expires `TTL_S` seconds after its last renewal, so a run
that was killed (SIGKILL, a lost machine) blocks the folder for at most that
long; it is never forever. A holder on the same machine whose process is
gone is recognised at once (a rerun after a crash or Ctrl-C need not wait).

Taking a free or expired lease writes it and reads it back after a moment,
so of two runs starting together only one goes on. (On gs:// this is a
check, not a lock: two launches within the same second could both proceed.)
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from typing import Iterator, Optional

import fsspec

from transforms.write.snapshot import join, write_atomically

LEASE = "LEASE"
TTL_S = float(os.environ.get("GBIF_EMBED_LEASE_SECONDS", "120"))
SETTLE_S = 0.3  # between writing a lease and reading it back


class LeaseHeld(ValueError):
    """Another run holds the output folder."""


def _now() -> float:
    return time.time()


def _process_start(pid: int):
    """When a process started (clock ticks since boot), or None when there is no
    such process: with the pid it names one process, pid reuse aside."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


class Lease:
    def __init__(self, output: str, snapshot: str, command: str = ""):
        self.path = join(output, LEASE)
        self.output = output
        self.holder = {"snapshot": snapshot, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_started": _process_start(os.getpid()),
                       "started_at": _iso(_now()), "command": command[:500]}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def read(self) -> Optional[dict]:
        fs, _, (path,) = fsspec.get_fs_token_paths(self.path)
        fs.invalidate_cache()
        try:
            with fs.open(path, "r") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> None:
        held = self.read()
        if held is not None and not self._expired(held) and not self._ours(held) \
                and not self._holder_gone(held):
            raise LeaseHeld(self._message(held))
        self._write()
        time.sleep(SETTLE_S)
        held = self.read()
        if held is None or not self._ours(held):
            raise LeaseHeld(self._message(held or {}))
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.read()
        if held is not None and self._ours(held):
            fs, _, (path,) = fsspec.get_fs_token_paths(self.path)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)

    def _write(self) -> None:
        now = _now()
        write_atomically(self.path, json.dumps(dict(
            self.holder, renewed_at=_iso(now), renewed_at_s=now, expires_at=_iso(now + TTL_S),
            ttl_s=TTL_S), indent=2))

    def _renew(self) -> None:
        while not self._stop.wait(TTL_S / 4):
            try:
                self._write()
            except OSError:  # a missed renewal is retried; TTL_S is four of them
                continue

    def _ours(self, held: dict) -> bool:
        return (held.get("snapshot") == self.holder["snapshot"]
                and held.get("pid") == self.holder["pid"])

    @staticmethod
    def _holder_gone(held: dict) -> bool:
        """A holder on this machine whose process no longer runs (killed, or
        ended without giving the lease back): its lease need not expire first."""
        if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            return False
        return _process_start(held["pid"]) != held.get("pid_started")

    @staticmethod
    def _expired(held: dict) -> bool:
        renewed = held.get("renewed_at_s")
        ttl = held.get("ttl_s") or TTL_S
        return not isinstance(renewed, (int, float)) or _now() > renewed + ttl

    def _message(self, held: dict) -> str:
        renewed = held.get("renewed_at_s")
        ago = f"{_now() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else "?"
        return (f"another run is writing to {self.output}: {held.get('snapshot', '?')}, "
                f"started {held.get('started_at', '?')} on {held.get('host', '?')} "
                f"(pid {held.get('pid', '?')}), lease renewed {ago}, expires "
                f"{held.get('expires_at', '?')}. Two runs on one output would fetch every "
                f"image twice; wait for it to finish (a run that died gives the folder back "
                f"when its lease expires, or delete {self.path} if you are sure it is gone)")


@contextlib.contextmanager
def held(output: str, snapshot: str, command: str = "") -> Iterator[Lease]:
    lease = Lease(output, snapshot, command)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
