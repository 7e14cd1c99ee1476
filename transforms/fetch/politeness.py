"""Per-host politeness: how many requests, how often, and when to back off.

Image hosts are mostly small institutional servers, and one GBIF download can
hold hundreds of thousands of URLs on the same host. Flooding it earns 429s
and bans (img2dataset#62), so every request to a host first takes a slot
(requests in flight), waits for its turn (a request rate, checked as "at most
`floor(rate)` requests in any 1-second window" as well as evenly spaced), and
respects a "not before" time set by `Retry-After`. A 429 or 503 halves the
host's rate; answers that show the host coping raise it again slowly
(additive increase, multiplicative decrease).

The limits of a host are what this process was *granted*: the fetch stage
splits each host's job-wide limits into shard budgets (`shard_budgets`), and
a process grants itself the budgets of the shards it fetches, so the sum over
all processes never exceeds the job-wide limits. A host nobody granted (a
redirect target on another host, or a tool such as `query`) gets the default
limits given to the constructor.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

THROTTLE_STATUSES = frozenset({429, 503})
MIN_RATE = 0.1            # requests/s: a throttled host still sees progress
RECOVERY_STEPS = 50       # well-answered requests to climb from 0 to the target
MAX_RETRY_AFTER = 3600.0  # seconds: a bigger Retry-After is a misconfiguration
# The rate window is this much longer than a second, so that jitter between
# our clock and the host's (thread wake-ups, the network) cannot make a
# host see one request too many in a 1-second window of its own.
WINDOW_S = 1.02


@dataclass(frozen=True)
class Budget:
    """One shard's share of a host's job-wide limits."""

    concurrency: int
    rate: float  # requests/s; 0 means no rate limit


def shard_budgets(concurrency: int, rate: float, at_least: int = 1) -> list[Budget]:
    """A host's job-wide (concurrency, rate) split into shards that never add
    up to more, in requests in flight or in requests in any 1-second window.

    Each shard needs a whole slot and a whole number of requests per second
    (so that the shards' 1-second windows add up to at most floor(rate)).
    Equal shares keep a host's shards equally long whatever limits them, so
    there are gcd(concurrency, floor(rate)) shards: 4 at the defaults (8, 20),
    each (2, 5). Where that is fewer than `at_least` (the local runner's
    processes: (7, 20) has a gcd of 1), there are min(concurrency, floor(rate),
    at_least) shards of near-equal shares instead (7, 20 for 2 processes:
    (4, 10) and (3, 10)); the fetch stage gives each shard URLs in proportion
    to its rate. One shard when the rate is below 1/s.
    """
    concurrency = max(1, int(concurrency))
    if rate <= 0:  # no rate limit: shards split the concurrency only
        return [Budget(1, 0.0)] * concurrency
    if rate < 1:
        return [Budget(concurrency, float(rate))]
    whole = int(math.floor(rate + 1e-9))
    n = math.gcd(concurrency, whole)
    if n >= at_least:
        return [Budget(concurrency // n, float(whole // n))] * n
    n = min(concurrency, whole, max(1, int(at_least)))
    return [Budget(_share(concurrency, n, i), float(_share(whole, n, i))) for i in range(n)]


def _share(total: int, n: int, i: int) -> int:
    """The i-th of n whole shares of total, as equal as they can be."""
    return total // n + (1 if i < total % n else 0)


@dataclass(frozen=True)
class Ticket:
    """Proof of one granted request slot; hand it back to `release`."""

    host: str
    sent_at: float


class _Host:
    """The mutable state of one host; guarded by `Politeness._lock`."""

    def __init__(self, concurrency: int, rate: float):
        self.concurrency = max(1, concurrency)
        self.in_flight = 0
        self.target_rate = rate
        self.rate = rate
        self.granted: Optional[Budget] = None  # None: the default limits
        self.grants: dict = {}  # key (a shard) → its Budget
        self.sent: collections.deque = collections.deque()
        self.next_send = -math.inf
        self.blocked_until = -math.inf
        self.last_decrease = -math.inf

    def interval(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else 0.0

    def window_cap(self) -> int:
        return max(1, int(math.floor(self.rate + 1e-9)))

    def earliest(self, now: float) -> float:
        """When the next request may go, by rate, window and Retry-After."""
        when = max(now, self.next_send, self.blocked_until)
        if self.rate > 0:
            cap = self.window_cap()
            if len(self.sent) >= cap:
                when = max(when, self.sent[-cap] + WINDOW_S)
        return when

    def record(self, at: float) -> None:
        self.next_send = at + self.interval()
        self.sent.append(at)
        while len(self.sent) > self.window_cap():
            self.sent.popleft()


class Politeness:
    """Thread-safe per-host limiter: concurrency, rate and Retry-After.

    `rate` <= 0 means no rate limit (only Retry-After is honoured).
    `overrides` maps a host name to its own default (concurrency, rate), e.g.
    GBIF's image cache, which asks for a single connection. Waiting uses
    condition variables and timed sleeps, never spinning.
    """

    def __init__(self, concurrency: int, rate: float, *,
                 overrides: Optional[Mapping[str, tuple[int, float]]] = None,
                 min_rate: float = MIN_RATE,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.concurrency = max(1, int(concurrency))
        self.rate = float(rate)
        self.overrides = dict(overrides or {})
        self.min_rate = min_rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._hosts: dict[str, _Host] = {}

    # -- budgets

    def grant(self, host: str, budget: Budget, key: Any = None) -> None:
        """Adds a shard's budget to this process's limits for `host`. Granting
        the same `key` (the shard) again replaces its budget rather than adding
        to it: a bundle retried in this process cannot hold a shard twice."""
        with self._lock:
            state = self._host_locked(host)
            state.grants[key if key is not None else object()] = budget
            self._regrant_locked(state, host)

    def revoke(self, host: str, budget: Budget, key: Any = None) -> None:
        """Takes a shard's budget back (the shard's work is over)."""
        with self._lock:
            state = self._host_locked(host)
            if key is None:
                key = next((k for k, b in state.grants.items() if b == budget), None)
            state.grants.pop(key, None)
            self._regrant_locked(state, host)

    def settle(self, hosts, since: float, timeout: float = 300.0) -> None:
        """Waits until WINDOW_S has passed since `since` (when budgets of these
        hosts were revoked) and each host has no more requests in flight than
        its limits now allow. A shard handed on to another worker process is
        then safe to fetch there at once: every 1-second window in which the
        next holder sends lies after the revocation, when this process already
        kept to its smaller limits, so the two never add up to more than the
        host's. `timeout` caps the wait for requests in flight (a stalled host)."""
        deadline = self._clock() + timeout
        with self._lock:
            while True:
                now = self._clock()
                busy = [h for h in hosts
                        if self._host_locked(h).in_flight > self._host_locked(h).concurrency]
                if (now >= since + WINDOW_S and not busy) or now >= deadline:
                    return
                self._freed.wait(max(0.001, since + WINDOW_S - now) if now < since + WINDOW_S
                                 else min(1.0, deadline - now))

    def pace(self, host: str) -> float:
        """The share of its granted rate this process sends to `host` at now:
        1.0, less after 429s or 503s halved it."""
        with self._lock:
            state = self._host_locked(host)
            return state.rate / state.target_rate if state.target_rate > 0 else 1.0

    def granted_keys(self, host: str) -> list:
        with self._lock:
            return list(self._host_locked(host).grants)

    def _regrant_locked(self, state: "_Host", host: str) -> None:
        total = Budget(sum(b.concurrency for b in state.grants.values()),
                       sum(b.rate for b in state.grants.values()))
        if total.concurrency <= 0:
            state.granted = None
            new = Budget(*self.overrides.get(host, (self.concurrency, self.rate)))
        else:
            state.granted = new = total
        # A throttled host stays as throttled, in proportion.
        share = state.rate / state.target_rate if state.target_rate > 0 else 1.0
        state.concurrency = max(1, new.concurrency)
        state.target_rate = new.rate
        state.rate = max(self.min_rate, new.rate * share) if new.rate > 0 else 0.0
        self._freed.notify_all()

    # -- requests

    def acquire(self, host: str, deadline: float) -> Optional[Ticket]:
        """Wait for a slot to `host`; None if none comes before `deadline`.

        Holding a concurrency slot while waiting for the rate is deliberate:
        the wait is for this host only, and the order of arrival is kept.
        """
        with self._lock:
            state = self._host_locked(host)
            while state.in_flight >= state.concurrency:
                remaining = deadline - self._clock()
                if remaining <= 0 or not self._freed.wait(remaining):
                    if state.in_flight >= state.concurrency:
                        return None
            state.in_flight += 1
        while True:
            with self._lock:
                now = self._clock()
                send_at = state.earliest(now)
                if send_at > deadline:
                    state.in_flight -= 1
                    self._freed.notify_all()
                    return None
                if send_at <= now:
                    state.record(now)
                    return Ticket(host, now)
            # A Retry-After may arrive while this thread sleeps: look again.
            self._sleep(send_at - now)

    def release(self, ticket: Ticket, status: Optional[int] = None,
                retry_after: Optional[float] = None) -> None:
        """Give the slot back and learn from the host's answer.

        `status` None means no answer (connection error): no evidence either
        way, so the rate stays. Only responses to requests sent after the
        last decrease may lower the rate again, or one burst of concurrent
        429s would drive it to the floor at once.
        """
        with self._lock:
            state = self._host_locked(ticket.host)
            now = self._clock()
            if status in THROTTLE_STATUSES:
                if state.rate > 0 and ticket.sent_at > state.last_decrease:
                    state.rate = max(self.min_rate, state.rate / 2)
                    state.last_decrease = now
                    state.next_send = max(state.next_send, now + state.interval())
            elif status is not None and status < 500 and state.target_rate > 0:
                step = state.target_rate / RECOVERY_STEPS
                state.rate = min(state.target_rate, state.rate + step)
            if retry_after is not None and retry_after > 0:
                wait = min(retry_after, MAX_RETRY_AFTER)
                state.blocked_until = max(state.blocked_until, now + wait)
            state.in_flight -= 1
            self._freed.notify_all()

    # -- what a scheduler asks

    def capacity(self, host: str) -> int:
        with self._lock:
            return self._host_locked(host).concurrency

    def interval(self, host: str) -> float:
        """Seconds between two requests to `host` at its current rate (0: no limit)."""
        with self._lock:
            return self._host_locked(host).interval()

    def wait_before_send(self, host: str) -> float:
        """Seconds until a request to `host` could be sent (0: now)."""
        with self._lock:
            now = self._clock()
            return self._host_locked(host).earliest(now) - now

    def current_rate(self, host: str) -> float:
        with self._lock:
            return self._host_locked(host).rate

    def blocked_for(self, host: str) -> float:
        """Seconds until `host` may be sent to again because of Retry-After."""
        with self._lock:
            return max(0.0, self._host_locked(host).blocked_until - self._clock())

    def _host_locked(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            concurrency, rate = self.overrides.get(host, (self.concurrency, self.rate))
            state = self._hosts[host] = _Host(concurrency, rate)
        return state


_SHARED: dict[tuple, Politeness] = {}
_SHARED_LOCK = threading.Lock()


def shared(concurrency: int, rate: float,
           overrides: Optional[Mapping[str, tuple[int, float]]] = None) -> Politeness:
    """The process-wide `Politeness` for these default limits.

    Beam may run several DoFn instances per worker process; each must see
    the others' requests and grants, or the per-host limits multiply.
    """
    key = (int(concurrency), float(rate), tuple(sorted((overrides or {}).items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Politeness(concurrency, rate, overrides=overrides)
        return _SHARED[key]
