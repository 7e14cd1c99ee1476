"""The export's image rows and occurrence rows, streamed into Parquet.

Deciding what a run must do (`transforms/compare/planning.py`) is a join of
the export with the previous snapshot and the store's indexes; a columnar
engine does it on files, so the export is first written as two Parquet
files (media rows, occurrence rows of the occurrences that have images) in
batches, never held whole. The rows are read by the same code as
`ReadArchive` (`transforms/read/images.py`), so what is skipped, counted and
failed is the same; unreadable lines become failure rows written as parts
of the run's snapshot, like every other failure.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.common.tally import Tally
from transforms.read.archive import Archive
from transforms.read.images import image_records, occurrence_rows
from transforms.read.rows import LINE_CAP
from transforms.read.spec import read_spec
from transforms.read.values import parse_int64
from transforms.write.parts import FAILURE_SCHEMA, PartWriter, to_table

BATCH_ROWS = 20_000

MEDIA_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("coreID", pa.string()), ("gbifID", pa.int64()),
    ("identifier", pa.string()), ("license", pa.string()), ("rightsHolder", pa.string()),
    ("creator", pa.string()),
])
OCCURRENCE_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("coreID", pa.string()), ("gbifID", pa.int64()),
    ("occurrenceID", pa.string()), ("datasetKey", pa.string()), ("taxonKey", pa.int64()),
    ("scientificName", pa.string()), ("license", pa.string()), ("rightsHolder", pa.string()),
])


@dataclass
class StagedExport:
    """Where the staged rows are, and what reading them counted."""
    media: str
    occurrences: str
    tally: dict = field(default_factory=dict)


class _Batches:
    """Dict rows → one Parquet file, written a batch at a time."""

    def __init__(self, path: str, schema: pa.Schema):
        self._schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._rows: list[dict] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(to_table(self._rows, self._schema))
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()


def stage_export(export: str, folder: str, failures_folder: str, max_images: int = 0,
                 line_cap: int = LINE_CAP) -> StagedExport:
    """Reads `export` once for its image rows and once for their occurrences
    (as `ReadArchive` does) into `folder`/media.parquet and occurrences.parquet;
    unreadable lines go to failure parts in `failures_folder`."""
    os.makedirs(folder, exist_ok=True)
    tally = Tally()
    staged = StagedExport(os.path.join(folder, "media.parquet"),
                          os.path.join(folder, "occurrences.parquet"))
    failures: Optional[PartWriter] = None
    media = _Batches(staged.media, MEDIA_SCHEMA)
    occurrences = _Batches(staged.occurrences, OCCURRENCE_SCHEMA)
    wanted: set[str] = set()
    try:
        with Archive(export) as archive:
            spec = read_spec(archive)
            for seq, item in enumerate(image_records(archive, spec.image_source(), tally,
                                                     max_images, line_cap)):
                if isinstance(item, dict):
                    if failures is None:
                        failures = PartWriter(failures_folder, "failures-read", FAILURE_SCHEMA,
                                              BATCH_ROWS, 1e9)
                    failures.add(item)
                    tally.add(f"failed.{item['stage']}.{item['reason']}")
                    continue
                core_id, row = item
                wanted.add(core_id)
                media.add(dict(row, seq=seq, coreID=core_id))
            for seq, (core_id, row) in enumerate(occurrence_rows(archive, spec.core, wanted,
                                                                 tally, line_cap)):
                occurrences.add(dict(row, seq=seq, coreID=core_id,
                                     taxonKey=parse_int64(row.get("taxonKey"))))
    finally:
        media.close()
        occurrences.close()
        if failures is not None:
            failures.flush()
    staged.tally = tally.flush()
    return staged
