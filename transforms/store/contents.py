"""Reading pictures back from the store, to embed them.

Planning (`transforms/compare/planning.py`) says, per content, which part
holds its picture (cached embeddings are copied by planning itself); grouping by part here lets each part be
opened once and only its wanted row groups read, and spreads the parts over
every worker (on the local runner, over every process), whatever hosts the
pictures came from. A content whose part cannot be found any more (merged
and lost, or deleted) ends as failure rows that say so: the next run fetches
it again.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.common.images import image_element
from transforms.common.records import FAILURES, failure
from transforms.common.tally import TALLY, Tally, tally_outputs
from transforms.store.reading import rows_for_anywhere

PICTURE_COLUMNS = ["image_sha256", "source_width", "source_height", "source_bytes", "data"]


def _wanted(grouped: Iterable) -> dict[str, list[dict]]:
    wanted: dict[str, list[dict]] = {}
    for sha, tasks in grouped:
        wanted.setdefault(sha, []).extend(tasks)
    return wanted


def _lost(wanted: dict[str, list[dict]], part: str) -> Iterable:
    for sha, tasks in wanted.items():
        for task in tasks:
            yield TaggedOutput(FAILURES, failure(
                task, "store", "store_missing",
                f"content {sha[:16]} is no longer in {part} nor in its writer's other parts; "
                "the next run fetches it again"))


class _ReadPictures(beam.DoFn):
    """(part, [(sha, tasks)]) → one image per content, its copy as `content`."""

    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        part, grouped = keyed
        wanted = _wanted(grouped)
        for row in rows_for_anywhere(part, set(wanted), PICTURE_COLUMNS):
            tasks = wanted.pop(row["image_sha256"], None)
            if tasks is None:
                continue
            self._tally.add("store.read_pictures")
            self._tally.add("store.read_bytes", len(row["data"]))
            yield image_element(tasks, content=row["data"], sha=row["image_sha256"],
                                width=row["source_width"], height=row["source_height"],
                                http_status=tasks[0].get("http_status"),
                                nbytes=row.get("source_bytes") or 0,
                                validators_per_task=True)
        yield from _lost(wanted, part)

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


class ReadStoredPictures(beam.PTransform):
    """(part, (sha, tasks)) → (images to embed, failures, tally); with
    `grouped`, the input is already (part, [(sha, tasks)]), one per part."""

    def __init__(self, grouped: bool = False):
        super().__init__()
        self._grouped = grouped

    def expand(self, located):
        if not self._grouped:
            located = located | "ByPicturePart" >> beam.GroupByKey()
        read = (located
                | "ReadPictures" >> beam.ParDo(_ReadPictures()).with_outputs(
                    FAILURES, TALLY, main="images"))
        return read.images, read[FAILURES], read[TALLY]
