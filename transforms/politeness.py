"""Per-host politeness: how many requests, how often, and when to back off.

Image hosts are mostly small institutional servers, and one GBIF download can
hold hundreds of thousands of URLs on the same host. Flooding it earns 429s
and bans (img2dataset#62), so every worker process keeps, per host, a cap on
requests in flight, a request rate, and a "not before" time set by
`Retry-After`. A 429 or 503 halves the host's rate; answers that show the
host coping raise it again slowly (additive increase, multiplicative decrease).

One `Politeness` is shared by all threads of a worker process (see `shared`),
since the limits are per process, not per DoFn instance or thread.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

THROTTLE_STATUSES = frozenset({429, 503})
MIN_RATE = 0.1            # requests/s: a throttled host still sees progress
RECOVERY_STEPS = 50       # well-answered requests to climb from 0 to the target
MAX_RETRY_AFTER = 3600.0  # seconds: a bigger Retry-After is a misconfiguration


@dataclass(frozen=True)
class Ticket:
    """Proof of one granted request slot; hand it back to `release`."""

    host: str
    sent_at: float


class _Host:
    """The mutable state of one host; guarded by `Politeness._lock`."""

    def __init__(self, concurrency: int, rate: float):
        self.slots = threading.BoundedSemaphore(max(1, concurrency))
        self.target_rate = rate
        self.rate = rate
        self.next_send = -math.inf
        self.blocked_until = -math.inf
        self.last_decrease = -math.inf

    def interval(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else 0.0


class Politeness:
    """Thread-safe per-host limiter: concurrency, rate and Retry-After.

    `rate` <= 0 means no rate limit (only Retry-After is honoured).
    `overrides` maps a host name to its own (concurrency, rate), e.g. GBIF's
    image cache, which asks for a single connection. Waiting uses semaphores and timed sleeps, never spinning.
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
        self._hosts: dict[str, _Host] = {}

    def acquire(self, host: str, deadline: float) -> Optional[Ticket]:
        """Wait for a slot to `host`; None if none comes before `deadline`.

        Holding a concurrency slot while waiting for the rate is deliberate:
        the wait is for this host only, and the order of arrival is kept.
        """
        state = self._host(host)
        if not state.slots.acquire(timeout=max(0.0, deadline - self._clock())):
            return None
        while True:
            with self._lock:
                now = self._clock()
                send_at = max(now, state.next_send, state.blocked_until)
                if send_at > deadline:
                    state.slots.release()
                    return None
                state.next_send = send_at + state.interval()
            if send_at > now:
                self._sleep(send_at - now)
            with self._lock:
                # A Retry-After may have arrived while this thread slept.
                if state.blocked_until <= self._clock():
                    return Ticket(host, send_at)

    def release(self, ticket: Ticket, status: Optional[int] = None,
                retry_after: Optional[float] = None) -> None:
        """Give the slot back and learn from the host's answer.

        `status` None means no answer (connection error): no evidence either
        way, so the rate stays. Only responses to requests sent after the
        last decrease may lower the rate again, or one burst of concurrent
        429s would drive it to the floor at once.
        """
        state = self._host(ticket.host)
        with self._lock:
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
        state.slots.release()

    def current_rate(self, host: str) -> float:
        with self._lock:
            return self._host_locked(host).rate

    def blocked_for(self, host: str) -> float:
        """Seconds until `host` may be sent to again because of Retry-After."""
        with self._lock:
            return max(0.0, self._host_locked(host).blocked_until - self._clock())

    def _host(self, host: str) -> _Host:
        with self._lock:
            return self._host_locked(host)

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
    """The process-wide `Politeness` for these limits.

    Beam may run several DoFn instances per worker process; each must see
    the others' requests, or the per-host limits multiply.
    """
    key = (int(concurrency), float(rate), tuple(sorted((overrides or {}).items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Politeness(concurrency, rate, overrides=overrides)
        return _SHARED[key]
