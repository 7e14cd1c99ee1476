"""The store's pictures that a run embeds, as the plan located them.

Which tasks the store answers is decided before the graph is built
(`transforms/compare/planning.py`, with DuckDB over the URL index and the
`image_sha256` columns of the store's parts): the plan lists, sorted by the
part that holds each copy, the tasks to embed from the store. Here each part
becomes one element; its reader takes that part's tasks from the plan with a
filter (row-group statistics skip the rest), groups them by content, and
hands them to `ReadStoredPictures`, which opens the part once and reads only
the wanted row groups. Nothing of the store's indexes passes through Beam.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from transforms.store.contents import ReadStoredPictures

TASK_COLUMNS = ("coreID", "gbifID", "identifier", "occurrenceID", "datasetKey", "taxonKey",
                "scientificName", "license", "rightsHolder", "creator", "etag",
                "last_modified", "http_status")


def planned_tasks(plan_files: list[str], part: str) -> list[tuple[str, list[dict]]]:
    """(sha, tasks) of every content the plan embeds from `part`."""
    by_sha: dict[str, list[dict]] = {}
    for path in plan_files:
        with fsspec.open(path, "rb") as handle:
            table = pq.read_table(handle, filters=[("part", "==", part)])
        for row in table.to_pylist():
            by_sha.setdefault(row["image_sha256"], []).append(
                {name: row.get(name) for name in TASK_COLUMNS})
    return list(by_sha.items())


class _PartTasks(beam.DoFn):
    def __init__(self, plan_files: list[str]):
        self._files = list(plan_files)

    def process(self, part: str) -> Iterable:
        grouped = planned_tasks(self._files, part)
        if grouped:
            yield part, grouped


class ReadPlannedStored(beam.PTransform):
    """The plan's stored tasks → (images to embed, failures, tally)."""

    def __init__(self, plan_files: list[str], parts: list[str], spread: bool = False):
        super().__init__()
        self._files = list(plan_files)
        self._parts = list(parts)
        self._spread = spread

    def expand(self, pbegin):
        parts = pbegin | "Parts" >> beam.Create(self._parts)
        if self._spread:
            parts = parts | "SpreadParts" >> beam.Reshuffle()
        located = parts | "PlannedTasks" >> beam.ParDo(_PartTasks(self._files))
        return located | "Read" >> ReadStoredPictures(grouped=True)
