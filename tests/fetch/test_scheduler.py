"""The scheduler: its after-step (the store's copy) runs beside the fetches,
not on their threads; a host at its limit holds only its own slots; a turn
by rate is kept, and not slept through. Against a real loopback host that
counts requests and when they came."""
from __future__ import annotations

import threading
import time

from tests.fetch.test_fetch import JPEG, config
from tests.http_server import FaultServer
from transforms.fetch.fetcher import Fetcher
from transforms.fetch.politeness import Politeness
from transforms.fetch.scheduler import HostScheduler, Job


def _drain(scheduler: HostScheduler) -> list:
    """Every job submitted, once it is fetched and through the after-step."""
    done = []
    while scheduler.pending():
        done += scheduler.take(block=True)
    return done


def test_a_slow_after_step_does_not_hold_the_fetching_threads():
    """One fetching thread, one after-thread whose first call waits until the
    host has answered every URL: were the after-step on the fetching thread,
    the second fetch could never start and the wait would time out."""
    with FaultServer() as server:
        urls = [server.add(f"/s/{i}.jpg", JPEG) for i in range(4)]
        cfg = config(fetch_concurrency=1, per_host_concurrency=1)
        fetcher = Fetcher(cfg)
        all_fetched = threading.Event()
        waited = []

        def after(job, result):
            if not waited:
                waited.append(all_fetched.wait(timeout=10))
            return result.ok

        scheduler = HostScheduler(fetcher, fetcher.politeness, threads=1, after=after,
                                  after_threads=1)
        try:
            for url in urls:
                scheduler.submit(Job("127.0.0.1", url))
            deadline = threading.Event()
            for _ in range(200):
                if sum(server.hits(f"/s/{i}.jpg") for i in range(4)) == 4:
                    all_fetched.set()
                    break
                deadline.wait(0.05)
            done = _drain(scheduler)
        finally:
            scheduler.close()
            fetcher.close()
        assert waited == [True]
        assert sorted(job.url for job, _, _ in done) == sorted(urls)
        assert all(extra is True for _, _, extra in done)


def test_results_waiting_for_the_after_step_count_against_max_ready():
    """Fetched pictures waiting for their copy hold memory like results not
    taken: no new fetch starts while `max_ready` of them wait."""
    with FaultServer() as server:
        urls = [server.add(f"/m/{i}.jpg", JPEG) for i in range(6)]
        fetcher = Fetcher(config(fetch_concurrency=4, per_host_concurrency=4))
        release = threading.Event()
        scheduler = HostScheduler(fetcher, Politeness(4, 0), threads=4, max_ready=2,
                                  after=lambda job, result: release.wait(10),
                                  after_threads=1)
        try:
            for url in urls:
                scheduler.submit(Job("127.0.0.1", url))
            threading.Event().wait(1.0)
            started = sum(server.hits(f"/m/{i}.jpg") for i in range(6))
            release.set()
            done = _drain(scheduler)
        finally:
            scheduler.close()
            fetcher.close()
        assert started <= 2 + 4 - 1  # at most max_ready waiting, plus those in flight then
        assert len(done) == 6


def test_a_host_at_its_limit_never_holds_the_threads_from_other_hosts():
    """Three fetch threads pull their own jobs: the slow host, limited to one
    connection, keeps one of them at a time, and the other host's jobs go
    through the other two meanwhile, not after it."""
    with FaultServer() as server:
        slow = [server.add(f"/slow/{i}.jpg", JPEG, delay=0.5) for i in range(3)]
        fast = [server.add(f"/fast/{i}.jpg", JPEG) for i in range(6)]
        fetcher = Fetcher(config(fetch_concurrency=3, per_host_concurrency=3))
        scheduler = HostScheduler(fetcher, Politeness(2, 0, overrides={"slow": (1, 0)}),
                                  threads=3)
        try:
            for url in slow:
                scheduler.submit(Job("slow", url))
            for url in fast:
                scheduler.submit(Job("fast", url))
            order = [job.host for job, _, _ in _drain(scheduler)]
        finally:
            scheduler.close()
            fetcher.close()
        assert sorted(order) == ["fast"] * 6 + ["slow"] * 3
        assert order.index("slow") >= 6  # every fast one ended before the first slow one
        starts = sorted(t for i in range(3) for t in server.hit_times(f"/slow/{i}.jpg"))
        assert all(b - a >= 0.45 for a, b in zip(starts, starts[1:]))  # one at a time


def test_a_turn_by_rate_that_comes_sooner_is_not_slept_through():
    """One idle thread sleeps until the next turn by rate, the others until
    woken. When a job comes for a host whose turn is sooner than the one that
    thread sleeps for, the thread woken for it sleeps until that sooner turn
    instead: 'mid' may send again in 0.5 s, 'slow' in 2 s."""
    with FaultServer() as server:
        politeness = Politeness(4, 0, overrides={"slow": (1, 0.5), "mid": (1, 2.0)})
        fetcher = Fetcher(config(fetch_concurrency=3, per_host_concurrency=3),
                          politeness=politeness)
        scheduler = HostScheduler(fetcher, politeness, threads=3)
        pause = threading.Event().wait
        try:
            pause(0.2)  # every thread waits for work
            for host in ("slow", "mid"):  # each has just sent a request
                politeness.release(politeness.acquire(host, deadline=float("inf")))
            submitted = time.monotonic()
            scheduler.submit(Job("slow", server.add("/slow.jpg", JPEG)))
            pause(0.2)  # one thread sleeps for slow's turn, behind the others
            scheduler.submit(Job("mid", server.add("/mid.jpg", JPEG)))
            done = _drain(scheduler)
        finally:
            scheduler.close()
            fetcher.close()
        assert sorted(job.host for job, result, _ in done if result.ok) == ["mid", "slow"]
        assert server.hit_times("/mid.jpg")[0] - submitted < 1.0
        assert server.hit_times("/slow.jpg")[0] - submitted > 1.5  # slow kept its turn
