"""Each distinct content embedded once: images already embedded skip the model.

The same picture often stands under several URLs (a specimen photo published
by two datasets, a placeholder shared by thousands of rows). URLs are
deduplicated by the fetch's grouping; contents are recognised by
`image_sha256` after the fetch. A worker process remembers the embeddings it
made in this run (a bounded LRU, about 1 kB each), and an image whose content
it already embedded takes that embedding without being decoded or
inferred. The memory is per process: a content first seen by two processes
at once is embedded by both (counted as `embed.inferred`).
"""
from __future__ import annotations

import collections
import datetime
import threading
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput

from transforms.tally import TALLY

KNOWN = "known"
CACHE_ENTRIES = 20_000  # about 20 MB of 256-float embeddings per process
# Keys of an image that describe one fetch, not one row.
_TRANSIENT_TASK_KEYS = ("revalidate", "previous")


class _Cache:
    """A thread-safe LRU of (run, sha256) → (embedding, width, height)."""

    def __init__(self, entries: int):
        self._entries = entries
        self._lock = threading.Lock()
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: tuple) -> Optional[tuple]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: tuple) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_EMBEDDED = _Cache(CACHE_ENTRIES)


def remember(run: str, image: dict, vector: np.ndarray) -> None:
    """`run` scopes the memory to one run (and so one model): a later run in
    the same process, `--full` say, embeds again."""
    _EMBEDDED.put((run, image.get("image_sha256")),
                  (vector, image.get("width"), image.get("height")))


def forget() -> None:
    _EMBEDDED.clear()


def rows_of(image: dict, vector: np.ndarray, fingerprint: str) -> list[dict]:
    """One embedding row per row (task) of the image; the image's own fields
    (sha256, size, validators) win over the task's."""
    fields = {k: v for k, v in image.items() if k not in ("tasks", "pixels", "content")}
    embedded_at = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for task in image["tasks"]:
        row = {k: v for k, v in task.items() if k not in _TRANSIENT_TASK_KEYS}
        row.update(fields, embedding=vector, model_fingerprint=fingerprint,
                   embedded_at=embedded_at)
        rows.append(row)
    return rows


class _SkipKnown(beam.DoFn):
    def __init__(self, fingerprint: str, run: str):
        self._fingerprint = fingerprint
        self._run = run

    def process(self, image: dict) -> Iterable:
        hit = _EMBEDDED.get((self._run, image.get("image_sha256")))
        if hit is None:
            yield image
            return
        vector, width, height = hit
        known = {k: v for k, v in image.items() if k != "content"}
        known.update(width=width, height=height)
        yield TaggedOutput(TALLY, {"dedup.content_reused": 1})
        for row in rows_of(known, vector, self._fingerprint):
            yield TaggedOutput(KNOWN, row)


class SkipKnownContent(beam.PTransform):
    """Fetched images → (images to decode and embed, rows of known contents, tally)."""

    def __init__(self, fingerprint: str, run: str):
        super().__init__()
        self._fingerprint = fingerprint
        self._run = run

    def expand(self, images):
        split = images | beam.ParDo(_SkipKnown(self._fingerprint, self._run)).with_outputs(
            KNOWN, TALLY, main="new")
        return split.new, split[KNOWN], split[TALLY]
