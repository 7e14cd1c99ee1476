"""Reading gs:// image URLs with the worker's own credentials (gcsfs).

Only a task's own URL may be gs://: a redirect from a third party must not
steer the worker's credentials (the HTTP client refuses that). gcsfs calls
have no deadline of their own, so they run on helper threads and the caller
stops waiting when its fetch's deadline passes.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Any, Callable

from transforms.fetch.outcome import (SNIFF_BYTES, Outcome, describe_content, permanent,
                                      short, sniff_format, transient)


class GcsReader:
    """Reads one object under the byte cap and the fetch's deadline."""

    def __init__(self, helpers: concurrent.futures.Executor, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        self._helpers = helpers
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._fs = None

    def read(self, url: str, deadline: float) -> Outcome:
        future = self._helpers.submit(_read_gcs_object, self._filesystem(), url,
                                      self._max_bytes)
        try:
            return future.result(timeout=max(0.0, deadline - self._clock()))
        except concurrent.futures.TimeoutError:
            return permanent("timeout", f"{url} did not arrive before the deadline")
        except Exception as exc:  # gcsfs raises many kinds; all are reported
            return _gcs_error(url, exc)

    def _filesystem(self):
        with self._lock:
            if self._fs is None:
                self._fs = _new_gcs_filesystem()
            return self._fs


def _new_gcs_filesystem():
    """gcsfs, anonymous against an emulator (no metadata-server probing)."""
    import gcsfs
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def _read_gcs_object(fs: Any, url: str, limit: int) -> Outcome:
    path = url[len("gs://"):]
    size = fs.info(path).get("size")
    if size is not None and int(size) > limit:
        return permanent("too_large", f"{url} is {size} bytes > {limit}")
    data = fs.cat_file(path, start=0, end=limit + 1)
    if len(data) > limit:
        return permanent("too_large", f"{url} exceeds {limit} bytes")
    if not data:
        return permanent("empty_body", f"{url} is empty")
    image_format = sniff_format(data[:SNIFF_BYTES])
    if image_format is None:
        return permanent("not_an_image", f"{url} is {describe_content(data[:64])}, "
                         f"not an image (first bytes {data[:SNIFF_BYTES]!r})")
    return Outcome("ok", content=bytes(data), image_format=image_format, status=200)


def _gcs_error(url: str, exc: BaseException) -> Outcome:
    if isinstance(exc, FileNotFoundError):
        return permanent("http_404", f"{url} not found", 404)
    if isinstance(exc, PermissionError):
        return permanent("http_403", f"{url}: access denied ({exc})", 403)
    return transient("connection_error", f"{url}: {short(exc)}")
