"""meta.xml: what the archive's data files are and how to read them.

Everything the reader does is driven by `meta.xml`: file names, delimiters,
quoting, header lines, encodings and column positions differ between
downloads, publishers and eras, and the order of extensions changes, so
nothing is assumed. Every attribute is checked here, at launch, so that a
wrong one fails in a second with a message that names the file, what was
expected and what was found, never deep inside the pipeline.
"""
from __future__ import annotations

import codecs
import dataclasses
import io
import posixpath
import re
import xml.etree.ElementTree as ET
from typing import Optional

# Real GBIF meta.xml files are 36-37 KB (241 + 219 + 15 declared columns).
META_CAP = 1 << 20

MULTIMEDIA_ROW_TYPES = (
    "http://rs.gbif.org/terms/1.0/Multimedia",
    "http://rs.gbif.org/terms/1.0/multimedia",
    "http://rs.tdwg.org/ac/terms/Multimedia",  # Audubon Core, as many IPTs publish it
)
OCCURRENCE_ROW_TYPE = "http://rs.tdwg.org/dwc/terms/Occurrence"
# Line ends that can be read line by line within a bounded buffer.
NEWLINES = ("\n", "\r\n", "\r")
# Where a task's gbifID comes from (TableSpec.gbif_id_source).
GBIF_ID_COLUMN = "column"   # the table's own gbifID column (the core itself)
GBIF_ID_KEY = "key"         # the row's core id: the core's id column is its gbifID (GBIF downloads)
GBIF_ID_CORE = "core"       # the core row's gbifID column, known once joined
GBIF_ID_NONE = "none"       # the archive has no gbifID (a publisher's own archive)
_MAX_INT_DIGITS = 9


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
    id_index: Optional[int] = 0               # <id> (core) or <coreid> (extension)
    terms: tuple[tuple[str, int], ...] = ()   # (local term name, column index)
    defaults: tuple[tuple[str, str], ...] = ()  # (local term name, constant value)
    gbif_id_source: str = GBIF_ID_NONE

    def index(self, name: str) -> Optional[int]:
        for term, idx in self.terms:
            if term == name:
                return idx
        return None

    def default(self, name: str) -> Optional[str]:
        for term, value in self.defaults:
            if term == name:
                return value
        return None

    @property
    def width(self) -> int:
        return 1 + max([self.id_index or 0] + [idx for _, idx in self.terms])

    @property
    def is_multimedia(self) -> bool:
        return self.row_type in MULTIMEDIA_ROW_TYPES

    @property
    def url_index(self) -> Optional[int]:
        """The column of image URLs: Audubon Core's accessURI or dc:identifier in
        a multimedia extension, associatedMedia anywhere else."""
        if not self.is_multimedia:
            return self.index("associatedMedia")
        access = self.index("accessURI")
        return access if access is not None else self.index("identifier")

    @property
    def url_term(self) -> str:
        if not self.is_multimedia:
            return "associatedMedia"
        return "accessURI" if self.index("accessURI") is not None else "identifier"


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    core: TableSpec
    extensions: tuple[TableSpec, ...]
    metadata: Optional[str]

    @property
    def tables(self) -> tuple[TableSpec, ...]:
        return (self.core,) + self.extensions

    @property
    def multimedia(self) -> Optional[TableSpec]:
        return next((t for t in self.extensions
                     if t.is_multimedia and t.url_index is not None), None)

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


def shown(value: object, limit: int = 60) -> str:
    """A value from the archive as a message may quote it: on one line, short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _local_name(term: str) -> str:
    return re.split(r"[/#:]", term.rstrip("/"))[-1]


def _unescape(value: Optional[str], default: str) -> str:
    if value is None:
        return default
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r")


def _int_attr(node: ET.Element, name: str, where: str, default: Optional[int]) -> Optional[int]:
    raw = node.get(name)
    if raw is None:
        return default
    value = raw.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_INT_DIGITS):
        raise ExportError(f"meta.xml: {where} has {name}={shown(raw)}; expected a whole "
                          f"number from 0 to {10 ** _MAX_INT_DIGITS - 1:,}")
    return int(value)


def check_location(location: str) -> str:
    """A data file's path, normalised; refused when it leaves the archive."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location):
        raise ExportError(f"meta.xml: location {shown(location)} is a URL; expected a file "
                          "inside the archive (nothing is fetched from elsewhere)")
    normal = posixpath.normpath(location)
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        raise ExportError(f"meta.xml: location {shown(location)} leaves the archive; "
                          "expected a file inside it")
    return normal


def check_encoding(encoding: str, where: str) -> None:
    """Unknown names and bytes-to-bytes codecs (base64, rot13) fail here, not mid-run."""
    try:
        codecs.lookup(encoding)
        io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    except (LookupError, ValueError) as err:
        raise ExportError(f"meta.xml: {where} declares encoding={shown(encoding)}; expected "
                          f"a text encoding such as UTF-8 or ISO-8859-1 ({err})") from None


def check_format(table: TableSpec) -> None:
    """Delimiters the row reader can honour within a bounded line buffer."""
    where = table.location
    delimiter, quote = table.fields_terminated_by, table.fields_enclosed_by
    if len(delimiter) != 1 or delimiter in "\r\n":
        raise ExportError(f"meta.xml: {where} declares fieldsTerminatedBy={shown(delimiter)}; "
                          "expected one character other than a line break (such as \\t or ,)")
    if len(quote) > 1 or (quote and (quote in "\r\n" or quote == delimiter)):
        raise ExportError(f"meta.xml: {where} declares fieldsEnclosedBy={shown(quote)}; "
                          "expected nothing or one character other than the field delimiter "
                          "and line breaks (such as \")")
    if table.lines_terminated_by not in NEWLINES:
        raise ExportError(f"meta.xml: {where} declares linesTerminatedBy="
                          f"{shown(table.lines_terminated_by)}; expected \\n, \\r\\n or \\r")
    check_encoding(table.encoding, where)


def _table(node: ET.Element, is_core: bool) -> TableSpec:
    locations = [n.text or "" for n in node.findall("{*}files/{*}location")]
    if not locations or not locations[0].strip():
        raise ExportError("meta.xml declares a table without <files><location>")
    where = check_location(locations[0].strip())
    if len(locations) > 1:
        raise ExportError(f"meta.xml: the table in {where} lists {len(locations)} files; "
                          "expected one <location> per table")
    id_node = node.find("{*}id" if is_core else "{*}coreid")
    terms, defaults = [], []
    for field in node.findall("{*}field"):
        name = _local_name(field.get("term", ""))
        index = _int_attr(field, "index", f"{where} <field term={shown(name)}>", None)
        if index is not None:
            terms.append((name, index))
        if field.get("default") is not None:  # the value where its column is empty, or always
            defaults.append((name, field.get("default", "")))
    table = TableSpec(
        location=where,
        row_type=node.get("rowType", ""),
        is_core=is_core,
        encoding=(node.get("encoding") or "").strip() or "UTF-8",
        fields_terminated_by=_unescape(node.get("fieldsTerminatedBy"), ","),
        lines_terminated_by=_unescape(node.get("linesTerminatedBy"), "\n"),
        fields_enclosed_by=_unescape(node.get("fieldsEnclosedBy"), '"'),
        ignore_header_lines=_int_attr(node, "ignoreHeaderLines", where, 0) or 0,
        id_index=(_int_attr(id_node, "index", f"{where} <{id_node.tag.split('}')[-1]}>", 0)
                  if id_node is not None else None),
        terms=tuple(terms), defaults=tuple(defaults))
    check_format(table)
    return table


def _gbif_id_source(table: TableSpec, core: TableSpec) -> str:
    """gbifID is the core's gbifID column: in a GBIF download that is the id
    column itself, so every table's core id is the gbifID; a publisher's own
    archive usually has none."""
    core_gbif = core.index("gbifID")
    if core_gbif is None:
        return GBIF_ID_NONE
    if table.is_core:
        return GBIF_ID_COLUMN
    return GBIF_ID_KEY if core_gbif == core.id_index else GBIF_ID_CORE


def parse_meta(xml_bytes: bytes) -> ArchiveSpec:
    """Parses meta.xml; the DwC text standard's defaults apply to absent attributes."""
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as err:
        raise ExportError(f"meta.xml is not well-formed XML: {err}") from None
    core_node = root.find("{*}core")
    if core_node is None:
        raise ExportError("meta.xml has no <core> table")
    core = _table(core_node, True)
    if core.id_index is None:
        raise ExportError(f"meta.xml: the core {core.location} declares no <id index=...>; "
                          "expected the column that identifies its rows")
    extensions = [_table(e, False) for e in root.findall("{*}extension")]
    core = dataclasses.replace(core, gbif_id_source=_gbif_id_source(core, core))
    extensions = [dataclasses.replace(e, gbif_id_source=_gbif_id_source(e, core))
                  for e in extensions]
    return ArchiveSpec(core=core, extensions=tuple(extensions), metadata=root.get("metadata"))
