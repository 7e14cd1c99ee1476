"""Reading the store's parts: whole columns for indexes, a few rows for contents.

Indexes (which URL holds which content, which part holds which content) read
one or two small columns of every part; contents (pictures, embeddings) are
read from one part at a time, only the row groups that hold the wanted rows.
A part merged away between listing and reading is looked for again among the
parts of the same folder and prefix, so a reader never fails for a merge.
"""
from __future__ import annotations

import posixpath
from typing import Iterable, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_columns(path: str, columns: list[str]) -> Optional[pa.Table]:
    """Some columns of a part; None when the part is gone (merged meanwhile)."""
    try:
        with fsspec.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)
    except FileNotFoundError:
        return None


def rows_for(path: str, wanted: set[str], columns: Optional[list[str]] = None,
             key: str = "image_sha256") -> Iterator[dict]:
    """The rows of a part whose `key` is in `wanted`, reading only the row
    groups that hold them; FileNotFoundError when the part is gone."""
    with fsspec.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        keys = parquet.read(columns=[key]).column(key).to_pylist()
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                  for g in range(parquet.num_row_groups)])
        hits = [i for i, value in enumerate(keys) if value in wanted]
        groups = sorted({int(np.searchsorted(starts, i, side="right") - 1) for i in hits})
        seen: set[str] = set()
        for group in groups:
            table = parquet.read_row_group(group, columns=columns)
            yield from _rows(table, int(starts[group]), hits, key, seen)


def _rows(table: pa.Table, offset: int, hits: list[int], key: str,
          seen: set[str]) -> Iterator[dict]:
    embedding = None
    if "embedding" in table.column_names:
        column = table.column("embedding").combine_chunks()
        embedding = column.values.to_numpy().reshape(len(column), -1)
        table = table.drop(["embedding"])
    local = [i - offset for i in hits if offset <= i < offset + table.num_rows]
    rows = table.take(pa.array(local, pa.int64())).to_pylist() if local else []
    for i, row in zip(local, rows):
        if row[key] in seen:  # a content stored twice in one part
            continue
        seen.add(row[key])
        if embedding is not None:
            row["embedding"] = embedding[i].copy()
        yield row


def siblings(path: str) -> list[str]:
    """Parts of the same folder and writer prefix: where a merged part's rows went."""
    folder, name = posixpath.split(path)
    prefix = name.rsplit("-", 1)[0]
    fs, _, (root,) = fsspec.get_fs_token_paths(folder)
    fs.invalidate_cache()
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = sorted(fs.glob(posixpath.join(root, f"{prefix}-*.parquet")))
    return [p if protocol == "file" else f"{protocol}://{p}" for p in found]


def rows_for_anywhere(path: str, wanted: set[str], columns: Optional[list[str]] = None,
                      key: str = "image_sha256") -> Iterator[dict]:
    """`rows_for`, looking among the part's siblings when it was merged away."""
    try:
        yield from rows_for(path, wanted, columns, key)
        return
    except FileNotFoundError:
        pass
    left = set(wanted)
    for other in siblings(path):
        if not left:
            return
        try:
            for row in rows_for(other, left, columns, key):
                left.discard(row[key])
                yield row
        except FileNotFoundError:
            continue


def url_entries(paths: Iterable[str]) -> Iterator[dict]:
    """Every URL index entry of some parts (parts gone meanwhile are skipped)."""
    for path in paths:
        table = read_columns(path, ["identifier", "fetched_from", "image_sha256", "etag",
                                    "last_modified", "http_status", "outcome", "fetched_at"])
        if table is not None:
            yield from table.to_pylist()
