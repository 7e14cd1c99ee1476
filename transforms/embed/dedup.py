"""Each distinct content embedded once: images already embedded skip the model.

The same picture often stands under several URLs (a specimen photo published
by two datasets, a placeholder shared by thousands of rows). URLs are
deduplicated by the fetch's grouping; contents are recognised by
`image_sha256` after the fetch. A worker process remembers the embeddings it
made in this run (a bounded LRU, about 1 kB each); an image whose content it
already embedded takes that embedding without being decoded or inferred, and
an image whose content is being embedded right now waits here (a few seconds
at most) for that embedding instead of being embedded a second time. Nothing
is lost on the way: a held image whose twin does not come back (it failed,
or the bundle ends first) goes on to be embedded itself. The memory is per
process: a content first seen by two processes is embedded by both (each
inference is counted as `embed.inferred`).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.common.images import embedding_rows, facts_of
from transforms.common.tally import TALLY

KNOWN = "known"
CACHE_ENTRIES = 20_000  # about 20 MB of 256-float embeddings per process
HOLD_S = 10.0           # how long an image waits for its twin's embedding
MAX_HELD = 256          # images held at once per DoFn (they hold their bytes)


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
_IN_FLIGHT: dict[tuple, float] = {}  # (run, sha256) → when it went on to be embedded
_IN_FLIGHT_LOCK = threading.Lock()


def remember(run: str, image: dict, vector: np.ndarray) -> None:
    """`run` scopes the memory to one run (and so one model): a later run in
    the same process, `--full` say, embeds again."""
    key = (run, image.get("image_sha256"))
    _EMBEDDED.put(key, (vector, image.get("width"), image.get("height"),
                        image.get("precision")))
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.pop(key, None)


def forget() -> None:
    _EMBEDDED.clear()
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.clear()


def _start(key: tuple) -> bool:
    """Marks a content as being embedded; False if it already is (and recently)."""
    now = time.monotonic()
    with _IN_FLIGHT_LOCK:
        since = _IN_FLIGHT.get(key)
        if since is not None and now - since < HOLD_S:
            return False
        if len(_IN_FLIGHT) >= CACHE_ENTRIES:  # contents that failed never leave by `remember`
            for stale in [k for k, t in _IN_FLIGHT.items() if now - t >= HOLD_S]:
                del _IN_FLIGHT[stale]
        _IN_FLIGHT[key] = now
        return True


rows_of = embedding_rows  # one embedding row per row (task) of an image


class _SkipKnown(beam.DoFn):
    def __init__(self, fingerprint: str, run: str):
        self._fingerprint = fingerprint
        self._run = run

    def start_bundle(self):
        self._held: collections.OrderedDict = collections.OrderedDict()  # id → (key, image, t)

    def process(self, image: dict) -> Iterable:
        key = (self._run, image.get("image_sha256"))
        if _EMBEDDED.get(key) is not None:
            yield from self._known(key, image)
        elif _start(key) or len(self._held) >= MAX_HELD:
            yield image
        else:  # its twin is being embedded: wait for that embedding here
            self._held[id(image)] = (key, image, time.monotonic())
        yield from self._release(final=False)

    def finish_bundle(self):
        for output in self._release(final=True):
            yield _in_global_window(output)

    def _release(self, final: bool) -> Iterable:
        """Held images whose twin is embedded take its embedding; those held
        too long, or still held when the bundle ends, go on to be embedded."""
        now = time.monotonic()
        for token, (key, image, since) in list(self._held.items()):
            if _EMBEDDED.get(key) is not None:
                del self._held[token]
                yield from self._known(key, image)
            elif final or now - since >= HOLD_S:
                del self._held[token]
                yield image

    def _known(self, key: tuple, image: dict) -> Iterable:
        vector, width, height, precision = _EMBEDDED.get(key)
        known = facts_of(image)
        known.update(width=width, height=height, precision=precision)
        yield TaggedOutput(TALLY, {"dedup.content_reused": 1})
        for row in rows_of(known, vector, self._fingerprint):
            yield TaggedOutput(KNOWN, row)


def _in_global_window(output):
    """finish_bundle's outputs need a window: the batch pipeline's global one."""
    if isinstance(output, TaggedOutput):
        return TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP,
                                                      [GlobalWindow()]))
    return WindowedValue(output, MIN_TIMESTAMP, [GlobalWindow()])


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
