"""The image store on disk: what it holds, where, and in which columns.

Fetching is bound by one host's politeness (hours for a one-host dataset),
embedding by CPUs; so fetching fills a store that every run and every model
reads, and a new model never asks the hosts again. The store (`--image_store`,
default `OUTPUT/store`, local or gs://) holds Parquet parts, each written whole
or not at all, like the snapshot's parts:

    images/<run>-<shard>-<id>.parquet      one copy per content: image_sha256 (of the
                                            fetched bytes), the copy's JPEG and sizes
    urls/<run>-<shard>-<id>.parquet        the URL index: identifier → image_sha256,
                                            ETag, Last-Modified, when fetched, outcome
    embeddings/<model>/<run>-<id>.parquet  the embedding cache of one model (its
                                            fingerprint): image_sha256 → embedding
    store.json                             how copies are made (size, quality)

Nothing points at a part by name (writers merge their small parts), so
readers find contents by the `image_sha256` column, which is cheap to read
alone. Fetch parts are named by run and host shard, so a retried shard reads
only its own.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Optional

import fsspec
import pyarrow as pa

from transforms.common.files import write_atomically
from transforms.store.copies import COPY_KEY

IMAGES = "images"
COPY_METADATA = "gbif_embed.copy"
URLS = "urls"
EMBEDDINGS = "embeddings"
STORE_JSON = "store.json"
OK = "ok"  # the URL index's outcome of a fetch that gave a picture

IMAGE_SCHEMA = pa.schema([
    ("image_sha256", pa.string()),
    ("format", pa.string()),
    ("width", pa.int32()),          # the copy's size
    ("height", pa.int32()),
    ("source_width", pa.int32()),   # the fetched picture's size, before EXIF rotation
    ("source_height", pa.int32()),
    ("source_bytes", pa.int64()),
    ("data", pa.binary()),
], metadata={COPY_METADATA: COPY_KEY})  # how the copies were made (copies.py)

URL_SCHEMA = pa.schema([
    ("identifier", pa.string()),    # the export's URL: what rows carry
    ("fetched_from", pa.string()),  # after --mirror and --image_source
    ("image_sha256", pa.string()),  # null when the fetch gave no picture
    ("etag", pa.string()),
    ("last_modified", pa.string()),
    ("http_status", pa.int32()),
    ("outcome", pa.string()),       # "ok", or the failure reason (http_404, not_an_image, ...)
    ("fetched_at", pa.timestamp("us", tz="UTC")),
    # Set by compaction (transforms/store/maintenance.py): how many times in a row
    # the URL failed for good (404, 410, not a picture); null in a fetch's entry.
    ("failed_times", pa.int32()),
])


def cache_schema(width: int) -> pa.Schema:
    return pa.schema([
        ("image_sha256", pa.string()),
        ("width", pa.int32()),      # the fetched picture's size, as rows carry it
        ("height", pa.int32()),
        ("precision", pa.string()),   # what it was computed in (--precision)
        ("embedding", pa.list_(pa.float32(), width)),
    ])


def default_store(output: str) -> str:
    return posixpath.join(output.rstrip("/"), "store")


def shard_tag(host: str, shard: int) -> str:
    """A short stable name for one host shard, safe in file names."""
    return hashlib.blake2b(f"{host}#{shard}".encode("utf-8", "surrogatepass"),
                           digest_size=6).hexdigest()


def model_key(fingerprint: str) -> str:
    """The embedding cache's folder name for a model fingerprint."""
    return fingerprint.split(":", 1)[-1]


class ImageStore:
    """Paths of one store; listing is done when asked, never cached."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def folder(self, kind: str) -> str:
        return posixpath.join(self.root, kind)

    def cache_folder(self, fingerprint: str) -> str:
        return posixpath.join(self.root, EMBEDDINGS, model_key(fingerprint))

    def parts(self, folder: str, prefix: str = "") -> list[str]:
        """The closed parts of a folder (temporary files are never listed)."""
        fs, _, (root,) = fsspec.get_fs_token_paths(folder)
        fs.invalidate_cache()
        if not fs.exists(root):
            return []
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        paths = sorted(fs.glob(posixpath.join(root, f"{prefix}*.parquet")))
        return [p if protocol == "file" else f"{protocol}://{p}" for p in paths]

    def describe(self) -> Optional[dict]:
        fs, _, (path,) = fsspec.get_fs_token_paths(posixpath.join(self.root, STORE_JSON))
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as handle:
            return json.load(handle)

    def write_description(self, description: dict) -> None:
        """store.json, written once by the first run that uses the store."""
        if self.describe() is None:
            write_atomically(posixpath.join(self.root, STORE_JSON),
                             json.dumps(description, indent=2))

    def record_copies(self, key: str, parameters: dict) -> None:
        """Adds how this run makes copies to store.json's `copies` (one entry
        per set of parameters the store's copies were made with)."""
        description = self.describe() or {}
        known = description.setdefault("copies", {})
        if known.get(key) != parameters:
            known[key] = parameters
            write_atomically(posixpath.join(self.root, STORE_JSON),
                             json.dumps(description, indent=2))
