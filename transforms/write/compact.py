"""Compacting a run's parts into the snapshot's files, each row once.

Writers close a small part every minute or so (so that a crash loses little);
a 565,000-image run that lasts hours closes thousands. Publishing streams
them, one part at a time, into files of up to `ROWS_PER_FILE` rows, keeping
the first row of every key (gbifID, identifier): a bundle the runner retried,
or a part written twice, cannot put an image in the snapshot twice. Memory is
one part plus the set of keys seen (about 100 bytes a row). The key is
(coreID, identifier): the archive's core id, a GBIF download's gbifID or a
publisher's own occurrence id.
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.write.parts import COMPRESSION, parts_folder

ROWS_PER_FILE = 250_000


def part_files(folder: str, prefix: str) -> list[str]:
    """The closed parts of one kind in a run's folder, with their protocol."""
    fs, _, (root,) = fsspec.get_fs_token_paths(parts_folder(folder))
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    paths = sorted(fs.glob(posixpath.join(root, f"{prefix}-*.parquet")))
    return [p if protocol == "file" else f"{protocol}://{p}" for p in paths]


def table_keys(table: pa.Table) -> list[tuple[str, str]]:
    """The (coreID, identifier) keys of a table's rows (coreID from gbifID for
    rows written before core ids were kept)."""
    identifiers = table.column("identifier").to_pylist()
    core = table.column("coreID").to_pylist() if "coreID" in table.column_names else \
        [None] * table.num_rows
    gbif = table.column("gbifID").to_pylist() if "gbifID" in table.column_names else \
        [None] * table.num_rows
    return [(c or ("" if g is None else str(g)), i) for c, g, i in zip(core, gbif, identifiers)]


def _first_of_each_key(table: pa.Table, seen: set) -> pa.Table:
    keep = []
    for key in table_keys(table):
        keep.append(key not in seen)
        seen.add(key)
    return table if all(keep) else table.filter(pa.array(keep))


def compact(folder: str, prefix: str, schema: pa.Schema,
            seen: Optional[set] = None) -> list[tuple[str, int]]:
    """Parts of `prefix` → `<prefix>-NNNNN-<run>.parquet` files in `folder`;
    returns (path, rows) of the files written. Keys already in `seen` (and
    repeated keys) are dropped; `seen` is updated, so that embeddings
    compacted first keep a key out of the failures."""
    seen = set() if seen is None else seen
    written: list[tuple[str, int]] = []
    tag = uuid.uuid4().hex[:6]
    writer = handle = None
    path, rows = "", 0

    def close() -> None:
        nonlocal writer, handle
        if writer is not None:
            writer.close()
            handle.close()
            written.append((path, rows))
            writer = handle = None

    for part in part_files(folder, prefix):
        with fsspec.open(part, "rb") as source:
            table = pq.read_table(source).cast(schema)
        table = _first_of_each_key(table, seen)
        while table.num_rows:
            if writer is None:
                path = posixpath.join(folder, f"{prefix}-{len(written):05d}-{tag}.parquet")
                handle = fsspec.open(path, "wb").open()
                writer = pq.ParquetWriter(handle, schema, compression=COMPRESSION)
                rows = 0
            take = table.slice(0, ROWS_PER_FILE - rows)
            writer.write_table(take, row_group_size=8192)
            rows += take.num_rows
            table = table.slice(take.num_rows)
            if rows >= ROWS_PER_FILE:
                close()
    close()
    return written


def remove_parts(folder: str) -> None:
    fs, _, (root,) = fsspec.get_fs_token_paths(parts_folder(folder))
    if fs.exists(root):
        fs.rm(root, recursive=True)

