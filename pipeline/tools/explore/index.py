"""The explorer's cache beside a snapshot, and the search over it.

Built once per snapshot into `SNAPSHOT/explore/` (a snapshot never changes
once published, so neither does its cache):

    records.parquet   one row per embedding, in gallery order: what a result
                      shows (ids, name, licence, credits, picture hash), what
                      filters use (country, year, dataset, licence class,
                      ranks), and the map's x, y
    index.faiss       every unit vector in a faiss index that scores all of them
                      (IndexScalarQuantizer, float16: exhaustive inner product, so
                      cosine, at half of float32's memory and memory traffic; no
                      clustering or graph, so nothing is skipped)
    explore.json      what was built, when, how long it took, what is missing

Exhaustive search of 565,000 × 256 half floats is tens of milliseconds on one
core, so no approximate index is needed at Svampeatlas' size; float16
rounding (about 1e-3) can swap near-ties only (bench/explore.py measures
recall@10 against float32 brute force). Filters are SQL over the records in DuckDB;
the rows they keep become a faiss IDSelectorBitmap, so the search itself
skips the others and always returns k results when k exist (filtering
after the search would under-return).
"""
from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.explore import layout as layouts
from pipeline.tools.explore.records import (LICENCE_CLASSES, RANKS, available_ranks,
                                            snapshot_records, with_export_fields)
from pipeline.tools.query import (QueryError, Snapshot, embedding_matrix, iter_batches,
                                  normalize)
from transforms.write.parts import write_table_atomically
from transforms.common.files import join, write_atomically

_LOG = logging.getLogger(__name__)

FOLDER = "explore"
RECORDS = "records.parquet"
INFO = "explore.json"
INDEX = "index.faiss"
VERSION = 2
READ_ROWS = 65_536
# Columns SQL filters and look-ups use (a DuckDB table of them).
SQL_COLUMNS = ("row", "gbifID", "coreID", "occurrenceID", "identifier", "scientificName",
               "country", "year", "datasetKey", "licence_class", *RANKS)
# Columns whose values repeat: kept as dictionaries in memory.
REPEATED = ("datasetKey", "scientificName", "license", "rightsHolder", "creator",
            "licence_class", "country", "kingdom", "phylum", "class", "order", "family",
            "genus")


def cache_folder(snapshot: Snapshot) -> str:
    return join(snapshot.folder, FOLDER)


def read_info(snapshot: Snapshot) -> Optional[dict]:
    """explore.json of a built cache of this version; None when there is none."""
    path = join(cache_folder(snapshot), INFO)
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(local):
        return None
    with fs.open(local, "r") as handle:
        info = json.load(handle)
    return info if info.get("version") == VERSION else None


def read_vectors(snapshot: Snapshot) -> np.ndarray:
    """Every embedding of the snapshot as unit rows, in gallery order."""
    rows = sum(int(entry["rows"]) for entry in
               (snapshot.manifest.get("files") or {}).get("embeddings") or []) or None
    blocks, out, at = [], None, 0
    for _, batch in iter_batches(snapshot.files, ["embedding"], READ_ROWS):
        unit = normalize(embedding_matrix(batch.column("embedding")))
        if rows is not None:
            if out is None:
                out = np.empty((rows, unit.shape[1]), np.float32)
            out[at:at + len(unit)] = unit
            at += len(unit)
        else:
            blocks.append(unit)
    if out is not None:
        return out[:at]
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def build(snapshot: Snapshot, say: Callable[[str], None] = lambda _: None) -> dict:
    """Writes the cache (records with the map's coordinates); returns explore.json."""
    started = time.monotonic()
    say(f"reading the records of {snapshot.name}")
    records = snapshot_records(snapshot)
    records, missing = with_export_fields(records, snapshot.manifest)
    say(f"reading {records.num_rows:,} embeddings")
    vectors = read_vectors(snapshot)
    layout_started = time.monotonic()
    say("laying out the map (PCA, UMAP on a sample, the rest placed by neighbours)")
    xy = layouts.layout(vectors) if len(vectors) else np.zeros((0, 2), np.float32)
    layout_s = time.monotonic() - layout_started
    records = records.append_column("x", pa.array(xy[:, 0], pa.float32()))
    records = records.append_column("y", pa.array(xy[:, 1], pa.float32()))
    say("writing the index")
    _write_bytes(join(cache_folder(snapshot), INDEX), _serialized(vectors))
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    del vectors
    write_table_atomically(join(cache_folder(snapshot), RECORDS), records)
    info = {"version": VERSION, "snapshot": snapshot.name, "rows": records.num_rows,
            "dim": dim,
            "ranks": available_ranks(records), "export_fields_missing": missing,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "build_seconds": round(time.monotonic() - started, 2),
            "layout_seconds": round(layout_s, 2)}
    write_atomically(join(cache_folder(snapshot), INFO), json.dumps(info, indent=2))
    return info


def _serialized(vectors: np.ndarray) -> bytes:
    import faiss
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 1
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                       faiss.METRIC_INNER_PRODUCT)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, np.float32))
    return faiss.serialize_index(index).tobytes()


def _write_bytes(path: str, data: bytes) -> None:
    """Whole or not at all, locally and in buckets (the parts' rule)."""
    import os
    import uuid
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, local)
        return
    with fs.open(local, "wb") as handle:
        handle.write(data)


def ensure_built(snapshot: Snapshot, say: Callable[[str], None] = lambda _: None) -> dict:
    """The cache's explore.json, building the cache first when there is none."""
    return read_info(snapshot) or build(snapshot, say)


# ---------------------------------------------------------------- the loaded index

@dataclass
class Filters:
    """What a search may return: each set field narrows it."""
    rank: Optional[str] = None
    taxon: Optional[str] = None
    country: Optional[str] = None
    year_from: Optional[int] = None
    year_to: Optional[int] = None
    dataset: Optional[str] = None
    licence: Optional[str] = None

    def any(self) -> bool:
        return any(v not in (None, "") for v in (self.taxon, self.country, self.year_from,
                                                self.year_to, self.dataset, self.licence))


@dataclass
class Explorer:
    """A snapshot loaded for searching: records, exact index, DuckDB for filters."""
    snapshot: Snapshot
    info: dict
    records: pa.Table
    index: object               # faiss index over unit vectors (exhaustive, float16)
    con: object                 # duckdb connection with `records` registered
    _occurrence: np.ndarray = field(repr=False, default=None)
    gbif_sorted: np.ndarray = field(repr=False, default=None)  # gbifIDs, sorted
    gbif_rows: np.ndarray = field(repr=False, default=None)    # their rows
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @classmethod
    def load(cls, snapshot: Snapshot, info: dict) -> "Explorer":
        import duckdb
        import faiss
        folder = cache_folder(snapshot)
        with fsspec.open(join(folder, RECORDS), "rb") as handle:
            records = pq.read_table(handle, read_dictionary=list(REPEATED))
        # One chunk per column: taking a few rows from many chunks is slow.
        records = records.unify_dictionaries().combine_chunks()
        with fsspec.open(join(folder, INDEX), "rb") as handle:
            index = faiss.deserialize_index(np.frombuffer(handle.read(), np.uint8))
        if index.ntotal != records.num_rows:
            raise QueryError(f"{join(folder, INDEX)} holds {index.ntotal} vectors but "
                             f"{join(folder, RECORDS)} {records.num_rows} rows; delete "
                             f"{folder} to build it again")
        # One thread a query: a request scores every vector once, and OpenMP's
        # threads only wait on each other when the cores are busy (2.5x slower
        # on a loaded 2-core machine); the server answers requests in parallel.
        faiss.omp_set_num_threads(1)
        con = duckdb.connect()
        # Filters and look-ups scan a native DuckDB table of the columns they use
        # (compressed, scanned in parallel), several times faster than an Arrow scan.
        con.register("arrow_records", records)
        con.execute("CREATE TABLE records AS SELECT "
                    + ", ".join(f'"{c}"' for c in SQL_COLUMNS) + " FROM arrow_records")
        con.unregister("arrow_records")
        gbif = records.column("gbifID").fill_null(-1).to_numpy()
        order = np.argsort(gbif, kind="stable")
        return cls(snapshot, info, records, index, con,
                   records.column("occurrence").to_numpy(), gbif_sorted=gbif[order],
                   gbif_rows=order)

    def sql(self, query: str, params: Optional[list] = None) -> list[tuple]:
        """A query's rows. One connection, one query at a time: the server
        answers requests on several threads, and each query takes milliseconds."""
        with self._lock:
            return self.con.execute(query, params or []).fetchall()

    def sql_column(self, query: str, params: Optional[list] = None) -> np.ndarray:
        """A one-column query's values as an array."""
        with self._lock:
            found = self.con.execute(query, params or []).fetchnumpy()
        return np.asarray(next(iter(found.values())))

    @property
    def size(self) -> int:
        return self.records.num_rows

    def vector(self, row: int) -> np.ndarray:
        return self.index.reconstruct(int(row))

    # ---- looking up records

    def rows(self, rows) -> list[dict]:
        rows = [int(r) for r in rows]
        if not rows:
            return []
        return self.records.take(pa.array(rows, pa.int64())).to_pylist()

    def find_id(self, text: str) -> Optional[int]:
        """The first image (smallest identifier) of an occurrence named by its
        gbifID, core id or occurrenceID."""
        text = text.strip()
        number = int(text) if text.isdigit() and len(text) < 19 else None
        if number is not None:  # the common case, by binary search
            lo, hi = np.searchsorted(self.gbif_sorted, [number, number + 1])
            if hi > lo:
                rows = self.gbif_rows[lo:hi].tolist()
                firsts = sorted((r.get("identifier") or "", r["row"]) for r in self.rows(rows))
                return int(firsts[0][1])
        found = self.sql(
            "SELECT row FROM records WHERE gbifID = ? OR coreID = ? OR occurrenceID = ? "
            "ORDER BY identifier, row LIMIT 1", [number, text, text])
        return int(found[0][0]) if found else None

    def find_name(self, text: str) -> Optional[tuple[str, list[int]]]:
        """A scientific name (exact, case-insensitive; else the commonest that
        starts with the text) and its rows."""
        text = text.strip()
        if not text:
            return None
        found = self.sql(
            "SELECT scientificName, count(*) AS n FROM records WHERE lower(scientificName) = "
            "lower(?) GROUP BY 1 ORDER BY n DESC LIMIT 1", [text]) or self.sql(
            "SELECT scientificName, count(*) AS n FROM records WHERE scientificName ILIKE "
            "? GROUP BY 1 ORDER BY n DESC, 1 LIMIT 1", [text.replace("%", "") + "%"])
        if not found:
            return None
        name = found[0][0]
        rows = self.sql_column("SELECT row FROM records WHERE scientificName = ? ORDER BY row",
                               [name])
        return name, [int(r) for r in rows]

    def centroid(self, rows: list[int]) -> np.ndarray:
        """The mean direction of some rows' vectors (a name's typical picture)."""
        stacked = np.stack([self.vector(r) for r in rows[:5000]])
        return normalize(stacked.mean(axis=0, keepdims=True))[0]

    # ---- filters

    def filter_mask(self, filters: Filters) -> Optional[np.ndarray]:
        """Per row, whether it passes the filters; None when nothing is filtered."""
        if not filters.any():
            return None
        where, params = [], []
        if filters.taxon:
            rank = filters.rank or "scientificName"
            if rank not in (*RANKS, "scientificName"):
                raise QueryError(f"rank must be one of scientificName, {', '.join(RANKS)}; "
                                 f"found {rank!r}")
            where.append(f'lower("{rank}") = lower(?)')
            params.append(filters.taxon.strip())
        if filters.country:
            where.append("country = ?")
            params.append(filters.country.strip().upper())
        if filters.year_from not in (None, ""):
            where.append("year >= ?")
            params.append(int(filters.year_from))
        if filters.year_to not in (None, ""):
            where.append("year <= ?")
            params.append(int(filters.year_to))
        if filters.dataset:
            where.append("datasetKey = ?")
            params.append(filters.dataset.strip())
        if filters.licence:
            if filters.licence not in LICENCE_CLASSES:
                raise QueryError(f"licence must be one of {', '.join(LICENCE_CLASSES)}; "
                                 f"found {filters.licence!r}")
            where.append("licence_class = ?")
            params.append(filters.licence)
        rows = self.sql_column(f"SELECT row FROM records WHERE {' AND '.join(where)}", params)
        mask = np.zeros(self.size, bool)
        mask[np.asarray(rows, np.int64)] = True
        return mask

    # ---- search

    def search(self, vector: np.ndarray, k: int, mask: Optional[np.ndarray] = None,
               exclude_occurrence: Optional[int] = None) -> list[tuple[int, float]]:
        """The k rows nearest to a unit vector (cosine), best first, among the
        rows the mask keeps, never of the excluded occurrence."""
        import faiss
        if self.size == 0 or k < 1:
            return []
        extra = 0
        if exclude_occurrence is not None:
            own = self._occurrence == exclude_occurrence
            if mask is not None:
                mask = mask & ~own
            else:
                extra = int(own.sum())
        want = min(self.size, k + extra)
        query = np.ascontiguousarray(vector, np.float32).reshape(1, -1)
        if mask is not None:
            if not mask.any():
                return []
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bitmap))
            scores, rows = self.index.search(query, want,
                                             params=faiss.SearchParameters(sel=selector))
        else:
            scores, rows = self.index.search(query, want)
        found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        if exclude_occurrence is not None and mask is None:
            found = [(r, s) for r, s in found if self._occurrence[r] != exclude_occurrence]
        return found[:k]

