"""Reading a GBIF Darwin Core Archive into image tasks.

Everything is driven by `meta.xml`: file names, delimiters, quoting, header
lines, encodings and column positions differ between downloads and eras, and
the order of extensions changes, so nothing is assumed. Zips are read member
by member as streams through fsspec (local or gs://); nothing is unpacked to
disk. The archive is read in one place (Beam cannot split a zip), then image
rows and occurrence rows are joined by gbifID with a CoGroupByKey, which also
spreads the work over the workers.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import posixpath
import re
import time
import xml.etree.ElementTree as ET
import zipfile
from typing import IO, Iterator, Optional

import apache_beam as beam
import fsspec
from apache_beam.pvalue import TaggedOutput

from transforms.common import progress
from transforms.common.tally import TALLY, Tally, tally_outputs

MULTIMEDIA_ROW_TYPES = (
    "http://rs.gbif.org/terms/1.0/Multimedia",
    "http://rs.gbif.org/terms/1.0/multimedia",
)
OCCURRENCE_ROW_TYPE = "http://rs.tdwg.org/dwc/terms/Occurrence"

# Occurrence fields joined onto every image (by the local name of their term).
OCCURRENCE_FIELDS = ("occurrenceID", "datasetKey", "taxonKey", "scientificName")
# Media fields carried by every image.
MEDIA_FIELDS = ("license", "rightsHolder", "creator")
# Declared formats that are certainly not pictures (web pages, sound, ...).
NOT_IMAGE_FORMAT = re.compile(r"^(text/|audio/|video/|application/(ld\+)?json)", re.I)
ASSOCIATED_MEDIA_SPLIT = re.compile(r"\s*[|,;]\s*")


class ExportError(ValueError):
    """The export is not a DwC-A this tool can read; says what was expected and found."""


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One data file of the archive, as `meta.xml` declares it."""
    location: str
    row_type: str
    is_core: bool
    encoding: str = "UTF-8"
    fields_terminated_by: str = ","
    lines_terminated_by: str = "\n"
    fields_enclosed_by: str = '"'
    ignore_header_lines: int = 0
    id_index: int = 0
    terms: tuple[tuple[str, int], ...] = ()   # (local term name, column index)

    def index(self, name: str) -> Optional[int]:
        for term, idx in self.terms:
            if term == name:
                return idx
        return None

    @property
    def width(self) -> int:
        return 1 + max([self.id_index] + [idx for _, idx in self.terms])


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    core: TableSpec
    extensions: tuple[TableSpec, ...]
    metadata: Optional[str]

    @property
    def multimedia(self) -> Optional[TableSpec]:
        return next((t for t in self.extensions if t.row_type in MULTIMEDIA_ROW_TYPES), None)

    @property
    def verbatim(self) -> Optional[TableSpec]:
        return next((t for t in self.extensions if t.row_type == OCCURRENCE_ROW_TYPE
                     and t.index("associatedMedia") is not None), None)

    def image_source(self) -> Optional[TableSpec]:
        """Where image URLs come from: multimedia, else associatedMedia."""
        if self.multimedia is not None:
            return self.multimedia
        if self.core.index("associatedMedia") is not None:
            return self.core
        return self.verbatim


def _local_name(term: str) -> str:
    return re.split(r"[/#:]", term.rstrip("/"))[-1]


def _unescape(value: Optional[str], default: str) -> str:
    if value is None:
        return default
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r")


def parse_meta(xml_bytes: bytes) -> ArchiveSpec:
    """Parses meta.xml; the DwC text standard's defaults apply to absent attributes."""
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as err:
        raise ExportError(f"meta.xml is not well-formed XML: {err}") from err

    def table(node: ET.Element, is_core: bool) -> TableSpec:
        location = node.findtext("{*}files/{*}location")
        if not location:
            raise ExportError("meta.xml declares a table without <files><location>")
        id_node = node.find("{*}id" if is_core else "{*}coreid")
        terms = tuple((_local_name(f.get("term", "")), int(f.get("index")))
                      for f in node.findall("{*}field") if f.get("index") is not None)
        return TableSpec(
            location=location.strip(),
            row_type=node.get("rowType", ""),
            is_core=is_core,
            encoding=node.get("encoding") or "UTF-8",
            fields_terminated_by=_unescape(node.get("fieldsTerminatedBy"), ","),
            lines_terminated_by=_unescape(node.get("linesTerminatedBy"), "\n"),
            fields_enclosed_by=_unescape(node.get("fieldsEnclosedBy"), '"'),
            ignore_header_lines=int(node.get("ignoreHeaderLines") or 0),
            id_index=int(id_node.get("index", 0)) if id_node is not None else 0,
            terms=terms)

    core = root.find("{*}core")
    if core is None:
        raise ExportError("meta.xml has no <core> table")
    return ArchiveSpec(core=table(core, True),
                       extensions=tuple(table(e, False) for e in root.findall("{*}extension")),
                       metadata=root.get("metadata"))


class Archive:
    """A DwC-A as a zip or a folder, local or remote; members are opened as streams."""

    def __init__(self, path: str):
        self.path = path.rstrip("/")
        self._stack = contextlib.ExitStack()
        self._zip: Optional[zipfile.ZipFile] = None
        fs, _, (root,) = fsspec.get_fs_token_paths(self.path)
        self._fs, self._root = fs, root
        if not fs.exists(root):
            raise ExportError(f"expected a GBIF DwC-A download (.zip or folder) at "
                              f"{path}; found nothing there")
        if not fs.isdir(root):
            handle = self._stack.enter_context(fs.open(root, "rb"))
            try:
                self._zip = zipfile.ZipFile(handle)
            except zipfile.BadZipFile as err:
                self._stack.close()
                raise ExportError(f"expected a GBIF DwC-A download (.zip or folder) at "
                                  f"{path}; found a file that is not a zip ({err})") from err

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        if self._zip is not None:
            return [n for n in self._zip.namelist() if not n.endswith("/")]
        return [posixpath.relpath(p, self._root) for p in self._fs.find(self._root)]

    def exists(self, name: str) -> bool:
        return name in set(self.names())

    def open(self, name: str) -> IO[bytes]:
        if self._zip is not None:
            return self._zip.open(name)
        return self._fs.open(posixpath.join(self._root, name), "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()


def read_spec(archive: Archive) -> ArchiveSpec:
    """The archive's meta.xml, checked against the files the archive holds."""
    names = archive.names()
    if "meta.xml" not in names:
        csv_like = [n for n in names if n.endswith((".csv", ".parquet"))]
        hint = (" It looks like a SIMPLE_CSV/SIMPLE_PARQUET download: those carry no "
                "image URLs; request a DWCA download from GBIF instead." if csv_like else "")
        raise ExportError("expected a Darwin Core Archive with meta.xml at its root; found "
                          f"{len(names)} files ({', '.join(sorted(names)[:6])}).{hint}")
    spec = parse_meta(archive.read("meta.xml"))
    for table in (spec.core,) + spec.extensions:
        if table.location not in names:
            raise ExportError(f"meta.xml declares {table.location} but the archive has no "
                              f"such file (it has: {', '.join(sorted(names)[:10])})")
    if spec.image_source() is None:
        tables = ", ".join(f"{t.location} ({t.row_type or 'no rowType'})"
                           for t in (spec.core,) + spec.extensions)
        raise ExportError("expected image URLs: a multimedia extension "
                          f"({MULTIMEDIA_ROW_TYPES[0]}) or an associatedMedia column; "
                          f"found only: {tables}")
    return spec


def read_identity(archive: Archive, spec: ArchiveSpec) -> dict:
    """The GBIF download key and DOI from metadata.xml (EML), when present."""
    identity = {"path": archive.path, "download_key": None, "doi": None, "title": None,
                "published": None}
    name = spec.metadata or "metadata.xml"
    if not archive.exists(name):
        return identity
    try:
        root = ET.fromstring(archive.read(name))
    except ET.ParseError:
        return identity
    package = root.get("packageId") or ""
    if package.startswith("10."):
        identity["doi"] = package
    dataset = root.find("dataset")
    if dataset is not None:
        identity["download_key"] = (dataset.findtext("alternateIdentifier") or "").strip() or None
        identity["title"] = (dataset.findtext("title") or "").strip() or None
        identity["published"] = (dataset.findtext("pubDate") or "").strip() or None
    return identity


def iter_rows(stream: IO[bytes], table: TableSpec) -> Iterator[list[str]]:
    """Rows of one data file as lists of strings, honouring the table's format.

    GBIF writes no quoting but leaves bare `"` inside values, so quoting is
    only used when meta.xml declares an enclosure character.
    """
    terminator = table.lines_terminated_by
    newline = terminator if terminator in ("\n", "\r", "\r\n") else ""
    text = io.TextIOWrapper(stream, encoding=table.encoding, errors="replace", newline=newline)
    if table.fields_enclosed_by:
        reader: Iterator[list[str]] = csv.reader(
            text, delimiter=table.fields_terminated_by, quotechar=table.fields_enclosed_by,
            strict=False)
        for skipped, row in enumerate(reader):
            if skipped >= table.ignore_header_lines:
                yield row
        return
    delimiter = table.fields_terminated_by
    for number, line in enumerate(text):
        if number < table.ignore_header_lines:
            continue
        line = line.rstrip("\r\n") if terminator in ("\n", "\r\n") else line.rstrip(terminator)
        if line:
            yield line.split(delimiter)


def parse_gbif_id(value: str) -> Optional[int]:
    value = value.strip()
    return int(value) if value.isdigit() else None


def _field(row: list[str], index: Optional[int]) -> Optional[str]:
    if index is None or index >= len(row):
        return None
    return row[index].strip() or None


def image_rows(archive: Archive, table: TableSpec, tally: Tally,
               max_images: int = 0) -> Iterator[tuple[int, dict]]:
    """(gbifID, media fields and `identifier`) for each image row of `table`;
    what is skipped is counted in `tally` by reason.

    A plain generator, not a Beam step, so that `gbif-embed plan` counts
    exactly the rows the run reads, without a pipeline around it.
    """
    is_multimedia = table.row_type in MULTIMEDIA_ROW_TYPES
    id_index = table.id_index
    url_index = table.index("identifier" if is_multimedia else "associatedMedia")
    type_index, format_index = table.index("type"), table.index("format")
    extra = {name: table.index(name) for name in MEDIA_FIELDS}
    width = table.width
    emitted = 0
    with archive.open(table.location) as stream:
        for row in iter_rows(stream, table):
            key = parse_gbif_id(row[id_index]) if id_index < len(row) else None
            url = _field(row, url_index)
            # A media row is one candidate image; an occurrence's associatedMedia
            # holds as many as it lists, and none when it is empty.
            urls = [url] if is_multimedia else [
                one for one in ASSOCIATED_MEDIA_SPLIT.split(url or "") if one]
            if not urls:
                continue
            tally.add("export.rows", len(urls))
            if len(row) != width and not (key is not None and url and "://" in url):
                tally.add("skipped.ragged_row", len(urls))
                continue
            if len(row) != width:
                tally.add("export.ragged_rows_read")
            if key is None:
                tally.add("skipped.bad_gbif_id", len(urls))
                continue
            if is_multimedia:
                kind = (_field(row, type_index) or "").strip()
                if kind and kind != "StillImage":
                    tally.add("skipped.not_still_image")
                    continue
                if NOT_IMAGE_FORMAT.match(_field(row, format_index) or ""):
                    tally.add("skipped.declared_format_not_image")
                    continue
            fields = {name: _field(row, idx) for name, idx in extra.items()}
            for one in urls:
                if not one:
                    tally.add("skipped.empty_identifier")
                    continue
                if max_images and emitted >= max_images:
                    tally.add("skipped.beyond_max_images")
                    continue
                emitted += 1
                tally.add("export.image_rows")
                progress.report("images")
                yield key, dict(fields, identifier=one)


class ReadArchive(beam.DoFn):
    """Streams one export into keyed image rows and occurrence rows.

    Outputs: main = (gbifID, media dict); `occurrences` = (gbifID, occurrence
    dict) for occurrences that have images; `tally` = skip counts by reason.
    """

    def __init__(self, max_images: int = 0):
        self._max_images = max_images

    def process(self, path: str):
        tally = Tally()
        started = time.monotonic()
        with Archive(path) as archive:
            spec = read_spec(archive)
            source = spec.image_source()
            with_images: set[int] = set()
            for key, media in self._image_rows(archive, source, tally):
                with_images.add(key)
                yield key, media
            for key, occurrence in self._occurrence_rows(archive, spec.core, with_images, tally):
                yield TaggedOutput("occurrences", (key, occurrence))
        tally.add("time.read_s", time.monotonic() - started)
        yield from tally_outputs(tally)

    def _image_rows(self, archive: Archive, table: TableSpec, tally: Tally):
        return image_rows(archive, table, tally, self._max_images)

    def _occurrence_rows(self, archive: Archive, core: TableSpec, wanted: set[int],
                         tally: Tally):
        indexes = {name: core.index(name) for name in OCCURRENCE_FIELDS + MEDIA_FIELDS}
        with archive.open(core.location) as stream:
            for row in iter_rows(stream, core):
                key = parse_gbif_id(row[core.id_index]) if core.id_index < len(row) else None
                if key is None or key not in wanted:
                    continue
                if len(row) != core.width:
                    tally.add("export.ragged_occurrence_rows")
                yield key, {name: _field(row, idx) for name, idx in indexes.items()}


class JoinOccurrences(beam.DoFn):
    """Builds image tasks: each image row with its occurrence's fields.

    Duplicate (gbifID, identifier) pairs are dropped and counted: the pair is
    the key of a row in the output, so it must be unique.
    """

    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        gbif_id, grouped = keyed
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
            yield {
                "gbifID": gbif_id,
                "identifier": media["identifier"],
                "occurrenceID": occurrence.get("occurrenceID"),
                "datasetKey": occurrence.get("datasetKey"),
                "taxonKey": _int_or_none(occurrence.get("taxonKey")),
                "scientificName": occurrence.get("scientificName"),
                "license": media.get("license") or occurrence.get("license"),
                "rightsHolder": media.get("rightsHolder") or occurrence.get("rightsHolder"),
                "creator": media.get("creator"),
            }

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


def _int_or_none(value: Optional[str]) -> Optional[int]:
    return int(value) if value and value.strip().isdigit() else None


class ReadExport(beam.PTransform):
    """Export path → image tasks (one dict per image) and a tally of what was skipped."""

    def __init__(self, export: str, max_images: int = 0):
        super().__init__()
        self._export = export
        self._max_images = max_images

    def expand(self, pbegin):
        rows = (pbegin
                | "ExportPath" >> beam.Create([self._export])
                | "ReadArchive" >> beam.ParDo(ReadArchive(self._max_images)).with_outputs(
                    "occurrences", TALLY, main="media"))
        joined = (({"media": rows.media, "occurrences": rows.occurrences})
                  | "ByGbifID" >> beam.CoGroupByKey()
                  | "Join" >> beam.ParDo(JoinOccurrences()).with_outputs(TALLY, main="tasks"))
        tally = (rows[TALLY], joined[TALLY]) | "ReadTallies" >> beam.Flatten()
        return joined.tasks, tally
