"""One fetch's result → the stage's outputs and the image store's entries.

A fetched picture leaves the fetch stage as the image store's copy (made on
the fetching thread: `copy_of`), never as the original bytes: every model,
in this run and later ones, embeds the same copy, and what crosses a shuffle
afterwards is a few tens of kB per picture.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

from apache_beam.pvalue import TaggedOutput

from transforms.common.images import image_element
from transforms.common.pictures import DecodeError
from transforms.common.records import FAILURES, NOT_MODIFIED, failure
from transforms.fetch.outcome import FetchResult
from transforms.store.copies import FORMAT, StoredCopy, make_copy
from transforms.store.layout import OK
from transforms.store.writing import url_entry


def copy_of(result: FetchResult, max_pixels: int) -> Any:
    """The store's copy of a fetched picture (a StoredCopy), or the DecodeError
    that says why there is none; None for a failed fetch or a 304. The
    original bytes are dropped from the result here: only the copy goes on."""
    if not result.ok or result.not_modified or result.content is None:
        return None
    content, result.content = result.content, None
    result.sha256, result.nbytes = hashlib.sha256(content).hexdigest(), len(content)
    try:
        return make_copy(content, max_pixels)
    except DecodeError as err:
        return err


def outputs(rows: list[dict], result: FetchResult, copy: Any) -> list:
    """One fetch's result for every row of its URL."""
    if result.not_modified:
        return [TaggedOutput(NOT_MODIFIED, dict(task, http_status=304, attempts=result.attempts))
                for task in rows]
    if not result.ok:
        return [TaggedOutput(FAILURES, failure(task, "fetch", result.reason or "internal_error",
                                               result.detail, result.http_status,
                                               result.attempts))
                for task in rows]
    if isinstance(copy, DecodeError):
        return [TaggedOutput(FAILURES, failure(task, "decode", copy.reason, copy.detail,
                                               result.http_status, result.attempts))
                for task in rows]
    if not isinstance(copy, StoredCopy):  # `after` itself failed: say so, lose nothing
        return [TaggedOutput(FAILURES, failure(task, "decode", "internal_error", repr(copy),
                                               result.http_status, result.attempts))
                for task in rows]
    return [image(rows, copy, result.sha256 or "", result.image_format,
                  result.http_status, result.attempts, result.etag, result.last_modified,
                  round(result.elapsed_s, 3), result.nbytes)]


def image(rows: list[dict], copy: StoredCopy, sha: str, image_format: Optional[str],
          http_status: Optional[int], attempts: int, etag: Optional[str],
          last_modified: Optional[str], fetch_seconds: float, nbytes: int) -> dict:
    """The element that goes on to be embedded: the copy, its content's
    identity, the fetched picture's size, and every row of its URL."""
    return image_element(rows, content=copy.data, sha=sha, width=copy.source_width,
                         height=copy.source_height, image_format=image_format,
                         http_status=http_status, attempts=attempts, etag=etag,
                         last_modified=last_modified, fetch_seconds=fetch_seconds,
                         nbytes=nbytes)


def store_entries(identifier: str, fetched_from: str, result: FetchResult,
                  copy: Any) -> tuple[Optional[dict], Optional[dict]]:
    """(URL index entry, copy row) for the store; (None, None) for a 304."""
    if result.not_modified:
        return None, None
    if not result.ok:
        return url_entry(identifier, fetched_from, result.reason or "internal_error",
                         http_status=result.http_status), None
    sha = result.sha256
    if not isinstance(copy, StoredCopy):
        reason = copy.reason if isinstance(copy, DecodeError) else "internal_error"
        return url_entry(identifier, fetched_from, reason, sha=None,
                         http_status=result.http_status), None
    entry = url_entry(identifier, fetched_from, OK, sha=sha, etag=result.etag,
                      last_modified=result.last_modified, http_status=result.http_status)
    row = {"image_sha256": sha, "format": FORMAT, "width": copy.width, "height": copy.height,
           "source_width": copy.source_width, "source_height": copy.source_height,
           "source_bytes": result.nbytes, "data": copy.data}
    return entry, row
