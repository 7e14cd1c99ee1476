"""Reading a Darwin Core Archive into image tasks: the Beam transform.

Any DwC-A with an image source is read: a GBIF download, a dataset's own
archive as an IPT publishes it, or an unzipped folder of either (meta.xml:
`transforms/read/meta.py`; the archive: `archive.py`; bounded rows:
`rows.py`; image and occurrence rows: `images.py`; the launch-time check:
`spec.py`). The archive is read in one place (Beam cannot split a zip), then
image rows and occurrence rows are joined by the core id, a string (a gbifID
in a GBIF download, the publisher's occurrenceID in its own archive), with a
CoGroupByKey, which also spreads the work over the workers.
"""
from __future__ import annotations

import time
from typing import Optional

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.common.records import FAILURES
from transforms.common.tally import TALLY, Tally, tally_outputs
from transforms.read.archive import Archive
from transforms.read.images import (
    ASSOCIATED_MEDIA_SPLIT,
    MEDIA_FIELDS,
    NOT_IMAGE_FORMAT,
    OCCURRENCE_FIELDS,
    image_records,
    image_rows,
    occurrence_rows,
)
from transforms.read.meta import (
    MULTIMEDIA_ROW_TYPES,
    OCCURRENCE_ROW_TYPE,
    ArchiveSpec,
    ExportError,
    TableSpec,
    parse_meta,
)
from transforms.read.rows import LINE_CAP, iter_rows
from transforms.read.spec import read_identity, read_spec
from transforms.read.values import has_row_key, parse_gbif_id, parse_int64

_int_or_none = parse_int64  # the name older callers import

# What callers import from here (cli, launch, plan, graph, tests); the modules
# beside this one hold them.
__all__ = [
    "ASSOCIATED_MEDIA_SPLIT", "LINE_CAP", "MEDIA_FIELDS", "MULTIMEDIA_ROW_TYPES",
    "NOT_IMAGE_FORMAT", "OCCURRENCE_FIELDS", "OCCURRENCE_ROW_TYPE", "Archive", "ArchiveSpec",
    "ExportError", "JoinOccurrences", "ReadArchive", "ReadExport", "TableSpec", "has_row_key",
    "image_records", "image_rows", "iter_rows", "make_task", "occurrence_rows", "parse_gbif_id",
    "parse_int64", "parse_meta", "read_identity", "read_spec",
]


class ReadArchive(beam.DoFn):
    """Streams one export into keyed image rows and occurrence rows.

    Outputs: main = (coreID, media dict); `occurrences` = (coreID, occurrence
    dict) for occurrences that have images; `failures` = failure rows of
    lines that could not be read; `tally` = counts by reason.
    """

    def __init__(self, max_images: int = 0, line_cap: int = LINE_CAP):
        self._max_images = max_images
        self._line_cap = line_cap

    def process(self, path: str):
        tally = Tally()
        started = time.monotonic()
        with Archive(path) as archive:
            spec = read_spec(archive)
            wanted: set[str] = set()
            for item in image_records(archive, spec.image_source(), tally, self._max_images,
                                      self._line_cap):
                if isinstance(item, dict):
                    yield TaggedOutput(FAILURES, item)
                    continue
                wanted.add(item[0])
                yield item
            for keyed in occurrence_rows(archive, spec.core, wanted, tally, self._line_cap):
                yield TaggedOutput("occurrences", keyed)
        tally.add("time.read_s", time.monotonic() - started)
        yield from tally_outputs(tally)

    def _image_rows(self, archive: Archive, table: TableSpec, tally: Tally):
        return image_rows(archive, table, tally, self._max_images, self._line_cap)


def make_task(core_id: str, media: dict, occurrence: dict) -> dict:
    """An image task: the media row with its occurrence's fields. gbifID is the
    media row's where its table tells it, else the occurrence row's."""
    gbif_id: Optional[int] = media.get("gbifID")
    if gbif_id is None:
        gbif_id = occurrence.get("gbifID")
    return {
        "gbifID": gbif_id,
        "coreID": core_id,
        "identifier": media["identifier"],
        "occurrenceID": occurrence.get("occurrenceID"),
        "datasetKey": occurrence.get("datasetKey"),
        "taxonKey": parse_int64(occurrence.get("taxonKey")),
        "scientificName": occurrence.get("scientificName"),
        "license": media.get("license") or occurrence.get("license"),
        "rightsHolder": media.get("rightsHolder") or occurrence.get("rightsHolder"),
        "creator": media.get("creator"),
    }


class JoinOccurrences(beam.DoFn):
    """Builds image tasks: each image row with its occurrence's fields.

    Duplicate (coreID, identifier) pairs are dropped and counted: the pair is
    the key of a row in the output, so it must be unique.
    """

    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        core_id, grouped = keyed
        occurrences = list(grouped["occurrences"])
        occurrence = occurrences[0] if occurrences else {}
        if not occurrences:
            self._tally.add("export.images_without_occurrence_row")
        seen: set[str] = set()
        for media in grouped["media"]:
            if media["identifier"] in seen:
                self._tally.add("skipped.duplicate_image")
                continue
            seen.add(media["identifier"])
            yield make_task(core_id, media, occurrence)

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


class ReadExport(beam.PTransform):
    """Export path → image tasks (one dict per image), failure rows of lines
    that could not be read, and a tally of what was skipped."""

    def __init__(self, export: str, max_images: int = 0, line_cap: int = LINE_CAP):
        super().__init__()
        self._export = export
        self._max_images = max_images
        self._line_cap = line_cap

    def expand(self, pbegin):
        rows = (pbegin
                | "ExportPath" >> beam.Create([self._export])
                | "ReadArchive" >> beam.ParDo(ReadArchive(self._max_images, self._line_cap))
                .with_outputs("occurrences", FAILURES, TALLY, main="media"))
        joined = (({"media": rows.media, "occurrences": rows.occurrences})
                  | "ByCoreID" >> beam.CoGroupByKey()
                  | "Join" >> beam.ParDo(JoinOccurrences()).with_outputs(TALLY, main="tasks"))
        tally = (rows[TALLY], joined[TALLY]) | "ReadTallies" >> beam.Flatten()
        return joined.tasks, rows[FAILURES], tally
