"""Pictures for the page, looked up only by content hash.

A request names a picture by its SHA-256 (64 hex digits, checked); the
hash is looked up among the thumbnails the run kept (thumbnails-*.parquet
of the snapshot) and the image store's copies (STORE/images/*.parquet), and
the bytes come from that Parquet row. Nothing a request sends becomes a
path. Store copies are shrunk to a thumbnail on the way out (kept in a small
cache). The hash → (file, row group) index is read once, on first use.
"""
from __future__ import annotations

import base64
import functools
import logging
import re
import threading
from typing import Optional

import fsspec
import pyarrow.parquet as pq

from pipeline.tools.query import Snapshot
from pipeline.tools.report import thumbnail
from pipeline.tools.thumbnails import has_store
from transforms.store.layout import IMAGES, ImageStore, default_store

_LOG = logging.getLogger(__name__)
SHA = re.compile(r"^[0-9a-f]{64}$")
CACHED = 4096


class Pictures:
    """hash → JPEG thumbnail bytes, from the snapshot's thumbnails or the store."""

    def __init__(self, snapshot: Snapshot):
        self._snapshot = snapshot
        self._where: Optional[dict[str, tuple[str, int, str]]] = None
        self._lock = threading.Lock()
        self.thumbnail = functools.lru_cache(maxsize=CACHED)(self._thumbnail)

    def store_root(self) -> str:
        manifest = self._snapshot.manifest
        return (manifest.get("image_store") or (manifest.get("options") or {}).get("image_store")
                or default_store(self._snapshot.output))

    def sources(self) -> tuple[list[str], list[str]]:
        """(snapshot thumbnail files, store picture files) that exist."""
        fs, _, (root,) = fsspec.get_fs_token_paths(self._snapshot.folder)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        thumbs = [prefix + p for p in sorted(fs.glob(f"{root}/thumbnails-*.parquet"))]
        try:
            store = ImageStore(self.store_root()).parts(ImageStore(self.store_root())
                                                        .folder(IMAGES))
        except OSError:
            store = []
        return thumbs, store

    def missing(self) -> list[str]:
        """What the page cannot show, in words."""
        thumbs, store = self.sources()
        notes = []
        if not thumbs and not has_store(self._snapshot.manifest):
            notes.append("the run kept no thumbnails (a snapshot of an earlier version)")
        if not store:
            notes.append(f"no image store at {self.store_root()}: pictures without a kept "
                         "thumbnail are shown as placeholders")
        return notes

    def _index(self) -> dict[str, tuple[str, int, str]]:
        with self._lock:
            if self._where is None:
                where: dict[str, tuple[str, int, str]] = {}
                thumbs, store = self.sources()
                for paths, column in ((thumbs, "thumbnail"), (store, "data")):
                    for path in paths:
                        try:
                            _add(where, path, column)
                        except (OSError, ValueError) as err:
                            _LOG.warning("explore: cannot read %s: %s", path, err)
                self._where = where
            return self._where

    def has(self, sha: Optional[str]) -> bool:
        return bool(sha) and sha in self._index()

    def _thumbnail(self, sha: str) -> Optional[bytes]:
        if not SHA.match(sha or ""):
            return None
        found = self._index().get(sha)
        if found is None:
            return None
        path, group, column = found
        try:
            with fsspec.open(path, "rb") as handle:
                table = pq.ParquetFile(handle).read_row_group(group, columns=["image_sha256",
                                                                              column])
        except OSError:
            return None
        shas = table.column("image_sha256").to_pylist()
        if sha not in shas:
            return None
        data = table.column(column)[shas.index(sha)].as_py()
        if column == "thumbnail":
            return data
        small = thumbnail(data)
        return base64.b64decode(small.uri.split(",", 1)[1]) if small.uri else None


def _add(where: dict, path: str, column: str) -> None:
    with fsspec.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for group in range(parquet.num_row_groups):
            for sha in parquet.read_row_group(group, columns=["image_sha256"]) \
                    .column("image_sha256").to_pylist():
                if sha:
                    where.setdefault(sha, (path, group, column))
