"""Image rows and occurrence rows of an archive, keyed by the core id.

Plain generators, not Beam steps, so that `gbif-embed plan` counts exactly
the rows the run reads, without a pipeline around it. Every image row read
is counted in `export.rows` and ends as an image, a counted skip
(`skipped.<reason>`) or a failure row (stage `read`).
"""
from __future__ import annotations

import collections
import contextlib
import re
from typing import Iterator, Optional, Sequence, Union

from transforms.common import progress
from transforms.common.records import failure
from transforms.common.tally import Tally
from transforms.read.archive import READ_ERRORS, Archive
from transforms.read.meta import (GBIF_ID_COLUMN, GBIF_ID_CORE, GBIF_ID_KEY, GBIF_ID_NONE,
                                  ExportError, TableSpec)
from transforms.read.rows import LINE_CAP, BadLine, iter_rows
from transforms.read.values import (
    clean_core_id,
    clean_text,
    field,
    has_row_key,
    parse_gbif_id,
)

# Occurrence fields joined onto every image (by the local name of their term).
OCCURRENCE_FIELDS = ("occurrenceID", "datasetKey", "taxonKey", "scientificName")
# Media fields carried by every image, with Audubon Core's names for them.
MEDIA_FIELDS = ("license", "rightsHolder", "creator")
_MEDIA_TERMS = {"license": ("license", "UsageTerms"), "rightsHolder": ("rightsHolder", "Owner"),
                "creator": ("creator",)}
# Declared formats that are certainly not pictures (web pages, sound, ...).
NOT_IMAGE_FORMAT = re.compile(r"^(text/|audio/|video/|application/(ld\+)?json)", re.I)
ASSOCIATED_MEDIA_SPLIT = re.compile(r"\s*[|,;]\s*")

Keyed = tuple[str, dict]


class _Columns:
    """Where a table keeps some fields: a column, else meta.xml's constant default."""

    def __init__(self, table: TableSpec, names: dict[str, Sequence[str]]):
        self._at = {}
        for name, terms in names.items():
            index = next((table.index(t) for t in terms if table.index(t) is not None), None)
            default = next((table.default(t) for t in terms if table.default(t) is not None),
                           None)
            self._at[name] = (index, clean_text(default))

    def values(self, row: Sequence[str]) -> dict[str, Optional[str]]:
        size, out = len(row), {}
        for name, (index, default) in self._at.items():
            value = row[index].strip() if index is not None and index < size else ""
            out[name] = value or default
        return out


@contextlib.contextmanager
def reading(location: str) -> Iterator[None]:
    """A member that breaks mid-read (a bad CRC at its end, a truncated
    stream) stops the run with one line that names it, not a traceback."""
    try:
        yield
    except READ_ERRORS as err:
        raise ExportError(f"{location}: expected a readable data file; reading it failed "
                          f"({type(err).__name__}: {err})") from None


def row_gbif_id(row: Sequence[str], table: TableSpec, core_id: Optional[str]) -> Optional[int]:
    """The row's gbifID where the table itself tells it; None otherwise
    (GBIF_ID_CORE: the join takes it from the occurrence row)."""
    if table.gbif_id_source == GBIF_ID_KEY:
        return parse_gbif_id(core_id)
    if table.gbif_id_source == GBIF_ID_COLUMN:
        return parse_gbif_id(field(row, table.index("gbifID")))
    return None


def _core_id(row: Sequence[str], table: TableSpec) -> Optional[str]:
    index = table.id_index
    return clean_core_id(row[index]) if index is not None and index < len(row) else None


def _urls(table: TableSpec, value: Optional[str]) -> list[Optional[str]]:
    """A media row is one candidate image; an occurrence's associatedMedia
    holds as many as it lists, and none when it is empty."""
    if table.is_multimedia:
        return [value]
    return [one for one in ASSOCIATED_MEDIA_SPLIT.split(value or "") if one]


def _is_still_image(kind: Optional[str]) -> bool:
    """dc:type StillImage, also as the DCMI type URI Audubon Core uses."""
    return not kind or kind.rstrip("/").rsplit("/", 1)[-1] == "StillImage"


def bad_line_failure(bad: BadLine, table: TableSpec) -> dict:
    """One failure row for an unreadable line, named by what its kept prefix tells."""
    core_id = _core_id(bad.fields, table)
    urls = _urls(table, field(bad.fields, table.url_index))
    task = {"coreID": core_id, "gbifID": row_gbif_id(bad.fields, table, core_id),
            "identifier": urls[0] if len(urls) == 1 else None}
    return failure(task, "read", bad.reason, f"{table.location} line {bad.line}: {bad.detail}")


def image_records(archive: Archive, table: TableSpec, tally: Tally, max_images: int = 0,
                  line_cap: int = LINE_CAP) -> Iterator[Union[Keyed, dict]]:
    """(coreID, media fields with `identifier`) for each image row of `table`,
    and a failure row (a dict) for each line that could not be read."""
    url_index, width = table.url_index, table.width
    type_index, format_index = table.index("type"), table.index("format")
    columns = _Columns(table, _MEDIA_TERMS)
    gbif_id_final = table.gbif_id_source != GBIF_ID_CORE
    emitted = 0
    counts = _Local(tally)
    with counts, reading(table.location), archive.open(table.location) as stream:
        for row in iter_rows(stream, table, line_cap):
            if isinstance(row, BadLine):
                counts.add("export.rows")
                yield bad_line_failure(row, table)
                continue
            url = field(row, url_index)
            urls = _urls(table, url)
            if not urls:
                continue
            counts.add("export.rows", len(urls))
            core_id = _core_id(row, table)
            if len(row) != width and not (core_id is not None and url and "://" in url):
                counts.add("skipped.ragged_row", len(urls))
                continue
            if len(row) != width:
                counts.add("export.ragged_rows_read")
            media = {"coreID": core_id, "gbifID": row_gbif_id(row, table, core_id)}
            if not has_row_key(media):
                counts.add("skipped.bad_core_id", len(urls))
                continue
            if gbif_id_final and table.gbif_id_source != GBIF_ID_NONE and media["gbifID"] is None:
                # The archive gives gbifIDs (a GBIF download) and this one is not
                # one (not digits, or beyond int64): not a row GBIF could have made.
                counts.add("skipped.bad_gbif_id", len(urls))
                continue
            if table.is_multimedia:
                if not _is_still_image(field(row, type_index) or table.default("type")):
                    counts.add("skipped.not_still_image")
                    continue
                if NOT_IMAGE_FORMAT.match(field(row, format_index) or table.default("format")
                                          or ""):
                    counts.add("skipped.declared_format_not_image")
                    continue
            media.update(columns.values(row))
            for one in urls:
                if not one:
                    counts.add("skipped.empty_identifier")
                    continue
                if max_images and emitted >= max_images:
                    counts.add("skipped.beyond_max_images")
                    continue
                emitted += 1
                counts.add("export.image_rows")
                progress.report("images")
                yield core_id, dict(media, identifier=one)


class _Local:
    """Counts kept in a plain Counter while a file is read (Tally takes a lock
    per call), added to the tally when the reading ends, however it ends."""

    def __init__(self, tally: Tally):
        self._tally, self._counts = tally, collections.Counter()

    def add(self, key: str, n: float = 1) -> None:
        self._counts[key] += n

    def __enter__(self) -> "_Local":
        return self

    def __exit__(self, *exc) -> None:
        for key, n in self._counts.items():
            self._tally.add(key, n)
        self._counts.clear()


def image_rows(archive: Archive, table: TableSpec, tally: Tally, max_images: int = 0,
               line_cap: int = LINE_CAP) -> Iterator[Keyed]:
    """The image rows of `image_records` alone; unreadable lines are counted
    in `tally` (`export.unreadable_rows`), their failure rows dropped."""
    for item in image_records(archive, table, tally, max_images, line_cap):
        if isinstance(item, dict):
            tally.add("export.unreadable_rows")
            continue
        yield item


def occurrence_rows(archive: Archive, core: TableSpec, wanted: set[str], tally: Tally,
                    line_cap: int = LINE_CAP) -> Iterator[Keyed]:
    """(coreID, occurrence fields and gbifID) for the core rows in `wanted`."""
    columns = _Columns(core, {name: (name,) for name in OCCURRENCE_FIELDS + MEDIA_FIELDS})
    gbif_index = core.index("gbifID")
    counts = _Local(tally)
    with counts, reading(core.location), archive.open(core.location) as stream:
        for row in iter_rows(stream, core, line_cap):
            if isinstance(row, BadLine):
                counts.add("export.unreadable_occurrence_rows")
                continue
            key = _core_id(row, core)
            if key is None or key not in wanted:
                continue
            if len(row) != core.width:
                counts.add("export.ragged_occurrence_rows")
            occurrence = columns.values(row)
            occurrence["gbifID"] = parse_gbif_id(field(row, gbif_index))
            yield key, occurrence
