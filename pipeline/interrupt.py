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

from transforms.common import lease as lease_ttl
from transforms.write.compact import part_files

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LEASE_LOST_EXIT = 3  # the run stopped because it no longer held its lease
INCOMPLETE_EXIT = 4  # the job ended but its snapshot was not whole: not published
CANCEL_WAIT_S = 60.0  # how long a distributed job is watched after its cancellation


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
         lost: Optional[str] = None) -> RunStopped:
    """Ends this process's children and describes what the run kept. `lost`:
    why the run's lease was lost, when that (not a user's signal) stopped it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    _end_descendants()
    cause = f"stopped: {lost}" if lost else f"stopped by {signal.Signals(signum).name}"
    message = (f"{cause}: {_kept(folder)} (LATEST is unchanged).\n"
               f"To resume, run the same command again; it fetches and embeds only the rest:\n"
               f"  {_command(argv)}")
    return RunStopped(message, LEASE_LOST_EXIT if lost else EXIT_CODES.get(signum, 1))


def cancel(job, signum: int, folder: str, argv: Optional[Sequence[str]], leases: Sequence,
           lost: Optional[str] = None) -> RunStopped:
    """A distributed run stopped by a signal (or a lost lease): the launcher
    cancels its job, so that no worker fetches for a run that holds no lease.
    When the job is seen to end, the leases are given back (by the caller);
    when it is not, they are kept without expiry, naming the job, and the
    message says so: a later run is refused until someone removes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cause = f"stopped: {lost}" if lost else f"stopped by {signal.Signals(signum).name}"
    if job is None:
        return RunStopped(f"{cause} before the job was submitted; nothing runs.",
                          LEASE_LOST_EXIT if lost else EXIT_CODES.get(signum, 1))
    name = _job_id(job)
    ended, detail = _cancelled(job)
    code = LEASE_LOST_EXIT if lost else EXIT_CODES.get(signum, 1)
    resume = (f"To resume, run the same command again; it fetches and embeds only the rest:\n"
              f"  {_command(argv)}")
    if ended:
        return RunStopped(f"{cause}: cancelled the job {name} ({detail}); the lease is given "
                          f"back. {_kept(folder)} (LATEST is unchanged).\n{resume}", code)
    kept_for = []
    for lease in leases:
        try:
            lease.keep_until_job_ends(name)
            kept_for.append(lease.path)
        except Exception as err:  # the storage cannot be reached: the lease expires
            kept_for.append(f"{lease.path} (could not be marked: {err}; it expires in "
                            f"{lease.holder.get('ttl_s') or 'its'} s)")
    return RunStopped(
        f"{cause}: could not see the job {name} end ({detail}); it may still be running, "
        f"so its lease stays until it ends: {', '.join(kept_for)}. Cancel the job in its "
        f"runner's console: its workers keep the lease while they run, and it expires "
        f"{lease_ttl.TTL_S:.0f} s after the last one stops (delete the lease file(s) only if the "
        f"job never started a worker).\n{resume}",
        code)


def _cancelled(job) -> tuple[bool, str]:
    """Cancels a job and watches it end: (ended, its last state or the error)."""
    import time

    from apache_beam.runners.runner import PipelineState
    try:
        job.cancel()
    except Exception as err:
        return False, f"cancel failed: {type(err).__name__}: {err}"
    deadline = time.monotonic() + CANCEL_WAIT_S
    state = None
    while time.monotonic() < deadline:
        try:
            state = job.state
        except Exception as err:
            return False, f"its state cannot be read: {err}"
        if PipelineState.is_terminal(state):
            return True, f"state {state}"
        time.sleep(1.0)
    return False, f"still {state} after {CANCEL_WAIT_S:.0f} s"


def _job_id(job) -> str:
    for attribute in ("job_id", "_job_id"):
        value = getattr(job, attribute, None)
        value = value() if callable(value) else value
        if value:
            return str(value)
    return type(job).__name__


def _command(argv: Optional[Sequence[str]]) -> str:
    return "gbif-embed run " + " ".join(shlex.quote(a) for a in argv) if argv else \
        "the same gbif-embed run command"


COUNT_WAIT_S = 15.0  # counting the kept rows: storage that does not answer is not waited for


def _kept(folder: str) -> str:
    """What the run's parts hold, or why that cannot be said now."""
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        kept = pool.submit(lambda: {prefix: _rows(part_files(folder, prefix))
                                    for prefix in ("embeddings", "failures")}
                           ).result(timeout=COUNT_WAIT_S)
    except Exception as err:  # the storage itself may be what failed
        return (f"could not count the rows kept in {folder}/parts "
                f"({type(err).__name__}: {str(err) or f'no answer in {COUNT_WAIT_S:.0f} s'}); "
                f"what reached storage is kept")
    finally:
        pool.shutdown(wait=False)
    return (f"kept {kept['embeddings']:,} embedded and {kept['failures']:,} failed images in "
            f"{folder}/parts")


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
