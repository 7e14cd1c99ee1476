"""The fetch stage: image tasks in, image bytes (or a failure row) out.

Tools in this space hang on one bad URL, flood hosts until they answer 429,
or crash when one exception escapes (see FIELD_NOTES). So here a fetch never
raises and never outlives its deadline; every outcome is a stable reason code;
transient failures are retried with backoff while permanent ones are not; and
every request goes through the per-host `Politeness` and the `AddressGuard`
(the URLs are third parties' data).

Reason codes of failures: unsupported_scheme, invalid_url, blocked_address,
dns_error, connection_error, connection_dropped, timeout, throttled, tls_error,
too_many_redirects, bad_redirect, http_<status> (http_404, http_403, http_410,
http_429, http_500, ...), too_large, empty_body, not_an_image, internal_error.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import email.utils
import hashlib
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import apache_beam as beam
import urllib3
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from urllib3 import connection as u3c
from urllib3 import exceptions as u3e

from pipeline.options import DEFAULT_USER_AGENT, GbifEmbedOptions
from transforms import progress
from transforms.address_guard import AddressGuard, Verdict, pick_address
from transforms.concurrency import ThreadedDoFn
from transforms.politeness import Politeness, shared
from transforms.records import FAILURES, NOT_MODIFIED, failure
from transforms.tally import latency_key

GBIF_CACHE_HOST = "api.gbif.org"
GBIF_CACHE_URL = "https://api.gbif.org/v1/image/cache/occurrence/{gbif_id}/media/{md5}"
# What a connection shut down by the watchdog looks like to the reader.
_CUT_BY_WATCHDOG = frozenset({"connection_error", "connection_dropped", "tls_error"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 64 * 1024
SNIFF_BYTES = 16
MAX_POOLS = 512


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class FetchConfig:
    """Every fetch option; frozen so that one config keys shared state."""

    fetch_concurrency: int = 32
    per_host_concurrency: int = 8
    per_host_rate: float = 20.0
    max_attempts: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    fetch_timeout: float = 120.0
    max_redirects: int = 5
    max_image_bytes: int = 30 * 1024 * 1024
    user_agent: str = DEFAULT_USER_AGENT
    allow_private_networks: tuple[str, ...] = ()
    image_source: str = "identifier"
    mirrors: tuple[tuple[str, str], ...] = ()
    # Not options: tests shorten them so that retries take milliseconds.
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # Not an option: a CA bundle for https (tests, private CAs); None: certifi's.
    ca_certs: Optional[str] = None

    def __post_init__(self):
        nets = self.allow_private_networks
        if isinstance(nets, str):
            nets = [n for n in nets.split(",")]
        object.__setattr__(self, "allow_private_networks",
                           tuple(n.strip() for n in (nets or ()) if n and n.strip()))
        if isinstance(self.mirrors, str):
            object.__setattr__(self, "mirrors", parse_mirrors(self.mirrors))

    @classmethod
    def from_options(cls, opts: Any) -> "FetchConfig":
        """From the GbifEmbedOptions view (or any PipelineOptions)."""
        if not isinstance(opts, GbifEmbedOptions) and hasattr(opts, "view_as"):
            opts = opts.view_as(GbifEmbedOptions)
        return cls(
            fetch_concurrency=opts.fetch_concurrency,
            per_host_concurrency=opts.per_host_concurrency,
            per_host_rate=opts.per_host_rate,
            max_attempts=opts.max_attempts,
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            fetch_timeout=opts.fetch_timeout,
            max_redirects=opts.max_redirects,
            max_image_bytes=opts.max_image_bytes,
            user_agent=_user_agent(opts),
            allow_private_networks=opts.allow_private_networks or (),
            image_source=opts.image_source,
            mirrors=parse_mirrors(opts.mirror or ""),
        )

    def host_overrides(self) -> dict[str, tuple[int, float]]:
        """GBIF asks scripted users of its image cache for one connection."""
        if self.image_source == "gbif_cache":
            return {GBIF_CACHE_HOST: (1, self.per_host_rate)}
        return {}


def _user_agent(opts: Any) -> str:
    """`--user_agent` belongs to Beam (SetupOptions); unset means ours."""
    from apache_beam.options.pipeline_options import SetupOptions
    value = opts.view_as(SetupOptions).user_agent if hasattr(opts, "view_as") else None
    return value or DEFAULT_USER_AGENT


def parse_mirrors(value: str) -> tuple[tuple[str, str], ...]:
    """`OLD=NEW[,OLD=NEW]` URL prefixes; longest OLD first so the most specific wins."""
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--mirror expects OLD_PREFIX=NEW_PREFIX, found {item!r}")
        pairs.append((old, new))
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def mirrored(url: str, mirrors: tuple[tuple[str, str], ...]) -> str:
    """The URL to request when the images are also served from a mirror."""
    for old, new in mirrors:
        if url.startswith(old):
            return new + url[len(old):]
    return url


def source_url(task: dict, image_source: str = "identifier") -> str:
    """The URL to fetch for a task: the publisher's, or GBIF's cached copy.

    GBIF's cache is keyed by the occurrence and the MD5 (hex) of the media
    identifier (techdocs.gbif.org/en/openapi/images); it serves at most
    1200x1200 px, which is plenty for a 299 px model.
    """
    identifier = (task.get("identifier") or "").strip()
    if not identifier:
        raise ValueError("task has no identifier")
    if image_source == "identifier":
        return identifier
    if image_source == "gbif_cache":
        gbif_id = str(task.get("gbifID") or "").strip()
        if not gbif_id:
            raise ValueError("task has no gbifID for the GBIF image cache")
        md5 = hashlib.md5(identifier.encode("utf-8")).hexdigest()
        return GBIF_CACHE_URL.format(gbif_id=urllib.parse.quote(gbif_id, safe=""), md5=md5)
    raise ValueError(f"unknown image_source {image_source!r}")


# ---------------------------------------------------------------- results

@dataclass
class FetchResult:
    """One URL's outcome. `ok` with `not_modified` means a 304: no content."""

    ok: bool
    content: Optional[bytes] = None
    reason: Optional[str] = None
    detail: str = ""
    http_status: Optional[int] = None
    attempts: int = 0
    final_url: str = ""
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    not_modified: bool = False
    elapsed_s: float = 0.0
    image_format: Optional[str] = None
    requests: int = 0  # HTTP requests sent, redirect hops included


@dataclass
class _Outcome:
    """One request's outcome, before the retry loop decides what follows."""

    kind: str  # "ok", "not_modified", "redirect", "transient", "permanent"
    reason: Optional[str] = None
    detail: str = ""
    status: Optional[int] = None
    retry_after: Optional[float] = None
    location: Optional[str] = None
    content: Optional[bytes] = None
    image_format: Optional[str] = None
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    sent: bool = False  # whether a request reached the network


def _permanent(reason: str, detail: str, status: Optional[int] = None) -> _Outcome:
    return _Outcome("permanent", reason, detail, status)


def _transient(reason: str, detail: str, status: Optional[int] = None,
               retry_after: Optional[float] = None) -> _Outcome:
    return _Outcome("transient", reason, detail, status, retry_after)


# ---------------------------------------------------------------- small helpers

_MAGIC: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("tiff", lambda b: b[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("bmp", lambda b: b[:2] == b"BM" and len(b) >= 14),
)


def sniff_format(head: bytes) -> Optional[str]:
    """The image format from magic numbers; headers and URLs lie too often."""
    for name, matches in _MAGIC:
        if matches(head):
            return name
    return None


def describe_content(head: bytes) -> str:
    """A guess at what a non-image body is, for the failure's detail."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for marker, label in ((b"<!doctype html", "an HTML page"), (b"<html", "an HTML page"),
                          (b"<?xml", "XML"), (b"<svg", "SVG (not supported)"),
                          (b"%pdf", "a PDF document"), (b"{", "JSON or text"),
                          (b"[", "JSON or text")):
        if text.startswith(marker):
            return label
    if head[4:12] == b"ftypavif" or head[4:12] == b"ftypheic":
        return "AVIF/HEIC (not supported)"
    return "no known image format"


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(failures: int, base: float, cap: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random.

    The fixed half keeps retries from hammering a host that is down; the
    random half spreads threads that failed together.
    """
    delay = min(cap, base * (2 ** max(0, failures - 1)))
    return delay / 2 + rng() * delay / 2


def _content_length(headers: Any) -> Optional[int]:
    try:
        value = int(headers.get("Content-Length", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _is_certificate_error(exc: Optional[BaseException]) -> bool:
    """A bad certificate is as bad on the next try; a reset handshake may not be."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError) or \
                "CERTIFICATE_VERIFY_FAILED" in text or "doesn't match" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# ---------------------------------------------------------------- the deadline watchdog

_LOCAL = threading.local()


class _Watch:
    """One fetch's deadline and the connection it is using right now."""

    __slots__ = ("deadline", "conn")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn: Any = None

    def expire(self) -> None:
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                # The plain socket's shutdown, also under TLS: it wakes a
                # blocked read at once without unwrapping SSL under its feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _Watchdog:
    """Cuts the connections of fetches that outlived their deadline.

    Socket time-outs bound each read, not their sum: a server can drip its
    response headers (or a TLS handshake) a byte per read time-out and hold a
    thread for hours. One thread per process wakes a few times a second and
    shuts such sockets down, so the blocked read fails at once.
    """

    INTERVAL = 0.1

    def __init__(self):
        self._lock = threading.Lock()
        self._active: dict[int, _Watch] = {}
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def watching(self, deadline: float):
        watch = _Watch(deadline)
        with self._lock:
            self._active[id(watch)] = watch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog",
                                                daemon=True)
                self._thread.start()
        _LOCAL.watch = watch
        try:
            yield watch
        finally:
            _LOCAL.watch = None
            with self._lock:
                self._active.pop(id(watch), None)

    def _run(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            now = time.monotonic()
            with self._lock:
                expired = [w for w in self._active.values() if w.deadline <= now]
            for watch in expired:
                watch.expire()


_WATCHDOG = _Watchdog()


def _note_connection(conn: Any) -> None:
    watch = getattr(_LOCAL, "watch", None)
    if watch is not None:
        watch.conn = conn


class _Watched:
    """Tells the watchdog which connection the current fetch is on."""

    def connect(self) -> None:
        _note_connection(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _note_connection(self)
        super().request(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, u3c.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, u3c.HTTPSConnection):
    pass


# ---------------------------------------------------------------- connection pools

class _Pools:
    """Connection pools keyed by the pinned address, for keep-alive.

    A pool connects to the vetted IP, never to a name, so DNS cannot change
    where it goes. For https the certificate and SNI still use the URL's host.
    """

    def __init__(self, maxsize: Callable[[str], int], ca_certs: Optional[str]):
        self._maxsize = maxsize
        self._ca_certs = ca_certs
        self._lock = threading.Lock()
        self._pools: dict[tuple, urllib3.HTTPConnectionPool] = {}

    def get(self, scheme: str, address: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, address, port, host if scheme == "https" else "")
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                if len(self._pools) >= MAX_POOLS:
                    self._evict_oldest()
                pool = self._pools[key] = self._new(scheme, address, port, host)
            return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _new(self, scheme: str, address: str, port: int, host: str):
        common = dict(maxsize=self._maxsize(host), block=False, retries=False)
        if scheme == "http":
            pool = urllib3.HTTPConnectionPool(address, port, **common)
            pool.ConnectionCls = _WatchedHTTPConnection
            return pool
        pool = urllib3.HTTPSConnectionPool(
            address, port, server_hostname=host, assert_hostname=host,
            cert_reqs="CERT_REQUIRED", ca_certs=self._ca_certs, **common)
        pool.ConnectionCls = _WatchedHTTPSConnection
        return pool

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._pools))
        self._pools.pop(oldest).close()


def _ca_bundle() -> Optional[str]:
    try:
        import certifi
        return certifi.where()
    except ImportError:
        return None


# ---------------------------------------------------------------- the fetcher

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
        self._pools = _Pools(self._pool_size, config.ca_certs or _ca_bundle())
        # Blocking calls without their own time-out (DNS, GCS) run here, so
        # the caller can stop waiting when its deadline passes.
        self._helpers = concurrent.futures.ThreadPoolExecutor(
            max(2, config.fetch_concurrency), thread_name_prefix="fetch-helper")
        self._gcs_lock = threading.Lock()
        self._gcs = None

    def close(self) -> None:
        self._pools.close()
        self._helpers.shutdown(wait=False, cancel_futures=True)

    def fetch(self, url: str, etag: Optional[str] = None,
              last_modified: Optional[str] = None) -> FetchResult:
        start = self._clock()
        try:
            result = self._fetch(url, etag, last_modified, start + self.config.fetch_timeout)
        except Exception as exc:  # the promise is: never raise
            result = FetchResult(False, reason="internal_error", detail=_short(exc),
                                 final_url=url)
        result.elapsed_s = self._clock() - start
        return result

    # -- the retry and redirect loop

    def _fetch(self, url: str, etag: Optional[str], last_modified: Optional[str],
               deadline: float) -> FetchResult:
        if url.lower().startswith("gs://"):
            return self._fetch_gs(url, deadline)
        headers = self._headers(etag, last_modified)
        conditional = bool(etag or last_modified)
        hop, seen, redirects, tries, requests = url, {url}, 0, 1, 0
        while True:
            outcome = self._request(hop, headers, tries, deadline, redirects > 0)
            requests += outcome.sent
            if outcome.kind == "redirect":
                target = _join(hop, outcome.location or "")
                redirects += 1
                if target is None:
                    outcome = _permanent("bad_redirect", f"unusable Location "
                                         f"{outcome.location!r} from {hop}", outcome.status)
                elif redirects > self.config.max_redirects or target in seen:
                    why = "redirect loop" if target in seen else \
                        f"more than {self.config.max_redirects} redirects"
                    outcome = _permanent("too_many_redirects", f"{why}: {hop} -> {target}",
                                         outcome.status)
                else:
                    hop = target
                    seen.add(target)
                    continue
            if outcome.kind == "not_modified" and not conditional:
                outcome = _permanent("http_304", "304 Not Modified to an unconditional request",
                                     304)
            if outcome.kind == "transient" and tries < self.config.max_attempts:
                wait = self._retry_wait(outcome, tries, deadline)
                if wait is not None:
                    time.sleep(wait)
                    tries += 1
                    continue
            return self._result(outcome, hop, tries, requests)

    def _retry_wait(self, outcome: _Outcome, tries: int, deadline: float) -> Optional[float]:
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

    def _result(self, outcome: _Outcome, url: str, tries: int, requests: int) -> FetchResult:
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
        return self.config.host_overrides().get(host, (self.config.per_host_concurrency,))[0]

    # -- one HTTP request

    def _request(self, url: str, headers: dict[str, str], attempt: int, deadline: float,
                 is_redirect: bool) -> _Outcome:
        if is_redirect and url.lower().startswith("gs:"):
            # A third party must not steer the worker's own credentials.
            return _permanent("unsupported_scheme", f"redirect to {url} (gs:// only as a "
                              "task's own URL)")
        verdict = self._vet(url, deadline)
        if not verdict.ok:
            if verdict.transient:
                return _transient(verdict.reason or "dns_error", verdict.detail)
            return _permanent(verdict.reason or "blocked_address", verdict.detail)
        parts = urllib.parse.urlsplit(url)  # parsed fine inside vet
        ticket = self.politeness.acquire(verdict.host, deadline)
        if ticket is None:
            return _permanent("throttled", f"no request slot for {verdict.host} before the "
                              f"deadline (rate {self.politeness.current_rate(verdict.host):.2g}/s, "
                              f"Retry-After wait {self.politeness.blocked_for(verdict.host):.0f}s)")
        outcome = _Outcome("transient", "internal_error")
        try:
            outcome = self._send(parts, verdict, attempt, headers, deadline)
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

    def _send(self, parts: urllib.parse.SplitResult, verdict: Verdict, attempt: int,
              headers: dict[str, str], deadline: float) -> _Outcome:
        address = pick_address(verdict.addresses, attempt)
        pool = self._pools.get(parts.scheme.lower(), address, verdict.port, verdict.host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        remaining = deadline - self._clock()
        if remaining <= 0:
            return _permanent("timeout", "fetch deadline passed")
        timeout = urllib3.Timeout(connect=min(self.config.connect_timeout, remaining),
                                  read=min(self.config.read_timeout, remaining))
        request_headers = dict(headers, Host=parts.netloc.rsplit("@", 1)[-1])
        with _WATCHDOG.watching(deadline):
            outcome = self._exchange(pool, target, request_headers, timeout, deadline)
        outcome.sent = True
        if outcome.reason in _CUT_BY_WATCHDOG and self._clock() >= deadline:
            return _permanent("timeout", f"fetch deadline passed ({outcome.detail})",
                              outcome.status)
        return outcome

    def _exchange(self, pool: urllib3.HTTPConnectionPool, target: str,
                  headers: dict[str, str], timeout: urllib3.Timeout,
                  deadline: float) -> _Outcome:
        try:
            response = pool.urlopen("GET", target, headers=headers, redirect=False,
                                    retries=False, preload_content=False, timeout=timeout,
                                    assert_same_host=False, release_conn=False)
        except Exception as exc:
            return _request_error(exc)
        try:
            return self._answer(response, deadline)
        finally:
            response.release_conn()

    def _answer(self, response: urllib3.HTTPResponse, deadline: float) -> _Outcome:
        status = response.status
        if 200 <= status < 300:
            outcome = self._read_body(response, deadline)
        else:
            response.close()  # no use for an error page; keep-alive is not worth it
            outcome = _status_outcome(status, response.headers)
        outcome.status = status
        outcome.etag = response.headers.get("ETag")
        outcome.last_modified = response.headers.get("Last-Modified")
        return outcome

    def _read_body(self, response: urllib3.HTTPResponse, deadline: float) -> _Outcome:
        """Stream the body under the byte cap and the deadline.

        Sniffing the first bytes stops a large HTML page early; the socket
        time-out is tightened before each read so a slow drip cannot outlive
        the deadline.
        """
        limit = self.config.max_image_bytes
        length = _content_length(response.headers)
        if length is not None and length > limit:
            response.close()
            return _permanent("too_large", f"Content-Length {length} > {limit} bytes")
        body = bytearray()
        image_format: Optional[str] = None
        try:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    response.close()
                    return _transient("timeout", f"fetch deadline passed after {len(body)} bytes")
                _set_read_timeout(response, min(self.config.read_timeout, remaining))
                chunk = response.read1(CHUNK_BYTES)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    response.close()
                    return _permanent("too_large", f"body exceeds {limit} bytes")
                if image_format is None and len(body) >= SNIFF_BYTES:
                    image_format = sniff_format(bytes(body[:SNIFF_BYTES]))
                    if image_format is None:
                        response.close()
                        return self._not_an_image(body, response)
        except u3e.ReadTimeoutError as exc:
            response.close()
            return _transient("timeout", f"read timed out after {len(body)} bytes: {exc}")
        except (u3e.ProtocolError, u3e.DecodeError, OSError, ValueError) as exc:
            response.close()
            return _transient("connection_dropped",
                              f"connection lost after {len(body)} bytes: {_short(exc)}")
        if not body:
            return _permanent("empty_body", "the server answered with zero bytes")
        image_format = image_format or sniff_format(bytes(body))
        if image_format is None:
            return self._not_an_image(body, response)
        return _Outcome("ok", content=bytes(body), image_format=image_format)

    @staticmethod
    def _not_an_image(body: bytearray, response: urllib3.HTTPResponse) -> _Outcome:
        head = bytes(body[:SNIFF_BYTES])
        content_type = response.headers.get("Content-Type", "(none)")
        return _permanent("not_an_image", f"body is {describe_content(bytes(body[:64]))}, "
                          f"not an image (Content-Type {content_type}; first bytes {head!r})")

    # -- gs://

    def _fetch_gs(self, url: str, deadline: float) -> FetchResult:
        tries = 1
        while True:
            outcome = self._read_gs(url, deadline)
            if outcome.kind == "transient" and tries < self.config.max_attempts:
                wait = self._retry_wait(outcome, tries, deadline)
                if wait is not None:
                    time.sleep(wait)
                    tries += 1
                    continue
            return self._result(outcome, url, tries, tries)

    def _read_gs(self, url: str, deadline: float) -> _Outcome:
        future = self._helpers.submit(_read_gcs_object, self._gcs_fs(), url,
                                      self.config.max_image_bytes)
        try:
            outcome = future.result(timeout=max(0.0, deadline - self._clock()))
        except concurrent.futures.TimeoutError:
            return _permanent("timeout", f"{url} did not arrive before the deadline")
        except Exception as exc:  # gcsfs raises many kinds; all are reported
            return _gcs_error(url, exc)
        return outcome

    def _gcs_fs(self):
        with self._gcs_lock:
            if self._gcs is None:
                self._gcs = _new_gcs_filesystem()
            return self._gcs


def _new_gcs_filesystem():
    """gcsfs, anonymous against an emulator (no metadata-server probing)."""
    import os

    import gcsfs
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def _read_gcs_object(fs: Any, url: str, limit: int) -> _Outcome:
    path = url[len("gs://"):]
    size = fs.info(path).get("size")
    if size is not None and int(size) > limit:
        return _permanent("too_large", f"{url} is {size} bytes > {limit}")
    data = fs.cat_file(path, start=0, end=limit + 1)
    if len(data) > limit:
        return _permanent("too_large", f"{url} exceeds {limit} bytes")
    if not data:
        return _permanent("empty_body", f"{url} is empty")
    image_format = sniff_format(data[:SNIFF_BYTES])
    if image_format is None:
        return _permanent("not_an_image", f"{url} is {describe_content(data[:64])}, "
                          f"not an image (first bytes {data[:SNIFF_BYTES]!r})")
    return _Outcome("ok", content=bytes(data), image_format=image_format, status=200)


def _gcs_error(url: str, exc: BaseException) -> _Outcome:
    if isinstance(exc, FileNotFoundError):
        return _permanent("http_404", f"{url} not found", 404)
    if isinstance(exc, PermissionError):
        return _permanent("http_403", f"{url}: access denied ({exc})", 403)
    return _transient("connection_error", f"{url}: {_short(exc)}")


def _join(base: str, location: str) -> Optional[str]:
    try:
        return urllib.parse.urljoin(base, location.strip())
    except ValueError:
        return None


def _set_read_timeout(response: urllib3.HTTPResponse, seconds: float) -> None:
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(0.001, seconds))


def _status_outcome(status: int, headers: Any) -> _Outcome:
    """What a non-2xx status means for the retry loop."""
    if status in REDIRECT_STATUSES:
        location = headers.get("Location")
        if not location:
            return _permanent("bad_redirect", f"{status} without a Location header")
        return _Outcome("redirect", location=location)
    if status == 304:
        return _Outcome("not_modified", detail="304 Not Modified")
    retry_after = parse_retry_after(headers.get("Retry-After")) \
        if status in (429, 503) else None
    if status in TRANSIENT_STATUSES or (status >= 500 and status not in (501, 505)):
        detail = f"HTTP {status}" + (f", Retry-After {retry_after:.0f}s"
                                     if retry_after is not None else "")
        return _transient(f"http_{status}", detail, status, retry_after)
    return _permanent(f"http_{status}", f"HTTP {status}", status)


def _request_error(exc: BaseException) -> _Outcome:
    """Classify an exception raised before any response arrived."""
    if isinstance(exc, u3e.NewConnectionError):
        return _transient("connection_error", _short(exc))
    if isinstance(exc, (u3e.ConnectTimeoutError, u3e.ReadTimeoutError, TimeoutError)):
        return _transient("timeout", _short(exc))
    if isinstance(exc, u3e.SSLError):
        if _is_certificate_error(exc):
            return _permanent("tls_error", _short(exc))
        return _transient("tls_error", _short(exc))
    if isinstance(exc, (u3e.LocationParseError, ValueError, UnicodeError)):
        return _permanent("invalid_url", _short(exc))
    if isinstance(exc, (u3e.HTTPError, OSError)):
        return _transient("connection_error", _short(exc))
    return _permanent("internal_error", _short(exc))


# ---------------------------------------------------------------- the DoFn

class _MetricBuffer:
    """Beam metrics updated from pool threads would be lost: Beam keeps the
    metrics container per thread. Work threads record here; the bundle's
    own thread moves the numbers into Beam in `flush`."""

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


class FetchImages(ThreadedDoFn):
    """Image tasks in; tasks with `content` out, or 304s, or failure rows.

    Outputs: main (task + content, image_sha256, image_format, http_status,
    attempts, etag, last_modified, fetch_seconds, bytes), `NOT_MODIFIED` for
    revalidated tasks answered 304, `FAILURES` for failure rows.
    """

    def __init__(self, config: FetchConfig):
        super().__init__(threads=config.fetch_concurrency)
        self.config = config
        self._fetcher: Optional[Fetcher] = None
        self._metrics: Optional[_MetricBuffer] = None

    def setup(self):
        super().setup()
        politeness = shared(self.config.per_host_concurrency, self.config.per_host_rate,
                            self.config.host_overrides())
        self._fetcher = Fetcher(self.config, politeness=politeness)
        self._metrics = _MetricBuffer("fetch")

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        yield from super().process(element, window, timestamp)
        self._metrics.flush()

    def finish_bundle(self):
        yield from super().finish_bundle()
        self._metrics.flush()

    def teardown(self):
        super().teardown()
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def work(self, task: dict) -> list:
        try:
            url = mirrored(source_url(task, self.config.image_source), self.config.mirrors)
        except ValueError as exc:
            result = FetchResult(False, reason="invalid_url", detail=str(exc))
        else:
            etag, last_modified = _conditional(task)
            result = self._fetcher.fetch(url, etag=etag, last_modified=last_modified)
        self._record(result)
        return [_output(task, result)]

    def _record(self, result: FetchResult) -> None:
        outcome = "not_modified" if result.not_modified else ("ok" if result.ok else "failed")
        counts = {outcome: 1, "requests": result.requests,
                  "retries": max(0, result.attempts - 1)}
        if result.reason:
            counts[f"reason.{result.reason}"] = 1
        if result.content:
            counts["bytes"] = len(result.content)
        for name, n in counts.items():
            if n:
                self._metrics.inc(name, n)
                self.tally.add(f"fetch.{name}", n)
        progress.report("fetched" if result.ok else "fetch_failed")
        self._metrics.latency_ms(int(result.elapsed_s * 1000))
        self.tally.add(latency_key("fetch.latency_ms", result.elapsed_s))


def _conditional(task: dict) -> tuple[Optional[str], Optional[str]]:
    """Validators to send, only when the pipeline asked to revalidate."""
    if not task.get("revalidate"):
        return None, None
    return task.get("etag") or None, task.get("last_modified") or None


def _output(task: dict, result: FetchResult) -> Union[dict, TaggedOutput]:
    if result.not_modified:
        return TaggedOutput(NOT_MODIFIED, dict(task, http_status=304, attempts=result.attempts))
    if not result.ok:
        return TaggedOutput(FAILURES, failure(task, "fetch", result.reason or "internal_error",
                                              result.detail, result.http_status,
                                              result.attempts))
    content = result.content or b""
    return dict(task, content=content, image_sha256=hashlib.sha256(content).hexdigest(),
                image_format=result.image_format, http_status=result.http_status,
                attempts=result.attempts, etag=result.etag,
                last_modified=result.last_modified,
                fetch_seconds=round(result.elapsed_s, 3), bytes=len(content))
