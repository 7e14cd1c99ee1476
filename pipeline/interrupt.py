"""Stopping a local run on Ctrl-C or SIGTERM: quickly, keeping what is finished.

Finished rows are already safe in the run's `parts/` (writers close a part
at least every `--checkpoint_seconds`), so stopping needs no cooperation from
the pipeline: the signal interrupts the launcher, which ends the local worker
processes it started (a SIGTERM reaches only the launcher; Ctrl-C reaches the
whole process group), counts the rows its parts hold, and says how to resume.
Nothing is published, so LATEST still names the previous snapshot.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from typing import Iterator, Optional, Sequence

import fsspec
import pyarrow.parquet as pq

from transforms.write.compact import part_files

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunStopped(Exception):
    """The run was stopped by a signal; `message` says what was kept."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Interrupted(BaseException):
    """Raised in the main thread by the signal handler (a BaseException, so
    that no `except Exception` on the way swallows it; Beam may still wrap it,
    so the signal is also kept in `Signals.received`)."""


class Signals:
    """What `stoppable` caught: the signal's number, once one arrived."""

    def __init__(self):
        self.received: Optional[int] = None


@contextlib.contextmanager
def stoppable(enabled: bool) -> Iterator[Signals]:
    """Turns SIGINT and SIGTERM into `Interrupted` while the body runs."""
    caught = Signals()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def interrupt(signum, _frame):
        if caught.received is None:
            caught.received = signum
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in EXIT_CODES}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(signum: int, folder: str, argv: Optional[Sequence[str]],
         note: str = "") -> RunStopped:
    """Ends this process's children and describes what the run kept (`note`:
    what became of a remote job, said first)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    _end_descendants()
    kept = {prefix: _rows(part_files(folder, prefix)) for prefix in ("embeddings", "failures")}
    command = "gbif-embed run " + " ".join(shlex.quote(a) for a in argv) if argv else \
        "the same gbif-embed run command"
    name = signal.Signals(signum).name
    said = f"{note}; " if note else ""
    message = (f"stopped by {name}: {said}kept {kept['embeddings']:,} embedded and "
               f"{kept['failures']:,} failed images in {folder}/parts (LATEST is unchanged).\n"
               f"To resume, run the same command again; it fetches and embeds only the rest:\n"
               f"  {command}")
    return RunStopped(message, EXIT_CODES.get(signum, 1))


def _rows(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with fsspec.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _end_descendants() -> None:
    """SIGKILL every process this one started, and theirs (the local runner's
    worker processes): they hold no state that is not already in parts."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(name))
    stack, found = [os.getpid()], []
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
