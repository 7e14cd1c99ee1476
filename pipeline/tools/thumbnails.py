"""The pictures of report.html: thumbnails the runs kept, carried from
snapshot to snapshot, so that a report never asks an image host again.

Decoding keeps a thumbnail of a sample of the images a run fetches
(transforms/embed/decode.py: every image up to 500 per worker process, then one in
64). A refresh fetches only new or changed images, so the thumbnails of the
unchanged ones come from the previous snapshot: the report copies those still
shown into `thumbnails-carried.parquet` of the new snapshot, and the chain
goes on from there. The report then samples its images and their neighbours
among the images that have a thumbnail.
"""
from __future__ import annotations

import base64
from typing import Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.query import Snapshot, iter_batches
from transforms.common.files import join
from transforms.write.snapshot import read_manifest
from transforms.write.parts import THUMBNAIL_SCHEMA, write_table_atomically

CARRIED = "thumbnails-carried.parquet"


def has_store(manifest: dict) -> bool:
    """Whether the run kept thumbnails (snapshots made before they did, did not)."""
    return "thumbnails" in (manifest.get("files") or {})


def _files(output: str, name: str) -> list[str]:
    fs, _, (root,) = fsspec.get_fs_token_paths(join(output, name))
    fs.invalidate_cache()
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    paths = sorted(fs.glob(f"{root}/thumbnails-*.parquet"))
    return [p if protocol == "file" else f"{protocol}://{p}" for p in paths]


def _read(paths: Sequence[str], into: dict[str, bytes]) -> None:
    for path in paths:
        with fsspec.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["image_sha256", "thumbnail"])
        for sha, picture in zip(table.column("image_sha256").to_pylist(),
                                table.column("thumbnail").to_pylist()):
            if sha and picture:
                into.setdefault(sha, picture)


def kept_thumbnails(snapshot: Snapshot) -> dict[str, bytes]:
    """image_sha256 → JPEG of the snapshot's images that have a thumbnail: its
    own run's, and those of the previous snapshot for images still here (which
    are carried into this snapshot for the next one)."""
    kept: dict[str, bytes] = {}
    own = [p for p in _files(snapshot.output, snapshot.name) if not p.endswith(CARRIED)]
    _read(own, kept)
    previous = _previous_with_store(snapshot)
    if previous is None:
        return kept
    earlier: dict[str, bytes] = {}
    _read(_files(snapshot.output, previous), earlier)
    present = _shas(snapshot.files)
    carried = {sha: picture for sha, picture in earlier.items()
               if sha in present and sha not in kept}
    if carried:
        write_table_atomically(join(snapshot.folder, CARRIED), pa.table(
            {"coreID": pa.nulls(len(carried), pa.string()),
             "gbifID": pa.nulls(len(carried), pa.int64()),
             "identifier": pa.nulls(len(carried), pa.string()),
             "image_sha256": list(carried), "thumbnail": list(carried.values())},
            schema=THUMBNAIL_SCHEMA))
    kept.update(carried)
    return kept


def _previous_with_store(snapshot: Snapshot) -> Optional[str]:
    previous = snapshot.manifest.get("previous_snapshot")
    if not previous:
        return None
    try:
        manifest = read_manifest(snapshot.output, previous)
    except (OSError, ValueError):
        return None  # pruned, or never published: nothing to carry
    return previous if has_store(manifest) else None


def _shas(files: Sequence[str]) -> set[str]:
    shas: set[str] = set()
    for _, batch in iter_batches(files, ["image_sha256"]):
        shas.update(s for s in batch.column("image_sha256").to_pylist() if s)
    return shas


def with_thumbnail(files: Sequence[str], kept: dict[str, bytes]) -> np.ndarray:
    """Per gallery row: whether its image has a thumbnail."""
    parts = [np.array([sha in kept for sha in batch.column("image_sha256").to_pylist()], bool)
             for _, batch in iter_batches(files, ["image_sha256"])]
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def data_uri(picture: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(picture).decode()
