"""The HTTP(S) client of the fetch stage: one request, watched and capped.

Socket time-outs bound each read, not their sum, so a watchdog cuts
connections that outlive their fetch's deadline. Connections go to the
address the `AddressGuard` vetted, never to a name, so DNS cannot change
where they go; keep-alive pools are keyed by that address. Bodies are
streamed under a byte cap and sniffed early, so an HTML page or a huge file
costs a few kilobytes, not the whole download.
"""
from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

import urllib3
from urllib3 import connection as u3c
from urllib3 import exceptions as u3e

from transforms.fetch.address_guard import Verdict, pick_address
from transforms.fetch.config import FetchConfig
from transforms.fetch.outcome import (SNIFF_BYTES, Outcome, describe_content, permanent,
                                      short, sniff_format, status_outcome, transient)

# What a connection shut down by the watchdog looks like to the reader.
_CUT_BY_WATCHDOG = frozenset({"connection_error", "connection_dropped", "tls_error"})
CHUNK_BYTES = 64 * 1024
MAX_POOLS = 512


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


class HttpClient:
    """Sends one GET to a vetted address and reads the answer; never raises."""

    def __init__(self, config: FetchConfig, pool_size: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._pools = _Pools(pool_size, config.ca_certs or _ca_bundle())

    def close(self) -> None:
        self._pools.close()

    def send(self, parts: urllib.parse.SplitResult, verdict: Verdict, attempt: int,
             headers: dict[str, str], deadline: float) -> Outcome:
        address = pick_address(verdict.addresses, attempt)
        pool = self._pools.get(parts.scheme.lower(), address, verdict.port, verdict.host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        remaining = deadline - self._clock()
        if remaining <= 0:
            return permanent("timeout", "fetch deadline passed")
        timeout = urllib3.Timeout(connect=min(self.config.connect_timeout, remaining),
                                  read=min(self.config.read_timeout, remaining))
        request_headers = dict(headers, Host=parts.netloc.rsplit("@", 1)[-1])
        with _WATCHDOG.watching(deadline):
            outcome = self._exchange(pool, target, request_headers, timeout, deadline)
        outcome.sent = True
        if outcome.reason in _CUT_BY_WATCHDOG and self._clock() >= deadline:
            return permanent("timeout", f"fetch deadline passed ({outcome.detail})",
                             outcome.status)
        return outcome

    def _exchange(self, pool: urllib3.HTTPConnectionPool, target: str,
                  headers: dict[str, str], timeout: urllib3.Timeout,
                  deadline: float) -> Outcome:
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

    def _answer(self, response: urllib3.HTTPResponse, deadline: float) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            outcome = self._read_body(response, deadline)
        else:
            response.close()  # no use for an error page; keep-alive is not worth it
            outcome = status_outcome(status, response.headers)
        outcome.status = status
        outcome.etag = response.headers.get("ETag")
        outcome.last_modified = response.headers.get("Last-Modified")
        return outcome

    def _read_body(self, response: urllib3.HTTPResponse, deadline: float) -> Outcome:
        """Stream the body under the byte cap and the deadline.

        Sniffing the first bytes stops a large HTML page early; the socket
        time-out is tightened before each read so a slow drip cannot outlive
        the deadline.
        """
        limit = self.config.max_image_bytes
        length = _content_length(response.headers)
        if length is not None and length > limit:
            response.close()
            return permanent("too_large", f"Content-Length {length} > {limit} bytes")
        body = bytearray()
        image_format: Optional[str] = None
        try:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    response.close()
                    return transient("timeout", f"fetch deadline passed after {len(body)} bytes")
                _set_read_timeout(response, min(self.config.read_timeout, remaining))
                chunk = response.read1(CHUNK_BYTES)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    response.close()
                    return permanent("too_large", f"body exceeds {limit} bytes")
                if image_format is None and len(body) >= SNIFF_BYTES:
                    image_format = sniff_format(bytes(body[:SNIFF_BYTES]))
                    if image_format is None:
                        response.close()
                        return self._not_an_image(body, response)
        except u3e.ReadTimeoutError as exc:
            response.close()
            return transient("timeout", f"read timed out after {len(body)} bytes: {exc}")
        except (u3e.ProtocolError, u3e.DecodeError, OSError, ValueError) as exc:
            response.close()
            return transient("connection_dropped",
                              f"connection lost after {len(body)} bytes: {short(exc)}")
        if not body:
            return permanent("empty_body", "the server answered with zero bytes")
        image_format = image_format or sniff_format(bytes(body))
        if image_format is None:
            return self._not_an_image(body, response)
        return Outcome("ok", content=bytes(body), image_format=image_format)

    @staticmethod
    def _not_an_image(body: bytearray, response: urllib3.HTTPResponse) -> Outcome:
        head = bytes(body[:SNIFF_BYTES])
        content_type = response.headers.get("Content-Type", "(none)")
        return permanent("not_an_image", f"body is {describe_content(bytes(body[:64]))}, "
                          f"not an image (Content-Type {content_type}; first bytes {head!r})")


def _set_read_timeout(response: urllib3.HTTPResponse, seconds: float) -> None:
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(0.001, seconds))


def _request_error(exc: BaseException) -> Outcome:
    """Classify an exception raised before any response arrived."""
    if isinstance(exc, u3e.NewConnectionError):
        return transient("connection_error", short(exc))
    if isinstance(exc, (u3e.ConnectTimeoutError, u3e.ReadTimeoutError, TimeoutError)):
        return transient("timeout", short(exc))
    if isinstance(exc, u3e.SSLError):
        if _is_certificate_error(exc):
            return permanent("tls_error", short(exc))
        return transient("tls_error", short(exc))
    if isinstance(exc, (u3e.LocationParseError, ValueError, UnicodeError)):
        return permanent("invalid_url", short(exc))
    if isinstance(exc, (u3e.HTTPError, OSError)):
        return transient("connection_error", short(exc))
    return permanent("internal_error", short(exc))

