"""`gbif-embed evaluate`: Recall@k of image retrieval over the current snapshot.

The embedder's purpose is finding similar mushroom pictures, and its model
card measures that as Recall@k (R@1 = 0.399, R@5 = 0.60): the share of
query images whose k nearest neighbours (cosine) include one with the same
label. Measuring the same thing on a run's own rows tells whether the run
produced usable vectors (wrong model, wrong resize, broken pictures all show
up as a low recall).

Rules, so that the figure is honest and comparable:
* pictures of the query's own occurrence (same gbifID) are never its
  neighbours: they show the same mushroom and would inflate the recall;
* labels with a single occurrence cannot be found from another occurrence,
  so their images are not queries (they stay in the gallery as distractors);
* rows without a label are left out of both.
Search is exact and streamed in blocks (see `pipeline.tools.query.search`); large
snapshots are measured on a seeded sample of queries, named in the result.
"""
from __future__ import annotations

import datetime
import json
import time
from typing import Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.tools.query import (GALLERY_BLOCK, QUERY_BLOCK, Neighbours, Snapshot, id_columns,
                                  iter_batches, iter_blocks, occurrence_ids, open_snapshot,
                                  search, vectors_at)
from transforms.common.files import join, write_atomically

EVALUATION = "evaluation.json"
KS = (1, 5, 10)
LABELS = ("scientificName", "taxonKey")
DEFAULT_QUERIES = 10_000
# The fungi_V2 model card's figures (real weights, Danish Mycological Society data).
PUBLISHED = {1: 0.399, 5: 0.60}


class EvaluationError(ValueError):
    """The snapshot cannot be evaluated; says why."""


def read_labels(snapshot: Snapshot, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Per gallery row: its occurrence (a number, `occurrence_ids`) and an
    integer label code (-1: no label).

    Streamed and coded batch by batch, so only two integers per row are kept.
    """
    if label not in LABELS:
        raise EvaluationError(f"--label must be one of {', '.join(LABELS)}, not {label!r}")
    codes: dict = {}
    ids, labels = [], []
    for _, batch in iter_batches(snapshot.files, [*id_columns(snapshot.files), label]):
        ids.append(occurrence_ids(batch))
        column = batch.column(label)
        if pa.types.is_string(column.type):  # an empty name is no name
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
        encoded = column.dictionary_encode()
        local = np.array([codes.setdefault(value, len(codes))
                          for value in encoded.dictionary.to_pylist()] + [-1], np.int64)
        indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        labels.append(local[indices])  # -1 indexes the appended "no label"
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids).astype(np.int64), np.concatenate(labels)


def occurrences_per_label(gbif_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How many distinct occurrences each label code has (index: code)."""
    labelled = labels >= 0
    if not labelled.any():
        return np.zeros(0, np.int64)
    pairs = np.unique(np.stack([labels[labelled], gbif_ids[labelled]], axis=1), axis=0)
    return np.bincount(pairs[:, 0], minlength=int(labels.max()) + 1)


def eligible_queries(gbif_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row numbers that may be queries: labelled, and the label has another occurrence."""
    per_label = occurrences_per_label(gbif_ids, labels)
    labelled = labels >= 0
    ok = np.zeros(len(labels), bool)
    ok[labelled] = per_label[labels[labelled]] >= 2
    return np.flatnonzero(ok)


def sample_queries(eligible: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n of the eligible rows, chosen by the seed, in row order."""
    if n <= 0 or n >= len(eligible):
        return eligible
    return np.sort(np.random.default_rng(seed).choice(eligible, size=n, replace=False))


def recall_at(found: Neighbours, labels: np.ndarray, query_labels: np.ndarray,
              ks: Sequence[int] = KS) -> dict[int, float]:
    """Share of queries with a same-label image among their k nearest."""
    valid = found.rows >= 0
    hits = valid & (labels[np.where(valid, found.rows, 0)] == query_labels[:, None])
    return {k: float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0 for k in ks}


def evaluate(output: str, label: str = "scientificName", queries: int = DEFAULT_QUERIES,
             seed: int = 0, *, query_block: int = QUERY_BLOCK,
             gallery_block: int = GALLERY_BLOCK) -> dict:
    """Recall@1/5/10 over OUTPUT/LATEST; returns what evaluation.json holds."""
    started = time.monotonic()
    snapshot = open_snapshot(output)
    gbif_ids, labels = read_labels(snapshot, label)
    eligible = eligible_queries(gbif_ids, labels)
    if not len(eligible):
        raise EvaluationError(
            f"no image of {snapshot.name} can be a query: it needs a {label} shared by at "
            f"least two occurrences ({len(labels)} rows, "
            f"{int((labels < 0).sum())} without a {label})")
    chosen = sample_queries(eligible, queries, seed)
    found = search(vectors_at(snapshot.files, chosen, gallery_block),
                   iter_blocks(snapshot.files, gallery_block), max(KS),
                   query_ids=gbif_ids[chosen], gallery_mask=labels >= 0,
                   query_block=query_block)
    recall = recall_at(found, labels, labels[chosen])
    per_label = occurrences_per_label(gbif_ids, labels)
    singles = np.flatnonzero(per_label == 1)
    return {
        "snapshot": snapshot.name,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "label": label,
        "metric": ("Recall@k: share of query images with an image of the same label among "
                   "their k nearest neighbours by cosine similarity (exact search); images "
                   "of the query's own occurrence (same gbifID) are not neighbours"),
        "recall": {str(k): round(v, 6) for k, v in recall.items()},
        "published": {str(k): v for k, v in PUBLISHED.items()},
        "queries": int(len(chosen)),
        "eligible_queries": int(len(eligible)),
        "sampled": bool(len(chosen) < len(eligible)),
        "seed": seed,
        "gallery_images": int((labels >= 0).sum()),
        "rows": int(len(labels)),
        "rows_without_label": int((labels < 0).sum()),
        "labels": int((per_label > 0).sum()),
        "singleton_labels": int(len(singles)),
        "singleton_label_images": int(np.isin(labels, singles).sum()),
        "model_fingerprint": (snapshot.manifest.get("model") or {}).get("fingerprint"),
        "seconds": round(time.monotonic() - started, 3),
    }


def write_evaluation(output: str, result: dict) -> str:
    """evaluation.json beside the snapshot's manifest (local or gs://)."""
    path = join(output, result["snapshot"], EVALUATION)
    write_atomically(path, json.dumps(result, indent=2))
    return path


def read_evaluation(folder: str) -> Optional[dict]:
    """A snapshot folder's evaluation.json, or None when evaluate has not run."""
    fs, _, (path,) = fsspec.get_fs_token_paths(join(folder, EVALUATION))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return json.load(handle)


def format_table(result: dict) -> str:
    """The evaluation as the terminal shows it, beside the model card's figures."""
    sample = (f"{result['queries']:,} queries sampled from {result['eligible_queries']:,} "
              f"eligible (seed {result['seed']})" if result["sampled"]
              else f"{result['queries']:,} queries (all eligible images)")
    lines = [
        f"Recall@k of nearest-neighbour retrieval in {result['snapshot']}",
        f"label {result['label']} · {sample} · gallery {result['gallery_images']:,} images "
        f"of {result['labels']:,} labels",
        f"left out: {result['rows_without_label']:,} rows without a label (everywhere); "
        f"{result['singleton_label_images']:,} images of {result['singleton_labels']:,} "
        "labels with a single occurrence (as queries)",
        "",
        f"{'k':>4}  {'recall':>8}  {'model card':>10}",
    ]
    for k, value in result["recall"].items():
        published = result["published"].get(k)
        lines.append(f"{k:>4}  {value:>8.3f}  "
                     f"{'–' if published is None else format(published, '.3f'):>10}")
    lines.append("")
    lines.append("(the model card's figures are for the real fungi_V2 weights on the Danish "
                 "Mycological Society's data; the make-model stand-in's vectors mean nothing)")
    return "\n".join(lines)
