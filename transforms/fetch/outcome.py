"""What one fetch found: results, stable reason codes, and telling images apart.

Shared by the HTTP client and the gs:// reader, so both report the same
reasons: unsupported_scheme, invalid_url, blocked_address, dns_error,
connection_error, connection_dropped, timeout, throttled, tls_error,
too_many_redirects, bad_redirect, http_<status> (http_404, http_403, http_410,
http_429, http_500, ...), too_large, empty_body, not_an_image, internal_error.
"""
from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SNIFF_BYTES = 16

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
    sha256: Optional[str] = None  # of the fetched bytes, once they are dropped for a copy
    nbytes: int = 0


@dataclass
class Outcome:
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


def permanent(reason: str, detail: str, status: Optional[int] = None) -> Outcome:
    return Outcome("permanent", reason, detail, status)


def transient(reason: str, detail: str, status: Optional[int] = None,
               retry_after: Optional[float] = None) -> Outcome:
    return Outcome("transient", reason, detail, status, retry_after)


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


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def status_outcome(status: int, headers: Any) -> Outcome:
    """What a non-2xx status means for the retry loop."""
    if status in REDIRECT_STATUSES:
        location = headers.get("Location")
        if not location:
            return permanent("bad_redirect", f"{status} without a Location header")
        return Outcome("redirect", location=location)
    if status == 304:
        return Outcome("not_modified", detail="304 Not Modified")
    retry_after = parse_retry_after(headers.get("Retry-After")) \
        if status in (429, 503) else None
    if status in TRANSIENT_STATUSES or (status >= 500 and status not in (501, 505)):
        detail = f"HTTP {status}" + (f", Retry-After {retry_after:.0f}s"
                                     if retry_after is not None else "")
        return transient(f"http_{status}", detail, status, retry_after)
    return permanent(f"http_{status}", f"HTTP {status}", status)


