"""What each row of the explorer shows and is filtered by.

A snapshot's rows carry what the run needed (ids, scientificName, taxonKey,
datasetKey, the picture's licence and credits); they do not carry country,
date or the higher ranks. Those are in the export the manifest names, so
they are read from its core (occurrence.txt) once, when the explorer's
cache is built, for the occurrences the snapshot holds. An export that is
gone or unreadable leaves those columns empty, and the page says so.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.tools.query import Snapshot, iter_batches, occurrence_ids
from transforms.common.tally import Tally
from transforms.read.archive import READ_ERRORS, Archive
from transforms.read.meta import ExportError
from transforms.read.rows import BadLine, iter_rows
from transforms.read.spec import read_spec
from transforms.read.values import clean_core_id, field

_LOG = logging.getLogger(__name__)

# Snapshot columns kept for showing, filtering and linking.
SNAPSHOT_COLUMNS = ("coreID", "gbifID", "occurrenceID", "datasetKey", "taxonKey", "scientificName",
                    "identifier", "license", "rightsHolder", "creator", "image_sha256")
# Taxon ranks a GBIF export carries in its core, highest first.
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")
# Occurrence fields read from the export: (column here, terms to look for).
EXPORT_FIELDS = (("country", ("countryCode", "country")), ("eventDate", ("eventDate",)),
                 ("year", ("year",)), *((rank, (rank,)) for rank in RANKS))

REUSABLE, NON_COMMERCIAL, RESTRICTED = "reusable (CC0, CC BY)", "non-commercial (NC)", \
    "all rights reserved / unknown"
LICENCE_CLASSES = (REUSABLE, NON_COMMERCIAL, RESTRICTED)
_YEAR = re.compile(r"^\s*(\d{4})")


def licence_class(licence: Optional[str]) -> str:
    """CC0/CC BY(-SA) pictures may be reused with credit; NC ones not commercially;
    anything else (all rights reserved, ND, free text, empty) is unknown."""
    text = (licence or "").lower().replace("_", "-").replace(" ", "-")
    if not text:
        return RESTRICTED
    if "-nc" in text or "noncommercial" in text or "non-commercial" in text:
        return NON_COMMERCIAL
    if "-nd" in text or "noderiv" in text or "reserved" in text:
        return RESTRICTED
    if ("cc0" in text or "publicdomain/zero" in text or "/licenses/by/" in text
            or "/licenses/by-sa/" in text or re.search(r"\bcc-by(-sa)?(-\d|$)", text)):
        return REUSABLE
    return RESTRICTED


def snapshot_records(snapshot: Snapshot) -> pa.Table:
    """One row per embedding, in gallery order: the shown columns, the
    occurrence number the search excludes by, and the licence class."""
    parts, occurrences = [], []
    for _, batch in iter_batches(snapshot.files, [c for c in SNAPSHOT_COLUMNS
                                                  if c in _columns(snapshot)]):
        parts.append(pa.Table.from_batches([batch]))
        occurrences.append(occurrence_ids(batch))
    table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in ("gbifID",)})
    for name in SNAPSHOT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    table = table.select(list(SNAPSHOT_COLUMNS))
    table = table.append_column("occurrence", pa.array(
        np.concatenate(occurrences) if occurrences else np.zeros(0, np.int64), pa.int64()))
    classes = [licence_class(v) for v in table.column("license").to_pylist()]
    table = table.append_column("licence_class", pa.array(classes, pa.string()))
    return table.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))


def _columns(snapshot: Snapshot) -> list[str]:
    import fsspec
    import pyarrow.parquet as pq
    if not snapshot.files:
        return []
    with fsspec.open(snapshot.files[0], "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow.names


def export_path(manifest: dict) -> Optional[str]:
    export = manifest.get("export") or {}
    return export.get("path") if isinstance(export, dict) else None


def export_fields(path: str, core_ids: set[str]) -> dict[str, dict[str, Optional[str]]]:
    """coreID → the EXPORT_FIELDS of its occurrence, for the occurrences wanted;
    rows that cannot be read are skipped (the run has already reported them)."""
    found: dict[str, dict[str, Optional[str]]] = {}
    with Archive(path) as archive:
        core = read_spec(archive).core
        at = {name: next((core.index(t) for t in terms if core.index(t) is not None), None)
              for name, terms in EXPORT_FIELDS}
        with archive.open(core.location) as stream:
            for row in iter_rows(stream, core):
                if isinstance(row, BadLine) or core.id_index is None or core.id_index >= len(row):
                    continue
                key = clean_core_id(row[core.id_index])
                if key in core_ids:
                    found[key] = {name: (field(row, index) or None) for name, index in at.items()}
    return found


def with_export_fields(records: pa.Table, manifest: dict) -> tuple[pa.Table, Optional[str]]:
    """The records with country, eventDate, year and ranks from the export;
    (table, None) or (table with empty columns, why they are empty)."""
    path = export_path(manifest)
    fields: dict[str, dict] = {}
    missing = None
    core = [c if c is not None else (None if g is None else str(g)) for c, g in
            zip(records.column("coreID").to_pylist(), records.column("gbifID").to_pylist())]
    if not path:
        missing = "the manifest names no export"
    else:
        try:
            fields = export_fields(path, {c for c in core if c})
        except (ExportError, *READ_ERRORS) as err:
            missing = f"the export {path} cannot be read ({err})"
        if not fields and missing is None and records.num_rows:
            missing = f"the export {path} holds none of the snapshot's occurrences"
    if missing:
        _LOG.warning("explore: no country, date or ranks: %s", missing)
    empty: dict = {}
    for name, _ in EXPORT_FIELDS:
        values = [(fields.get(c) or empty).get(name) if c else None for c in core]
        if name == "year":
            dates = [(fields.get(c) or empty).get("eventDate") if c else None for c in core]
            values = [_year(v) or _year(d) for v, d in zip(values, dates)]
            records = records.append_column(name, pa.array(values, pa.int32()))
        else:
            records = records.append_column(name, pa.array(values, pa.string()))
    return records, missing


def _year(value: Optional[str]) -> Optional[int]:
    match = _YEAR.match(value or "")
    return int(match.group(1)) if match else None


def available_ranks(records: pa.Table) -> list[str]:
    """Ranks with at least one value (the taxon filter offers these)."""
    return [rank for rank in RANKS if rank in records.column_names
            and pc.count(records.column(rank)).as_py() > 0]

