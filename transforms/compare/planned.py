"""The planned tasks, read back into the Beam graph.

`transforms/compare/planning.py` decides, before the graph is built, which
image rows need a request; only those enter the graph, from the plan's
Parquet files, one row group at a time. Rows to revalidate carry their
previous row (what a 304, or the same bytes, reuses).
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from transforms.common.records import TASK_FIELDS
from transforms.compare.refresh import IMAGE_COLUMNS

PREVIOUS = "prev_"


def _embeddings(table):
    column = table.column(f"{PREVIOUS}embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1)


class _TaskRows(beam.DoFn):
    """A plan file → its task dicts."""

    def process(self, path: str) -> Iterable[dict]:
        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                embedding = None
                if f"{PREVIOUS}embedding" in table.column_names:
                    embedding = _embeddings(table)
                    table = table.drop([f"{PREVIOUS}embedding"])
                for i, row in enumerate(table.to_pylist()):
                    task = {name: row.get(name) for name in TASK_FIELDS}
                    if embedding is not None:
                        previous = {name: row.get(PREVIOUS + name) for name in IMAGE_COLUMNS
                                    if name != "embedding"}
                        previous["embedding"] = embedding[i].copy()
                        task.update(revalidate=True, etag=previous.get("etag"),
                                    last_modified=previous.get("last_modified"),
                                    previous=previous)
                    yield task


class ReadPlannedTasks(beam.PTransform):
    """Plan files of tasks to fetch (and to revalidate) → task dicts."""

    def __init__(self, files: list[str], spread: bool = False):
        super().__init__()
        self._files = list(files)
        self._spread = spread  # distributed runners: spread the files over workers

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self._files)
        if self._spread:
            files = files | "Spread" >> beam.Reshuffle()
        return files | "Rows" >> beam.ParDo(_TaskRows())
