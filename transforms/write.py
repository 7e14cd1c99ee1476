"""Writing embedding and failure rows to Parquet files in a snapshot folder.

Files are written with pyarrow through fsspec, so local folders and gs://
behave the same (gcsfs uploads an object only when it is closed, so a file
either exists whole or not at all). Each bundle writes its own uniquely named
file and reports it; a bundle the runner retries leaves an orphan that the
finalize step deletes, since only reported files are listed in the manifest.
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Iterable

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms import progress

COMPRESSION = "zstd"


def embedding_schema(dim: int = 256) -> pa.Schema:
    return pa.schema([
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
        ("embedded_at", pa.timestamp("us", tz="UTC")),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


FAILURE_SCHEMA = pa.schema([
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
            columns.append(pa.array([r.get(field.name) for r in rows], field.type))
    return pa.Table.from_arrays(columns, schema=schema)


class _WriteFiles(beam.DoFn):
    """Buffers rows and writes one Parquet file per bundle (rolled over at
    `rows_per_file`); outputs (path, row count) for every finished file."""

    def __init__(self, folder: str, prefix: str, schema: pa.Schema,
                 rows_per_group: int = 2048, rows_per_file: int = 500_000):
        self._folder = folder
        self._prefix = prefix
        self._schema = schema
        self._rows_per_group = rows_per_group
        self._rows_per_file = rows_per_file

    def start_bundle(self):
        self._buffer: list[dict] = []
        self._writer = None
        self._handle = None
        self._path = None
        self._rows = 0
        self._finished: list[tuple[str, int]] = []

    def process(self, row: dict):
        self._buffer.append(row)
        progress.report(self._prefix)
        if len(self._buffer) >= self._rows_per_group:
            self._flush()
        if self._rows >= self._rows_per_file:
            self._close()
        for finished in self._finished:
            yield finished
        self._finished = []

    def finish_bundle(self):
        self._flush()
        self._close()
        progress.flush()
        for finished in self._finished:
            yield WindowedValue(finished, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._path = posixpath.join(self._folder,
                                        f"{self._prefix}-{uuid.uuid4().hex[:12]}.parquet")
            self._handle = fsspec.open(self._path, "wb").open()
            self._writer = pq.ParquetWriter(self._handle, self._schema,
                                            compression=COMPRESSION)
        self._writer.write_table(to_table(self._buffer, self._schema))
        self._rows += len(self._buffer)
        self._buffer = []

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._handle.close()
        self._finished.append((self._path, self._rows))
        self._writer = self._handle = self._path = None
        self._rows = 0


class WriteParquet(beam.PTransform):
    """Rows → Parquet files `<prefix>-*.parquet` in `folder`; outputs (path, rows).

    The input may also be a tuple of PCollections: each is written where it
    is produced, and only the (path, rows) outputs are flattened. Prefer that
    to flattening rows first: a local runner cannot fuse a Flatten of
    PCollections made in different stages, so it keeps every flattened row in
    memory until all of them exist (about 2 kB per embedding row, growing with
    the size of the export), and writes only after the last inference.
    """

    def __init__(self, folder: str, prefix: str, schema: pa.Schema):
        super().__init__()
        self._folder = folder
        self._prefix = prefix
        self._schema = schema

    def expand(self, rows):
        if isinstance(rows, beam.PCollection):
            return rows | beam.ParDo(_WriteFiles(self._folder, self._prefix, self._schema))
        written = [pcoll | f"Write{i}" >> beam.ParDo(
                       _WriteFiles(self._folder, self._prefix, self._schema))
                   for i, pcoll in enumerate(rows)]
        return written | "Written" >> beam.Flatten()


def read_rows(paths: Iterable[str], columns=None) -> pa.Table:
    """All rows of some Parquet files, as one table (for tests and tools)."""
    tables = []
    for path in paths:
        with fsspec.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({})
