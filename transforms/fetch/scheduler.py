"""Fetching many hosts at once, each within its own budget.

A pool of threads that takes URLs in arrival order lets one slow, throttled
or stalled host fill every thread while the others wait (head-of-line
blocking). Here each host has its own queue, and a fetch thread takes the
next job only from a host that has a free slot, whose turn by rate has come,
and none of whose earlier fetches is still waiting for its turn. So a host
holds at most its own slots, and hosts never wait for each other while
threads are free.

The fetch threads pick their next job themselves (no dispatcher thread): a
thread whose fetch ends takes the next one without a hand-off, and a thread
that takes a job wakes one more while others could start. A dispatcher cost
a thread switch and a Future per request, and on 2 cores its lock made the
first fetches of a bundle start one by one.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transforms.fetch.outcome import FetchResult
from transforms.fetch.fetcher import Fetcher
from transforms.fetch.politeness import Politeness


@dataclass
class Job:
    """One distinct URL to fetch, with whatever its caller needs back."""

    host: str
    url: str
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    payload: Any = None
    group: Any = None  # jobs of one host are taken from its groups in turn
    id: int = field(default_factory=itertools.count().__next__)


class _HostQueue:
    """One host's waiting jobs, taken from its groups (shards) in turn, so that
    its shards advance together: what is left when a run dies, or when a
    shard's group ends, is spread over all of them."""

    def __init__(self):
        self._groups: collections.OrderedDict = collections.OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._groups)

    def append(self, job: Job) -> None:
        self._groups.setdefault(job.group, collections.deque()).append(job)

    def popleft(self) -> Job:
        group, jobs = next(iter(self._groups.items()))
        job = jobs.popleft()
        if jobs:
            self._groups.move_to_end(group)
        else:
            del self._groups[group]
        return job


# Below this spacing between a host's requests a fetch thread may as well
# wait for its turn itself: the next one need not be held back.
SPACING_WORTH_WAITING_S = 0.005


class HostScheduler:
    """Per-host queues drained by `threads` fetch threads.

    `max_ready` bounds the results done but not yet `take`n, with those still
    in `after`: while that many wait (the caller is busy, e.g. inferring), no
    new fetch starts, so fetched bytes never pile up in memory.

    `after(job, result)` runs once a fetch ends (the image store's copy is
    made there); what it returns comes with the result. It runs on its own
    `after_threads`, not on the fetching thread: a fetch thread goes back to
    the network as soon as its answer is in, and making copies (decoding and
    encoding pictures, CPU work that releases the GIL) takes at most that
    many cores from the model however many fetches are in flight.
    """

    def __init__(self, fetcher: Fetcher, politeness: Politeness, threads: int,
                 max_ready: int = 0,
                 after: Optional[Callable[[Job, FetchResult], Any]] = None,
                 after_threads: int = 2):
        self._fetcher = fetcher
        self._after = after
        self._politeness = politeness
        self._threads = max(1, int(threads))
        self._max_ready = max_ready or max(64, 2 * self._threads)
        self._after_pool = (concurrent.futures.ThreadPoolExecutor(
            max(1, after_threads), thread_name_prefix="fetch-after") if after else None)
        self._making = 0  # fetched, waiting for or inside `after`
        # One lock, two conditions: fetch threads are woken only when one may
        # start something, the taker only when a result is in. Every needless
        # wake-up is a thread switch and a GIL hand-off, and those, not the
        # network, were most of the CPU a fetch cost.
        self._cond = threading.Condition()
        self._results = threading.Condition(self._cond)
        self._queues: dict[str, _HostQueue] = {}
        self._hosts: collections.deque = collections.deque()  # hosts with jobs, in turn
        self._running: collections.Counter = collections.Counter()
        self._awaiting: dict[str, int] = {}  # host -> id of the job waiting for its turn
        self._total_running = 0  # jobs on a fetch thread
        self._idle = 0  # fetch threads waiting for a job
        self._timer_deadline = math.inf  # when the idle thread timed for a turn wakes
        self._done: collections.deque = collections.deque()
        self._queued = 0
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"fetch-{i}", daemon=True)
                         for i in range(self._threads)]
        for worker in self._workers:
            worker.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            queue = self._queues.get(job.host)
            if queue is None:
                queue = self._queues[job.host] = _HostQueue()
                self._hosts.append(job.host)
            queue.append(job)
            self._queued += 1
            if self._idle:
                self._cond.notify()

    def pending(self) -> int:
        """Jobs submitted and not yet taken."""
        with self._cond:
            return self._queued + self._total_running + self._making + len(self._done)

    def take(self, block: bool) -> list[tuple[Job, FetchResult, Any]]:
        """Finished jobs (job, result, what `after` made of it); with `block`,
        waits until at least one is finished (or nothing is pending)."""
        with self._cond:
            while block and not self._done and (self._queued or self._total_running
                                                or self._making):
                self._results.wait()
            if not self._done:
                return []
            held_back = len(self._done) + self._making >= self._max_ready
            done, self._done = list(self._done), collections.deque()
            if held_back and self._queued:  # room again for fetches the bound held back
                self._cond.notify()
            return done

    def reset(self) -> None:
        """Forgets the jobs not started yet and the results not taken: a bundle
        that failed left them, and its retry submits its own. Fetches already
        running end; their results come back from `take` and the caller
        recognises them by their payload."""
        with self._cond:
            self._queues.clear()
            self._hosts.clear()
            self._queued = 0
            self._done.clear()
            self._wake_all()

    def close(self) -> None:
        """Fetch threads end once their fetch does; results are no longer made."""
        with self._cond:
            self._closed = True
            self._wake_all()
        if self._after_pool is not None:
            self._after_pool.shutdown(wait=False, cancel_futures=True)

    def _wake_all(self) -> None:
        """Called holding the lock, when everything may have changed."""
        self._cond.notify_all()
        self._results.notify_all()

    # -- the fetch threads

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._claim()
            if job is None:
                return
            self._run(job)

    def _claim(self) -> Optional[Job]:
        """The next job this thread may start, waiting until there is one;
        None once closed. Called holding `_cond`."""
        while not self._closed:
            job, wake = self._next_startable()
            if job is not None:
                if self._queued and self._idle:
                    self._cond.notify()  # another may start too, or wait for a turn
                return job
            self._idle += 1
            deadline = None if wake is None else time.monotonic() + wake
            if deadline is not None and deadline < self._timer_deadline:
                # This thread sleeps until the next turn by rate; the others
                # until woken (a turn found later than the timer's is its).
                self._timer_deadline = deadline
                self._cond.wait(wake)
                if self._timer_deadline == deadline:
                    self._timer_deadline = math.inf
            else:
                self._cond.wait()
            self._idle -= 1
        return None

    def _next_startable(self) -> tuple[Optional[Job], Optional[float]]:
        """Takes the next job whose host may go now, hosts in turn; else
        returns how long until one may (None: until something changes)."""
        if not self._queued or len(self._done) + self._making >= self._max_ready:
            return None, None
        wake: Optional[float] = None
        for _ in range(len(self._hosts)):
            host = self._hosts[0]
            self._hosts.rotate(-1)
            if self._running[host] >= self._politeness.capacity(host):
                continue
            if host in self._awaiting and \
                    self._politeness.interval(host) > SPACING_WORTH_WAITING_S:
                continue
            wait = self._politeness.wait_before_send(host)
            if wait > 0:
                wake = wait if wake is None else min(wake, wait)
                continue
            queue = self._queues[host]
            job = queue.popleft()
            if not queue:
                del self._queues[host]
                self._hosts.pop()  # the host just turned to the end
            self._queued -= 1
            self._running[host] += 1
            self._total_running += 1
            self._awaiting[host] = job.id
            return job, None
        return None, wake

    def _sent(self, job: Job) -> None:
        if self._awaiting.get(job.host) != job.id:  # the usual case: no lock to take
            return  # (only a thread taking a newer job sets it, under the lock)
        with self._cond:
            if self._awaiting.get(job.host) == job.id:
                del self._awaiting[job.host]
                if job.host in self._queues and self._idle:  # its next fetch may go now
                    self._cond.notify()

    def _free_slot(self, job: Job) -> None:
        """Gives back the host's slot (called holding `_cond`)."""
        if self._awaiting.get(job.host) == job.id:
            del self._awaiting[job.host]
        self._running[job.host] -= 1
        if not self._running[job.host]:
            del self._running[job.host]

    def _run(self, job: Job) -> None:
        try:
            result = self._fetcher.fetch(job.url, etag=job.etag,
                                         last_modified=job.last_modified,
                                         on_send=lambda: self._sent(job))
        except BaseException as exc:  # fetch never raises; if it did, the job still ends
            result = FetchResult(False, reason="internal_error", detail=repr(exc)[:300],
                                 final_url=job.url)
        with self._cond:  # the host's slot is free once the answer is in
            self._free_slot(job)
            self._total_running -= 1
            if self._after is None:
                self._done.append((job, result, None))
                self._results.notify_all()
            else:
                self._making += 1
            # No one is woken: this thread takes the next job itself
            # (`_claim`), and wakes another there if more could start.
        if self._after is not None:
            try:
                self._after_pool.submit(self._finish, job, result)
            except RuntimeError:  # closed meanwhile: nobody takes results any more
                with self._cond:
                    self._making -= 1
                    self._results.notify_all()

    def _finish(self, job: Job, result: FetchResult) -> None:
        try:
            extra = self._after(job, result)
        except BaseException as exc:  # `after` reports its own failures; if not, say so
            extra = exc
        with self._cond:
            self._making -= 1
            self._done.append((job, result, extra))
            self._results.notify_all()
