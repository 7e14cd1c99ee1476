"""The fetch stage's side of the store: what it fetched, kept as it goes.

Each host shard's pictures and URL entries go to parts of their own
(`<run>-<shard>-*`), pictures first, so a URL entry never names a content
whose copy is not durable yet, and a retried shard reads back only its own
parts (`stored_entries_in_run`, then the copies streamed by
`stored_copies_in_run`) instead of every part of the run. A content this
process already stored in this run is not stored again.
"""
from __future__ import annotations

import collections
import datetime
import threading
from typing import Optional

from transforms.store.layout import IMAGE_SCHEMA, IMAGES, URL_SCHEMA, URLS, ImageStore, shard_tag
from transforms.store.reading import read_columns, rows_for_anywhere
from transforms.write.parts import PartWriter

# A part of pictures is merged with its shard's others up to this size: reading
# a few pictures of it back reads only their row groups of this many rows.
MERGE_BYTES = 64 << 20
ROW_GROUP_ROWS = 64
STORED_MEMORY = 100_000  # contents this process remembers having stored in this run


class _ShardParts:
    def __init__(self, store: ImageStore, prefix: str, rows: int, seconds: float):
        self.images = PartWriter(store.folder(IMAGES), prefix, IMAGE_SCHEMA, rows, seconds,
                                 merge_bytes=MERGE_BYTES, row_group_rows=ROW_GROUP_ROWS)
        self.urls = PartWriter(store.folder(URLS), prefix, URL_SCHEMA, rows, seconds)

    def add(self, entry: dict, image: Optional[dict]) -> None:
        if image is not None:
            self.images.append(image)
        self.urls.append(entry)
        if self.images.due() or self.urls.due():
            self.flush()

    def flush(self) -> None:
        self.images.flush()  # pictures first: an entry never names a copy not yet durable
        self.urls.flush()


class StoreWriter:
    """Per host shard part writers of one run, in one worker process."""

    def __init__(self, store: ImageStore, run: str, rows_per_part: int,
                 seconds_per_part: float):
        self._store = store
        self._run = run
        self._every = (rows_per_part, seconds_per_part)
        self._shards: dict[str, _ShardParts] = {}
        self._stored: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, host: str, shard: int, entry: dict, image: Optional[dict] = None) -> None:
        """A URL entry, with the content's copy when the fetch gave a new one."""
        with self._lock:
            tag = shard_tag(host, shard)
            parts = self._shards.get(tag)
            if parts is None:
                parts = self._shards[tag] = _ShardParts(self._store, f"{self._run}-{tag}",
                                                        *self._every)
            if image is not None and self._remember(image["image_sha256"]):
                image = None  # stored once already by this process in this run
            parts.add(entry, image)

    def _remember(self, sha: str) -> bool:
        """True when the content was stored before."""
        if sha in self._stored:
            self._stored.move_to_end(sha)
            return True
        self._stored[sha] = None
        while len(self._stored) > STORED_MEMORY:
            self._stored.popitem(last=False)
        return False

    def flush(self) -> None:
        with self._lock:
            for parts in self._shards.values():
                parts.flush()


def url_entry(identifier: str, fetched_from: str, outcome: str, *, sha: Optional[str] = None,
              etag: Optional[str] = None, last_modified: Optional[str] = None,
              http_status: Optional[int] = None) -> dict:
    return {"identifier": identifier, "fetched_from": fetched_from, "image_sha256": sha,
            "etag": etag, "last_modified": last_modified, "http_status": http_status,
            "outcome": outcome, "fetched_at": datetime.datetime.now(datetime.timezone.utc)}


def stored_entries_in_run(store: ImageStore, run: str, host: str, shard: int,
                          identifiers: set[str]) -> dict[str, dict]:
    """Of `identifiers`, those this run already stored for one host shard:
    identifier → its URL entry (no picture bytes). Reads the shard's own URL
    parts only, two columns first, so memory is the wanted entries, not the
    shard's."""
    prefix = f"{run}-{shard_tag(host, shard)}-"
    entries: dict[str, dict] = {}
    for path in store.parts(store.folder(URLS), prefix):
        keys = read_columns(path, ["identifier", "image_sha256"])
        if keys is None:
            continue
        hits = [i for i, (identifier, sha) in enumerate(zip(
            keys.column("identifier").to_pylist(), keys.column("image_sha256").to_pylist()))
            if sha and identifier in identifiers]
        if not hits:
            continue
        table = read_columns(path, [n for n in URL_SCHEMA.names if n != "failed_times"])
        if table is not None:
            for entry in table.take(hits).to_pylist():
                entries[entry["identifier"]] = entry
    return entries


def stored_copies_in_run(store: ImageStore, run: str, host: str, shard: int,
                         shas: set[str]):
    """The copies of `shas` this run stored for one host shard, one at a time
    as they are read (a row group of ROW_GROUP_ROWS pictures at most in
    memory): a retried bundle streams back what it needs."""
    prefix = f"{run}-{shard_tag(host, shard)}-"
    left = set(shas)
    for path in store.parts(store.folder(IMAGES), prefix):
        if not left:
            return
        for row in rows_for_anywhere(path, set(left), IMAGE_SCHEMA.names):
            if row["image_sha256"] in left:
                left.discard(row["image_sha256"])
                yield row
