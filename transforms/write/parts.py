"""Writing embedding and failure rows to Parquet as the run goes.

A long run must keep its finished work through a crash, so rows are not held
until a bundle ends (on the local runner one bundle is the whole run): each
writer closes a *part* file every `rows_per_part` rows or `seconds_per_part`
seconds, into the snapshot's `parts/` folder. A part appears whole or not at
all (a local file is written under a temporary name and renamed; gcsfs
uploads an object when it is closed), so a run killed at any moment keeps
every part it closed. Publishing compacts the parts into a few large files
(`transforms/write/compact.py`). Local folders and gs:// behave the same, through
fsspec.
"""
from __future__ import annotations

import os
import posixpath
import time
import uuid
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.common import lease, progress
from transforms.common.lease import LeaseRef

COMPRESSION = "zstd"


def embedding_schema(dim: int = 256) -> pa.Schema:
    return pa.schema([
        ("coreID", pa.string()),
        ("gbifID", pa.int64()),
        ("occurrenceID", pa.string()),
        ("datasetKey", pa.string()),
        ("taxonKey", pa.int64()),
        ("scientificName", pa.string()),
        ("identifier", pa.string()),
        ("license", pa.string()),
        ("rightsHolder", pa.string()),
        ("creator", pa.string()),
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("etag", pa.string()),
        ("last_modified", pa.string()),
        ("model_fingerprint", pa.string()),
        ("precision", pa.string()),
        ("embedded_at", pa.timestamp("us", tz="UTC")),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


# Pictures kept by the run for report.html (transforms/embed/decode.py says which).
THUMBNAIL_SCHEMA = pa.schema([
    ("coreID", pa.string()),
    ("gbifID", pa.int64()),
    ("identifier", pa.string()),
    ("image_sha256", pa.string()),
    ("thumbnail", pa.binary()),
])


FAILURE_SCHEMA = pa.schema([
    ("coreID", pa.string()),
    ("gbifID", pa.int64()),
    ("identifier", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("http_status", pa.int32()),
    ("attempts", pa.int32()),
    ("detail", pa.string()),
])


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows → table; the embedding column is built from one contiguous array."""
    columns = []
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            flat = np.concatenate([np.asarray(r[field.name], np.float32) for r in rows])
            columns.append(pa.FixedSizeListArray.from_arrays(
                pa.array(flat, pa.float32()), field.type.list_size))
        else:
            columns.append(_column([r.get(field.name) for r in rows], field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# What pa.array raises for a value its type cannot hold (an int beyond int64,
# a string with a lone surrogate, a value of another type).
_UNWRITABLE = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeError, TypeError,
               ValueError)


def _column(values: list, type_: pa.DataType) -> pa.Array:
    """One column; a value that cannot be written becomes null rather than
    failing the part (and with it the run). The fast path is one call."""
    try:
        return pa.array(values, type_)
    except _UNWRITABLE:
        return pa.array([_writable(v, type_) for v in values], type_)


def _writable(value, type_: pa.DataType):
    try:
        pa.array([value], type_)
    except _UNWRITABLE:
        return None
    return value


PARTS = "parts"
_PART_MS = Metrics.distribution("write", "part_ms")  # where a run's time went
ROWS_PER_PART = 500
SECONDS_PER_PART = 5.0
# A writer merges its small parts every this many, so an 8-hour run keeps a few
# hundred parts per writer, not thousands.
MERGE_PARTS = 32


def parts_folder(folder: str) -> str:
    return posixpath.join(folder, PARTS)


def write_table_atomically(path: str, table: pa.Table) -> None:
    """Readers (and a later resume) see the whole file or none of it."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{os.path.dirname(local)}/.{os.path.basename(local)}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp, compression=COMPRESSION)
        os.replace(tmp, local)
        return
    with fs.open(local, "wb") as handle:  # object stores publish on close
        pq.write_table(table, handle, compression=COMPRESSION)


def write_table_grouped(path: str, table: pa.Table, row_group_rows: int) -> None:
    """As write_table_atomically, in row groups of `row_group_rows` rows, so a
    reader can read a few rows of a large part without reading all of it."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    target = local
    if "file" in protocols:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        target = f"{os.path.dirname(local)}/.{os.path.basename(local)}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(target, "wb") as handle:
        pq.write_table(table, handle, compression=COMPRESSION, row_group_size=row_group_rows)
    if target != local:
        os.replace(target, local)


class PartWriter:
    """Rows → durable part files `<folder>/<prefix>-<uuid>.parquet`, closed every
    `rows_per_part` rows or `seconds_per_part` seconds (checked as rows arrive)
    and on `flush`; every `merge_parts` parts (or `merge_bytes` of them, for
    parts of pictures) the writer merges its own small parts into one. Used
    by the writer step below and by the fetch stage, which writes the image
    store as it fetches."""

    def __init__(self, folder: str, prefix: str, schema: pa.Schema,
                 rows_per_part: int = ROWS_PER_PART,
                 seconds_per_part: float = SECONDS_PER_PART,
                 merge_parts: int = 0, merge_bytes: int = 0,
                 row_group_rows: int = 0):
        self.folder = folder
        self._prefix = prefix
        self._schema = schema
        self._rows_per_part = rows_per_part
        self._seconds_per_part = seconds_per_part
        self._merge_parts = merge_parts or MERGE_PARTS
        self._merge_bytes = merge_bytes
        self._row_group_rows = row_group_rows
        self._buffer: list[dict] = []
        self._since = time.monotonic()
        self._small: list[tuple[str, int]] = []  # (path, bytes) of parts not merged yet

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, row: dict) -> Optional[tuple[str, int]]:
        """Buffers a row; returns (path, rows) when that closed a part."""
        self.append(row)
        if self.due():
            return self.flush()
        return None

    def append(self, row: dict) -> None:
        """Buffers a row without closing a part (the caller checks `due`)."""
        if not self._buffer:
            self._since = time.monotonic()
        self._buffer.append(row)

    def due(self) -> bool:
        return bool(self._buffer) and (
            len(self._buffer) >= self._rows_per_part
            or time.monotonic() - self._since >= self._seconds_per_part)

    def flush(self) -> Optional[tuple[str, int]]:
        """Closes a part of the buffered rows, if any."""
        if not self._buffer:
            return None
        started = time.monotonic()
        rows, self._buffer = self._buffer, []
        path = posixpath.join(self.folder, f"{self._prefix}-{uuid.uuid4().hex[:16]}.parquet")
        table = to_table(rows, self._schema)
        self._write(path, table)
        self._small.append((path, table.nbytes))
        if len(self._small) >= self._merge_parts or (
                self._merge_bytes and sum(n for _, n in self._small) >= self._merge_bytes):
            self._merge()
        _PART_MS.update(int((time.monotonic() - started) * 1000))
        return path, len(rows)

    def _write(self, path: str, table: pa.Table) -> None:
        if self._row_group_rows:
            write_table_grouped(path, table, self._row_group_rows)
        else:
            write_table_atomically(path, table)

    def _merge(self) -> None:
        """The small parts → one part: written first, then the small ones go, so
        a crash in between leaves rows twice (readers keep one), never none."""
        if len(self._small) < 2:
            self._small = []
            return
        tables = []
        for path, _ in self._small:
            with fsspec.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
        merged = posixpath.join(self.folder, f"{self._prefix}-{uuid.uuid4().hex[:16]}.parquet")
        self._write(merged, pa.concat_tables(tables))
        fs, _, paths = fsspec.get_fs_token_paths([path for path, _ in self._small])
        fs.rm(paths)
        self._small = []


class _WriteParts(beam.DoFn):
    """Buffers rows into a `PartWriter` and closes its part at the bundle's end;
    outputs (path, rows) for every part."""

    def __init__(self, folder: str, prefix: str, schema: pa.Schema,
                 rows_per_part: int = ROWS_PER_PART,
                 seconds_per_part: float = SECONDS_PER_PART, in_parts: bool = True,
                 leases: Sequence[LeaseRef] = ()):
        self._folder = parts_folder(folder) if in_parts else folder
        self._prefix = prefix
        self._schema = schema
        self._every = (rows_per_part, seconds_per_part)
        self._leases = tuple(leases)  # a distributed job's: renewed while this is set up

    def setup(self):
        lease.keep_alive(self._leases)
        self._writer = PartWriter(self._folder, self._prefix, self._schema, *self._every[:2])

    def teardown(self):
        lease.let_go(self._leases)

    def process(self, row: dict):
        progress.report(self._prefix)
        closed = self._writer.add(row)
        if closed is not None:
            yield closed

    def finish_bundle(self):
        progress.flush()
        closed = self._writer.flush()
        if closed is not None:
            yield WindowedValue(closed, MIN_TIMESTAMP, [GlobalWindow()])


class WriteParquet(beam.PTransform):
    """Rows → Parquet parts `parts/<prefix>-*.parquet` in `folder`; outputs (path, rows).

    The input may also be a tuple of PCollections: each is written where it
    is produced, and only the (path, rows) outputs are flattened. Prefer that
    to flattening rows first: a local runner cannot fuse a Flatten of
    PCollections made in different stages, so it keeps every flattened row in
    memory until all of them exist (about 2 kB per embedding row, growing with
    the size of the export), and writes only after the last inference.
    """

    def __init__(self, folder: str, prefix: str, schema: pa.Schema,
                 rows_per_part: int = ROWS_PER_PART,
                 seconds_per_part: float = SECONDS_PER_PART, in_parts: bool = True,
                 leases: Sequence[LeaseRef] = ()):
        super().__init__()
        self._folder = folder
        self._prefix = prefix
        self._schema = schema
        self._every = (rows_per_part, seconds_per_part, in_parts, tuple(leases))

    def expand(self, rows):
        if isinstance(rows, beam.PCollection):
            return rows | beam.ParDo(_WriteParts(self._folder, self._prefix, self._schema,
                                                 *self._every))
        written = [pcoll | f"Write{i}" >> beam.ParDo(
                       _WriteParts(self._folder, self._prefix, self._schema, *self._every))
                   for i, pcoll in enumerate(rows)]
        return written | "Written" >> beam.Flatten()


def read_rows(paths: Iterable[str], columns=None) -> pa.Table:
    """All rows of some Parquet files, as one table (for tests and tools)."""
    tables = []
    for path in paths:
        with fsspec.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({})
