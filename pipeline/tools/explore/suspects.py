"""Suspect identifications: records whose pictures look like another name.

For every picture, its K nearest pictures of *other* occurrences vote for
their scientific names, each vote weighted by its cosine similarity. A
record is a suspect when another name gets more weight than its own; its
score is that name's share of the weight minus its own name's share (1: all
neighbours carry one other name; near 0: a split vote). An occurrence with
several pictures counts once, by its most suspect picture.

What the list means: these pictures sit among pictures that carry another
name, in this model's view. What it does not mean: that the record is
wrong. Look-alike species, a name missing from the rest of the snapshot, a
picture of the habitat or of a microscope slide, or a model that does not
separate the species all put a record on the list. It orders what a
publisher may want to review first; it decides nothing.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.explore.index import FOLDER, Explorer, cache_folder
from pipeline.tools.query import occurrence_link
from transforms.write.parts import write_table_atomically
from transforms.common.files import join

K = 10
BATCH = 2048
MAX_EXTRA = 32   # rows of the query's own occurrence skipped at most
EXACT_LIMIT = 100_000  # more pictures: neighbours from an inverted-file index
NPROBE = 24
CSV_COLUMNS = ("rank", "score", "scientificName", "suggested_name", "suggested_share",
               "own_name_share", "neighbours", "gbifID", "coreID", "occurrenceID", "datasetKey",
               "country", "year", "license", "creator", "rightsHolder", "identifier",
               "image_sha256", "link")


def suspects_path(explorer: Explorer, k: int) -> str:
    return join(cache_folder(explorer.snapshot), f"suspects-k{k}.parquet")


def neighbour_table(explorer: Explorer, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] rows and cosines of every picture's nearest pictures of other occurrences."""
    n = explorer.size
    occurrence = explorer.records.column("occurrence").to_numpy()
    per_occurrence = np.unique(occurrence, return_counts=True)[1]
    extra = int(min(MAX_EXTRA, per_occurrence.max() if len(per_occurrence) else 0))
    want = min(n, k + extra)
    import faiss
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # batches of queries: every core
    try:
        return _neighbours(explorer, occurrence, k, want)
    finally:
        faiss.omp_set_num_threads(1)  # the server's single queries: see index.py


def _neighbours(explorer: Explorer, occurrence: np.ndarray, k: int,
                want: int) -> tuple[np.ndarray, np.ndarray]:
    n = explorer.size
    rows = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    index = explorer.index if n <= EXACT_LIMIT else _inverted(explorer)
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        found_scores, found = index.search(explorer.index.reconstruct_n(lo, hi - lo), want)
        other = (found >= 0) & (occurrence[np.maximum(found, 0)]
                                != occurrence[lo:hi, None])
        for i in range(hi - lo):
            keep = np.flatnonzero(other[i])[:k]
            rows[lo + i, :len(keep)] = found[i, keep]
            scores[lo + i, :len(keep)] = found_scores[i, keep]
    return rows, scores


def _inverted(explorer: Explorer):
    """An inverted-file index (faiss IVF) over the explorer's vectors: every
    picture's neighbours at once would take n² dot products exactly (half an
    hour for 565,000 on 2 cores); probing the NPROBE nearest of sqrt(n)·4 lists
    reads about 1% of them. Neighbours a vote misses change a share, rarely a rank."""
    import faiss
    n, dim = explorer.size, explorer.index.d
    lists = int(4 * np.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, lists * 40), replace=False))
    index.train(np.stack([explorer.vector(int(r)) for r in sample]))
    for lo in range(0, n, 65_536):
        index.add(explorer.index.reconstruct_n(lo, min(n, lo + 65_536) - lo))
    index.nprobe = NPROBE
    return index


def score(names: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per picture: the best other name, its weighted share, the own name's share."""
    n, k = rows.shape
    codes, labels = _codes(names)
    neighbour_codes = np.where(rows >= 0, codes[np.maximum(rows, 0)], -1)
    weights = np.where((rows >= 0) & (neighbour_codes >= 0), np.maximum(scores, 0) + 1e-6, 0)
    total = weights.sum(axis=1)
    own = (weights * (neighbour_codes == codes[:, None])).sum(axis=1)
    best_other = np.full(n, -1, np.int64)
    best_share = np.zeros(n, np.float32)
    for j in range(k):  # each neighbour's name is a candidate; its votes summed over the row
        candidate = neighbour_codes[:, j]
        votes = (weights * (neighbour_codes == candidate[:, None])).sum(axis=1)
        better = (candidate >= 0) & (candidate != codes) & (votes > best_share)
        best_other[better] = candidate[better]
        best_share[better] = votes[better]
    safe = np.where(total > 0, total, 1)
    return {"suggested": np.array([labels[c] if c >= 0 else None for c in best_other], object),
            "suggested_share": (best_share / safe).astype(np.float32),
            "own_share": (own / safe).astype(np.float32),
            "neighbours": (neighbour_codes >= 0).sum(axis=1),
            "named": codes >= 0}


def _codes(names: np.ndarray) -> tuple[np.ndarray, list]:
    labels = sorted({v for v in names if v})
    at = {v: i for i, v in enumerate(labels)}
    return np.array([at.get(v, -1) if v else -1 for v in names], np.int64), labels


def compute(explorer: Explorer, k: int = K) -> pa.Table:
    """The suspects, most suspect first, one row per occurrence."""
    names = np.array(explorer.records.column("scientificName").to_pylist(), object)
    rows, scores = neighbour_table(explorer, k)
    voted = score(names, rows, scores)
    strength = voted["suggested_share"] - voted["own_share"]
    suspect = voted["named"] & (strength > 0)
    picked = np.flatnonzero(suspect)
    order = picked[np.lexsort((picked, -voted["suggested_share"][picked], -strength[picked]))]
    occurrence = explorer.records.column("occurrence").to_numpy()
    _, first = np.unique(occurrence[order], return_index=True)
    order = order[np.sort(first)]  # each occurrence once, by its most suspect picture
    return pa.table({
        "row": pa.array(order, pa.int64()),
        "rank": pa.array(np.arange(1, len(order) + 1), pa.int64()),
        "score": pa.array(strength[order], pa.float32()),
        "suggested_name": pa.array(voted["suggested"][order].tolist(), pa.string()),
        "suggested_share": pa.array(voted["suggested_share"][order], pa.float32()),
        "own_name_share": pa.array(voted["own_share"][order], pa.float32()),
        "neighbours": pa.array(voted["neighbours"][order], pa.int32()),
    })


def suspects(explorer: Explorer, k: int = K) -> pa.Table:
    """The suspects of the snapshot, computed once and kept in explore/."""
    path = suspects_path(explorer, k)
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if fs.exists(local):
        with fs.open(local, "rb") as handle:
            return pq.read_table(handle)
    table = compute(explorer, k)
    write_table_atomically(path, table)
    return table


def rows_of(explorer: Explorer, table: pa.Table, limit: Optional[int] = None) -> list[dict]:
    """Suspects with their records' columns and GBIF links, for the page and the CSV."""
    if limit is not None:
        table = table.slice(0, limit)
    records = explorer.rows(table.column("row").to_pylist())
    out = []
    for suspect, record in zip(table.to_pylist(), records):
        row = dict(record, **suspect)
        row["link"] = occurrence_link(record)
        out.append(row)
    return out


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: (f"{row[name]:.4f}" if isinstance(row.get(name), float)
                                else row.get(name)) for name in CSV_COLUMNS})
    return buffer.getvalue()


__all__ = ["FOLDER", "compute", "suspects", "rows_of", "to_csv", "score"]
