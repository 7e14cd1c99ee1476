"""Darwin Core Archives the tests make themselves: GBIF-shaped, IPT-shaped, hostile.

Cells are bytes or str and are written as given (str as UTF-8), so a test
can put any bytes anywhere: invalid UTF-8, NULs, a CR, a 200,000-field row.
`read_tasks` runs the reader's two steps (ReadArchive, then the join) without
a pipeline, the way the CoGroupByKey between them groups rows.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
import zipfile
from typing import Iterable, Mapping, Optional, Sequence, Union
from xml.sax.saxutils import quoteattr

import apache_beam as beam
import pytest

from transforms.common.records import FAILURES
from transforms.common.tally import TALLY
from transforms.read.export import Archive, ExportError, JoinOccurrences, ReadArchive, read_spec

Cell = Union[bytes, str]
DC = "http://purl.org/dc/terms/"
DWC = "http://rs.tdwg.org/dwc/terms/"
GBIF = "http://rs.gbif.org/terms/1.0/"
OCCURRENCE = DWC + "Occurrence"
MULTIMEDIA = GBIF + "Multimedia"
GBIF_ATTRIBUTES = {"encoding": "UTF-8", "fieldsTerminatedBy": "\\t", "linesTerminatedBy": "\\n",
                   "fieldsEnclosedBy": "", "ignoreHeaderLines": "1"}

# A GBIF download's core (a subset of its columns) and its 15 multimedia columns.
CORE_TERMS = (GBIF + "gbifID", DWC + "occurrenceID", GBIF + "datasetKey", GBIF + "taxonKey",
              DWC + "scientificName", DC + "license", DC + "rightsHolder")
MEDIA_TERMS = tuple(GBIF + "gbifID" if n == "gbifID" else DC + n for n in (
    "gbifID", "type", "format", "identifier", "references", "title", "description", "source",
    "audience", "created", "creator", "contributor", "publisher", "license", "rightsHolder"))
# An IPT's: the occurrenceID is the core id; no gbifID anywhere.
IPT_CORE_TERMS = (DWC + "occurrenceID", DWC + "basisOfRecord", DWC + "scientificName",
                  DWC + "eventDate", DC + "license", DC + "rightsHolder")
IPT_MEDIA_TERMS = (DC + "identifier", DC + "type", DC + "format", DC + "creator",
                   DC + "rightsHolder")


@dataclasses.dataclass
class Decl:
    """One <core> or <extension> of meta.xml."""
    location: str
    row_type: str
    terms: Sequence[str]
    id_index: Optional[int] = 0
    attributes: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(GBIF_ATTRIBUTES))
    defaults: Mapping[str, str] = dataclasses.field(default_factory=dict)
    first_term_index: int = 0   # IPT extensions put the coreid at 0 and terms from 1


def _block(tag: str, decl: Decl) -> str:
    attributes = " ".join(f"{k}={quoteattr(v)}" for k, v in decl.attributes.items())
    lines = [f"  <{tag} {attributes} rowType={quoteattr(decl.row_type)}>",
             f"    <files><location>{decl.location}</location></files>"]
    if decl.id_index is not None:
        lines.append(f'    <{"id" if tag == "core" else "coreid"} index="{decl.id_index}"/>')
    lines += [f'    <field index="{decl.first_term_index + i}" term="{t}"/>'
              for i, t in enumerate(decl.terms)]
    lines += [f"    <field term={quoteattr(t)} default={quoteattr(v)}/>"
              for t, v in decl.defaults.items()]
    return "\n".join(lines + [f"  </{tag}>"])


def meta_xml(core: Decl, *extensions: Decl, metadata: str = "metadata.xml") -> bytes:
    blocks = [_block("core", core)] + [_block("extension", e) for e in extensions]
    return (f'<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="{metadata}">\n'
            + "\n".join(blocks) + "\n</archive>\n").encode()


def _bytes(cell: Cell) -> bytes:
    return cell if isinstance(cell, bytes) else str(cell).encode("utf-8")


def table(header: Iterable[Cell], rows: Iterable[Sequence[Cell]], sep: bytes = b"\t",
          end: bytes = b"\n") -> bytes:
    lines = [sep.join(_bytes(c) for c in header)]
    lines += [sep.join(_bytes(c) for c in row) for row in rows]
    return end.join(lines) + end


def header_of(terms: Sequence[str]) -> list[str]:
    return [t.rsplit("/", 1)[-1] for t in terms]


def media_row(gbif_id: Cell, url: Cell, *, kind: Cell = "StillImage",
              format: Cell = "image/jpeg", creator: Cell = "", license: Cell = "") -> list[Cell]:
    row: list[Cell] = [""] * len(MEDIA_TERMS)
    row[0], row[1], row[2], row[3], row[10], row[13] = gbif_id, kind, format, url, creator, license
    return row


def occurrence_row(gbif_id: Cell, name: Cell = "Amanita muscaria", taxon_key: Cell = "5248454",
                   occurrence_id: Optional[Cell] = None) -> list[Cell]:
    occurrence_id = f"urn:o:{gbif_id!s}" if occurrence_id is None else occurrence_id
    return [gbif_id, occurrence_id, "84d26682-f762-11e1-a439-00145eb45e9a", taxon_key, name,
            "CC_BY_4_0", "someone"]


def eml(doi: str = "10.15468/dl.test01", key: str = "0000001-261126000000000") -> bytes:
    return (f'<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" packageId="{doi}">'
            f"<dataset><alternateIdentifier>{key}</alternateIdentifier>"
            "<title>A test download</title></dataset></eml:eml>").encode()


def gbif_files(media: Sequence[Sequence[Cell]], occurrences: Sequence[Sequence[Cell]],
               *, core: Optional[Decl] = None, multimedia: Optional[Decl] = None
               ) -> dict[str, bytes]:
    """A GBIF download's files: meta.xml, metadata.xml, occurrence.txt, multimedia.txt."""
    core = core or Decl("occurrence.txt", OCCURRENCE, CORE_TERMS)
    multimedia = multimedia or Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS)
    return {"meta.xml": meta_xml(core, multimedia), "metadata.xml": eml(),
            "occurrence.txt": table(header_of(core.terms), occurrences),
            "multimedia.txt": table(header_of(multimedia.terms), media)}


def write(dest: str, files: Mapping[str, bytes], as_zip: bool = True,
          compression: int = zipfile.ZIP_DEFLATED) -> str:
    """`files` as a zip at dest (as_zip) or as a folder at dest; returns dest."""
    if as_zip:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with zipfile.ZipFile(dest, "w", compression) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return dest
    for name, data in files.items():
        path = os.path.join(dest, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    return dest


@dataclasses.dataclass(frozen=True)
class IptOccurrence:
    """One occurrence of a publisher's own archive and its image URLs."""
    occurrence_id: str           # e.g. urn:catalog:XYZ:123, the archive's core id
    scientific_name: str
    urls: tuple[str, ...]
    creator: str = "A. Photographer"


def ipt_files(occurrences: Sequence[IptOccurrence], *,
              license: str = "http://creativecommons.org/licenses/by/4.0/legalcode"
              ) -> dict[str, bytes]:
    """A dataset's source archive as an IPT publishes it: core occurrence.txt
    keyed by occurrenceID (no gbifID column), a multimedia extension whose
    column 0 is the coreid, the licence as a meta.xml default, eml.xml."""
    core = Decl("occurrence.txt", OCCURRENCE, IPT_CORE_TERMS,
                defaults={DC + "license": license})
    media = Decl("multimedia.txt", MULTIMEDIA, IPT_MEDIA_TERMS, first_term_index=1)
    core_rows = [[o.occurrence_id, "HumanObservation", o.scientific_name, "2024-09-01", "",
                  o.creator] for o in occurrences]
    media_rows = [[o.occurrence_id, url, "StillImage", "image/jpeg", o.creator, o.creator]
                  for o in occurrences for url in o.urls]
    return {"meta.xml": meta_xml(core, media, metadata="eml.xml"),
            "eml.xml": eml(doi="10.15468/ipt123", key="ipt-dataset"),
            "occurrence.txt": table(header_of(IPT_CORE_TERMS), core_rows),
            "multimedia.txt": table(["id"] + header_of(IPT_MEDIA_TERMS), media_rows)}


def write_ipt_archive(dest: str, occurrences: Sequence[IptOccurrence],
                      as_zip: bool = True) -> str:
    return write(dest, ipt_files(occurrences), as_zip)


def ipt_occurrences(n: int, base_url: str, catalog: str = "XYZ") -> list[IptOccurrence]:
    """n occurrences with string ids urn:catalog:<catalog>:<i> and 1-2 images each."""
    base = base_url.rstrip("/") + "/"
    return [IptOccurrence(f"urn:catalog:{catalog}:{100 + i}", f"Species {i % 3}",
                          tuple(f"{base}{i}-{j}.jpg" for j in range(1 + i % 2)))
            for i in range(n)]


@dataclasses.dataclass
class ReadResult:
    tasks: list[dict]
    failures: list[dict]
    tally: collections.Counter


def read_tasks(path: str, **reader_options) -> ReadResult:
    """ReadArchive, the CoGroupByKey by core id, and JoinOccurrences, in process."""
    media, occurrences = collections.defaultdict(list), collections.defaultdict(list)
    failures, tally = [], collections.Counter()
    for out in ReadArchive(**reader_options).process(path):
        if not isinstance(out, beam.pvalue.TaggedOutput):
            media[out[0]].append(out[1])
        elif out.tag == TALLY:
            tally.update(out.value.value)
        elif out.tag == FAILURES:
            failures.append(out.value)
        else:
            occurrences[out.value[0]].append(out.value[1])
    join, tasks = JoinOccurrences(), []
    join.start_bundle()
    for key in media:
        tasks += join.process((key, {"media": media[key], "occurrences": occurrences[key]}))
    for out in join.finish_bundle():
        tally.update(out.value.value)
    return ReadResult(tasks, failures, tally)


def accounted(result: ReadResult) -> int:
    """Image rows the reader accounted for: tasks, counted skips and failure rows."""
    skipped = sum(v for k, v in result.tally.items() if k.startswith("skipped."))
    return len(result.tasks) + skipped + len(result.failures)


def standard_files(media=None, occurrences=None, **decls) -> dict[str, bytes]:
    """A small GBIF download's files: two occurrences with an image each."""
    media = media if media is not None else [media_row("1", "http://h/1.jpg"),
                                             media_row("2", "http://h/2.jpg")]
    occurrences = occurrences if occurrences is not None else [occurrence_row("1"),
                                                               occurrence_row("2")]
    return gbif_files(media, occurrences, **decls)


def write_form(tmp_path, files, form: str = "zip", **kw) -> str:
    """`files` as tmp_path/export.zip (form zip) or the folder tmp_path/export."""
    return write(str(tmp_path / ("export.zip" if form == "zip" else "export")), files,
                 form == "zip", **kw)


def refused(path: str, *fragments: str) -> str:
    """read_spec's one-line ExportError, which must hold every fragment."""
    started = time.monotonic()
    with pytest.raises(ExportError) as caught:
        with Archive(path) as archive:
            read_spec(archive)
    message = str(caught.value)
    assert "\n" not in message and time.monotonic() - started < 5
    for fragment in fragments:
        assert fragment in message, message
    return message
