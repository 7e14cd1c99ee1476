"""The fetcher: one URL in, its bytes or a stable reason out; never raises.

Tools in this space hang on one bad URL, flood hosts until they answer 429,
or crash when one exception escapes (see FIELD_NOTES). So a fetch never
outlives its deadline; transient failures are retried with backoff while
permanent ones are not; redirects are followed by hand, every hop vetted by
the `AddressGuard` (the URLs are third parties' data); and every request
asks the `Politeness` of its host first.
"""
from __future__ import annotations

import concurrent.futures
import random
import time
import urllib.parse
from typing import Callable, Optional

from transforms.fetch.address_guard import AddressGuard, Verdict
from transforms.fetch.config import FetchConfig
from transforms.fetch.outcome import (FetchResult, Outcome, backoff_delay, permanent, short,
                                      transient)
from transforms.fetch.gcs_read import GcsReader
from transforms.fetch.http_client import HttpClient
from transforms.fetch.politeness import Politeness


class Fetcher:
    """Fetches image URLs politely and safely; thread-safe; never raises.

    One call takes at most about `fetch_timeout` seconds, waits, retries and
    redirects included. Pass a shared `Politeness` when several fetchers in a
    process talk to the same hosts.
    """

    def __init__(self, config: FetchConfig, *, politeness: Optional[Politeness] = None,
                 guard: Optional[AddressGuard] = None):
        self.config = config
        self.guard = guard or AddressGuard(config.allow_private_networks)
        self.politeness = politeness or Politeness(
            config.per_host_concurrency, config.per_host_rate,
            overrides=config.host_overrides())
        self._clock = time.monotonic  # the watchdog's clock too
        self._rng = random.Random()
        self._http = HttpClient(config, self._pool_size, self._clock)
        # Blocking calls without their own time-out (DNS, GCS) run here, so
        # the caller can stop waiting when its deadline passes.
        self._helpers = concurrent.futures.ThreadPoolExecutor(
            max(2, config.fetch_concurrency), thread_name_prefix="fetch-helper")
        self._gcs = GcsReader(self._helpers, config.max_image_bytes, self._clock)

    def close(self) -> None:
        self._http.close()
        self._helpers.shutdown(wait=False, cancel_futures=True)

    def fetch(self, url: str, etag: Optional[str] = None,
              last_modified: Optional[str] = None,
              on_send: Optional[Callable[[], None]] = None) -> FetchResult:
        """`on_send` is called each time a request was let through by the
        politeness of its host, just before it goes out."""
        start = self._clock()
        try:
            result = self._fetch(url, etag, last_modified, start + self.config.fetch_timeout,
                                 on_send)
        except Exception as exc:  # the promise is: never raise
            result = FetchResult(False, reason="internal_error", detail=short(exc),
                                 final_url=url)
        result.elapsed_s = self._clock() - start
        return result

    # -- the retry and redirect loop, for http(s) and gs:// alike

    def _fetch(self, url: str, etag: Optional[str], last_modified: Optional[str],
               deadline: float, on_send: Optional[Callable[[], None]]) -> FetchResult:
        headers = self._headers(etag, last_modified)
        conditional = bool(etag or last_modified)
        hop, seen, redirects, tries, requests = url, {url}, 0, 1, 0
        while True:
            if hop.lower().startswith("gs://") and redirects == 0:
                if on_send is not None:
                    on_send()
                outcome = self._gcs.read(hop, deadline)
                outcome.sent = True
            else:
                outcome = self._request(hop, headers, tries, deadline, redirects > 0, on_send)
            requests += outcome.sent
            if outcome.kind == "redirect":
                target = _join(hop, outcome.location or "")
                redirects += 1
                if target is None:
                    outcome = permanent("bad_redirect", f"unusable Location "
                                        f"{outcome.location!r} from {hop}", outcome.status)
                elif redirects > self.config.max_redirects or target in seen:
                    why = "redirect loop" if target in seen else \
                        f"more than {self.config.max_redirects} redirects"
                    outcome = permanent("too_many_redirects", f"{why}: {hop} -> {target}",
                                        outcome.status)
                else:
                    hop = target
                    seen.add(target)
                    continue
            if outcome.kind == "not_modified" and not conditional:
                outcome = permanent("http_304", "304 Not Modified to an unconditional request",
                                    304)
            if outcome.kind == "transient" and tries < self.config.max_attempts:
                wait = self._retry_wait(outcome, tries, deadline)
                if wait is not None:
                    time.sleep(wait)
                    tries += 1
                    continue
            return self._result(outcome, hop, tries, requests)

    def _retry_wait(self, outcome: Outcome, tries: int, deadline: float) -> Optional[float]:
        """Seconds to sleep before the next try, or None if it cannot fit.

        A Retry-After is enforced by `Politeness` for the whole host; the
        sleep here is the backoff, and both must fit before the deadline.
        """
        wait = backoff_delay(tries, self.config.backoff_base, self.config.backoff_max,
                             self._rng.random)
        remaining = deadline - self._clock()
        if outcome.retry_after is not None and outcome.retry_after > remaining:
            outcome.detail += f"; Retry-After {outcome.retry_after:.0f}s is past the deadline"
            return None
        if wait >= remaining:
            return None
        return wait

    @staticmethod
    def _result(outcome: Outcome, url: str, tries: int, requests: int) -> FetchResult:
        ok = outcome.kind in ("ok", "not_modified")
        return FetchResult(
            ok=ok, content=outcome.content, reason=None if ok else outcome.reason,
            detail=outcome.detail, http_status=outcome.status, attempts=tries,
            final_url=url, etag=outcome.etag, last_modified=outcome.last_modified,
            not_modified=outcome.kind == "not_modified", image_format=outcome.image_format,
            requests=requests)

    def _headers(self, etag: Optional[str], last_modified: Optional[str]) -> dict[str, str]:
        headers = {
            "User-Agent": self.config.user_agent,
            "Accept": "image/jpeg,image/png,image/webp,image/*;q=0.8,*/*;q=0.5",
            # Images do not compress; identity also rules out gzip bombs.
            "Accept-Encoding": "identity",
        }
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        return headers

    def _pool_size(self, host: str) -> int:
        return self.config.host_limits(host)[0]

    # -- one HTTP request

    def _request(self, url: str, headers: dict[str, str], attempt: int, deadline: float,
                 is_redirect: bool, on_send: Optional[Callable[[], None]] = None) -> Outcome:
        if is_redirect and url.lower().startswith("gs:"):
            # A third party must not steer the worker's own credentials.
            return permanent("unsupported_scheme", f"redirect to {url} (gs:// only as a "
                             "task's own URL)")
        verdict = self._vet(url, deadline)
        if not verdict.ok:
            if verdict.transient:
                return transient(verdict.reason or "dns_error", verdict.detail)
            return permanent(verdict.reason or "blocked_address", verdict.detail)
        parts = urllib.parse.urlsplit(url)  # parsed fine inside vet
        ticket = self.politeness.acquire(verdict.host, deadline)
        if ticket is None:
            return permanent("throttled", f"no request slot for {verdict.host} before the "
                             f"deadline (rate {self.politeness.current_rate(verdict.host):.2g}/s, "
                             f"Retry-After wait {self.politeness.blocked_for(verdict.host):.0f}s)")
        outcome = Outcome("transient", "internal_error")
        try:
            if on_send is not None:
                on_send()
            outcome = self._http.send(parts, verdict, attempt, headers, deadline)
        finally:
            self.politeness.release(ticket, outcome.status, outcome.retry_after)
        return outcome

    def _vet(self, url: str, deadline: float) -> Verdict:
        if not self.guard.needs_lookup(url):
            return self.guard.vet(url)
        future = self._helpers.submit(self.guard.vet, url)
        try:
            return future.result(timeout=max(0.0, deadline - self._clock()))
        except concurrent.futures.TimeoutError:
            return Verdict(False, "timeout", "DNS lookup did not finish before the deadline")


def _join(base: str, location: str) -> Optional[str]:
    try:
        return urllib.parse.urljoin(base, location.strip())
    except ValueError:
        return None
