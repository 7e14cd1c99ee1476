"""The launch-time check of an archive, and its identity (metadata.xml).

`read_spec` runs in the launcher before anything is fetched: every
archive-level problem it can find without reading whole data files fails
here, as one `ExportError` line that names the file, what was expected and
what was found. It opens each data file the run reads and reads its header
line and first 64 KiB: a damaged, encrypted or unsupported zip member, a
small member with a bad CRC, a folder where a file should be, and columns
that the header does not have are all found in a second.
"""
from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from typing import Optional

from transforms.read.archive import READ_ERRORS, Archive
from transforms.read.meta import (
    META_CAP,
    MULTIMEDIA_ROW_TYPES,
    ArchiveSpec,
    ExportError,
    TableSpec,
    parse_meta,
    shown,
)
from transforms.read.rows import LINE_CAP, is_utf8, open_text

# GBIF's metadata.xml is about 4 KB and its dataset/*.xml up to 200 KB here;
# a larger EML is not parsed (the run's download key, DOI and title stay empty).
EML_CAP = 4 << 20
PROBE_CHARS = 64 << 10
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
_log = logging.getLogger(__name__)


def _meta_xml(archive: Archive, names: list[str]) -> bytes:
    if "meta.xml" not in names:
        csv_like = [n for n in names if n.endswith((".csv", ".parquet"))]
        hint = (" It looks like a SIMPLE_CSV/SIMPLE_PARQUET download: those carry no "
                "image URLs; request a DWCA download from GBIF instead." if csv_like else "")
        raise ExportError("expected a Darwin Core Archive with meta.xml at its root; found "
                          f"{len(names)} files ({', '.join(sorted(names)[:6])}).{hint}")
    try:
        data = archive.read_capped("meta.xml", META_CAP)
    except READ_ERRORS as err:
        raise ExportError(f"meta.xml: expected a readable file; found {type(err).__name__}: "
                          f"{err}") from None
    if data is None:
        raise ExportError(f"meta.xml: expected at most {META_CAP:,} bytes (GBIF's are about "
                          f"40 KB); found {archive.size('meta.xml'):,} or more")
    return data


def _check_present(archive: Archive, table: TableSpec, names: list[str]) -> None:
    if table.location in names:
        return
    if archive.is_folder(table.location):
        raise ExportError(f"meta.xml declares {table.location} as a data file; expected a "
                          "file, found a folder")
    raise ExportError(f"meta.xml declares {table.location} but the archive has no "
                      f"such file (it has: {', '.join(sorted(names)[:10])})")


def _header(archive: Archive, table: TableSpec) -> str:
    """The first line; reading on to PROBE_CHARS reads a small member whole,
    so that zipfile checks its CRC."""
    try:
        with archive.open(table.location) as stream:
            start = stream.read(2)
        if start in _UTF16_MARKS and is_utf8(table.encoding):
            raise ExportError(f"{table.location}: meta.xml declares encoding="
                              f"{shown(table.encoding)}; found a UTF-16 byte-order mark")
        with archive.open(table.location) as stream:
            text = open_text(stream, table)
            first = text.readline(LINE_CAP + 1)  # the rest of a longer line is not read
            text.read(PROBE_CHARS)
    except READ_ERRORS as err:
        raise ExportError(f"{table.location}: expected a readable data file; found "
                          f"{type(err).__name__}: {err}") from None
    if len(first) > LINE_CAP and table.ignore_header_lines:
        raise ExportError(f"{table.location}: expected a header line of at most "
                          f"{LINE_CAP:,} characters; found a longer one")
    return first.rstrip("\r\n")


def _header_fields(header: str, table: TableSpec, enough: int) -> list[str]:
    """The header's columns, split no further than `enough` of them."""
    if not table.fields_enclosed_by:
        return header.split(table.fields_terminated_by, enough)
    try:
        return next(csv.reader([header], delimiter=table.fields_terminated_by,
                               quotechar=table.fields_enclosed_by, strict=False), [])
    except csv.Error as err:
        raise ExportError(f"{table.location}: expected a header line of column names; "
                          f"found one that cannot be read ({err})") from None


def _check_columns(table: TableSpec, header: list[str], needed: dict[str, Optional[int]]) -> None:
    """Columns the run needs must exist in the header line."""
    for what, index in needed.items():
        if index is not None and index >= len(header):
            names = ", ".join(shown(h, 20) for h in header[:6])
            raise ExportError(f"{table.location}: meta.xml puts {what} at column {index} "
                              f"(from 0); expected it within the header line, found "
                              f"{len(header)} column(s) ({names})")


def _check_readable(archive: Archive, table: TableSpec, is_source: bool) -> None:
    header = _header(archive, table)
    if not table.ignore_header_lines or not header:
        return  # no header (rows may be ragged, each is judged on its own), or no rows
    needed = {"<id>" if table.is_core else "<coreid>": table.id_index}
    if is_source:
        needed[table.url_term] = table.url_index
    enough = 1 + max(i for i in needed.values() if i is not None)
    _check_columns(table, _header_fields(header, table, enough), needed)


def read_spec(archive: Archive) -> ArchiveSpec:
    """The archive's meta.xml, checked against the files the archive holds."""
    names = archive.names()
    spec = parse_meta(_meta_xml(archive, names))
    for table in spec.tables:
        _check_present(archive, table, names)
    source = spec.image_source()
    if source is None:
        tables = ", ".join(f"{t.location} ({t.row_type or 'no rowType'})" for t in spec.tables)
        raise ExportError("expected image URLs: a multimedia extension "
                          f"({MULTIMEDIA_ROW_TYPES[0]}) with an identifier column, or an "
                          f"associatedMedia column; found only: {tables}")
    if source.id_index is None:
        raise ExportError(f"meta.xml: the extension {source.location} declares no <coreid "
                          "index=...>; expected the column that links its rows to the core")
    _check_readable(archive, spec.core, spec.core is source)
    if source is not spec.core:
        _check_readable(archive, source, True)
    return spec


def read_identity(archive: Archive, spec: ArchiveSpec) -> dict:
    """The GBIF download key and DOI from metadata.xml (EML), when present."""
    identity = {"path": archive.path, "download_key": None, "doi": None, "title": None,
                "published": None}
    name = spec.metadata or "metadata.xml"
    if not archive.exists(name):
        return identity
    try:
        data = archive.read_capped(name, EML_CAP)
    except READ_ERRORS as err:
        _log.warning("%s not read (%s): the download key, DOI and title stay empty", name, err)
        return identity
    if data is None:
        _log.warning("%s is larger than %s bytes and was not parsed: the download key, DOI "
                     "and title stay empty", name, f"{EML_CAP:,}")
        return identity
    try:
        root = ET.fromstring(data)
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
