"""Retrieval over a snapshot: exact cosine nearest neighbours, and `gbif-embed query`.

The model exists to find similar mushroom pictures, so this module answers
"which stored images look most like this one?". Search is exact (every
gallery row is scored), streamed from the Parquet files in blocks and scored
in query × gallery tiles, so memory depends on the block sizes, never on the
size of the snapshot. `evaluate` and the run report use the same search.

A query picture goes through exactly what the pipeline did to the stored
ones: the same Fetcher (address guard, limits, mirrors), the same decoder
and resize mode, and the same model, which must be the one whose
fingerprint the snapshot's rows carry; otherwise the similarities would
compare vectors of different spaces.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms.fetch.config import (DEFAULT_USER_AGENT, FetchConfig, mirrored, parse_mirrors,
                                     source_url)
from transforms.fetch.fetcher import Fetcher
from transforms.common.files import join
from transforms.write.snapshot import read_latest, read_manifest

GBIF_OCCURRENCE_URL = "https://www.gbif.org/occurrence/{gbif_id}"
QUERY_BLOCK = 1024      # queries scored at once
GALLERY_BLOCK = 8192    # gallery rows read and scored at once
# Columns a result row carries: enough to show, credit and link the picture.
RESULT_COLUMNS = ("coreID", "gbifID", "occurrenceID", "scientificName", "taxonKey", "identifier", "creator",
                  "rightsHolder", "license", "image_sha256")
# FetchConfig fields that are run options of the same name.
_FETCH_OPTIONS = ("fetch_concurrency", "per_host_concurrency", "per_host_rate",
                  "max_attempts", "connect_timeout", "read_timeout", "fetch_timeout",
                  "max_redirects", "max_image_bytes", "image_source")


class QueryError(ValueError):
    """The query cannot be answered; says why and what to do."""


# ---------------------------------------------------------------- the snapshot

@dataclass(frozen=True)
class Snapshot:
    """The current snapshot of an output folder: where it is and what it holds."""
    output: str
    name: str
    manifest: dict
    files: tuple[str, ...]   # embeddings-*.parquet, in a fixed order

    @property
    def folder(self) -> str:
        return join(self.output, self.name)


def open_snapshot(output: str, name: Optional[str] = None) -> Snapshot:
    """The snapshot LATEST names (or `name`), with its embedding files.

    Files come from the manifest, which lists exactly what the run
    published; a folder without that list is globbed instead.
    """
    name = name or read_latest(output)
    if name is None:
        raise QueryError(f"{output} holds no snapshot (no LATEST file); run `gbif-embed run` "
                         "first")
    manifest = read_manifest(output, name)
    folder = join(output, name)
    listed = (manifest.get("files") or {}).get("embeddings")
    if listed:
        files = tuple(join(folder, entry["path"]) for entry in listed)
    else:
        fs, _, (root,) = fsspec.get_fs_token_paths(folder)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        files = tuple(prefix + p for p in sorted(fs.glob(f"{root}/embeddings-*.parquet")))
    return Snapshot(output, name, manifest, files)


def iter_batches(files: Sequence[str], columns: Sequence[str],
                 block_rows: int = GALLERY_BLOCK) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first global row number, batch) over every file, in gallery order.

    Everything that reads a snapshot goes through here, so row numbers mean
    the same thing to the search, to `rows_at` and to `evaluate`.
    """
    start = 0
    for path in files:
        with fsspec.open(path, "rb") as handle:
            # pre_buffer would read whole files ahead: streaming keeps memory to a block.
            parquet = pq.ParquetFile(handle, pre_buffer=False)
            for batch in parquet.iter_batches(batch_size=block_rows, columns=list(columns)):
                yield start, batch
                start += batch.num_rows


@dataclass
class Block:
    """Consecutive gallery rows: their first global row number, occurrence ids
    (`occurrence_ids`) and unit vectors."""
    start: int
    gbif_ids: np.ndarray   # [n] int64: one number per occurrence
    vectors: np.ndarray    # [n, dim] float32, L2-normalized


def id_columns(files: Sequence[str]) -> list[str]:
    """The columns that name a row's occurrence: coreID (and gbifID), or only
    gbifID in snapshots written before core ids were kept."""
    if not files:
        return ["gbifID"]
    with fsspec.open(files[0], "rb") as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    return ["coreID", "gbifID"] if "coreID" in names else ["gbifID"]


def occurrence_number(core_id: Optional[str]) -> int:
    """An int64 naming an occurrence by its core id (any archive's: a gbifID or
    a publisher's occurrenceID), so that search compares numbers."""
    if not core_id:
        return -1
    digest = hashlib.blake2b(str(core_id).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def occurrence_ids(batch: pa.RecordBatch) -> np.ndarray:
    """One int64 per row naming its occurrence (rows of one occurrence share it)."""
    if "coreID" in batch.schema.names:
        core = batch.column("coreID").to_pylist()
        gbif = batch.column("gbifID").to_pylist() if "gbifID" in batch.schema.names else \
            [None] * len(core)
        return np.array([occurrence_number(c or (None if g is None else str(g)))
                         for c, g in zip(core, gbif)], np.int64)
    gbif = batch.column("gbifID").to_pylist()
    return np.array([occurrence_number(None if g is None else str(g)) for g in gbif], np.int64)


def iter_blocks(files: Sequence[str], block_rows: int = GALLERY_BLOCK) -> Iterator[Block]:
    """The gallery, streamed block by block."""
    for start, batch in iter_batches(files, [*id_columns(files), "embedding"], block_rows):
        yield Block(start, occurrence_ids(batch),
                    normalize(embedding_matrix(batch.column("embedding"))))


def embedding_matrix(column: pa.Array) -> np.ndarray:
    """A fixed_size_list<float32> column as an [n, dim] array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit rows, so that a dot product is the cosine; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


def vectors_at(files: Sequence[str], rows: Sequence[int],
               block_rows: int = GALLERY_BLOCK) -> np.ndarray:
    """The unit vectors of some gallery rows, in the order asked for."""
    wanted = np.asarray(rows, dtype=np.int64)
    order = np.argsort(wanted, kind="stable")
    sorted_rows = wanted[order]
    out: Optional[np.ndarray] = None
    for block in iter_blocks(files, block_rows):
        if out is None:
            out = np.zeros((len(wanted), block.vectors.shape[1]), np.float32)
        lo, hi = np.searchsorted(sorted_rows, [block.start, block.start + len(block.gbif_ids)])
        out[order[lo:hi]] = block.vectors[sorted_rows[lo:hi] - block.start]
    if out is None:
        raise QueryError("the snapshot holds no embeddings")
    return out


def rows_at(files: Sequence[str], rows: Sequence[int],
            columns: Sequence[str] = RESULT_COLUMNS) -> list[dict]:
    """Some gallery rows as dicts, in the order asked for (for the few a search returns)."""
    wanted = {int(r): i for i, r in enumerate(rows)}
    out: list[Optional[dict]] = [None] * len(wanted)
    if not wanted:
        return []
    for start, batch in iter_batches(files, columns):
        inside = [r for r in wanted if start <= r < start + batch.num_rows]
        if inside:
            picked = batch.take(pa.array([r - start for r in inside], pa.int64())).to_pylist()
            for r, row in zip(inside, picked):
                out[wanted[r]] = row
    return [row for row in out if row is not None]


# ---------------------------------------------------------------- the search

@dataclass
class Neighbours:
    """Per query, the k best gallery rows, best first (row -1 / -inf: none left)."""
    rows: np.ndarray     # [queries, k] int64
    scores: np.ndarray   # [queries, k] float32 cosine similarity


def search(queries: np.ndarray, blocks: Iterable[Block], k: int, *,
           query_ids: Optional[np.ndarray] = None,
           gallery_mask: Optional[np.ndarray] = None,
           query_block: int = QUERY_BLOCK) -> Neighbours:
    """Exact top-k by cosine similarity, one gallery block at a time.

    `queries` must be unit rows. Gallery rows with the query's own gbifID
    (`query_ids`) never count as its neighbours: pictures of the same
    occurrence are the same mushroom, which would make retrieval look
    better than it is. `gallery_mask` (global row → bool) leaves rows out.
    Ties go to the lower row number, so block sizes never change the answer.
    """
    queries = np.asarray(queries, dtype=np.float32)
    n = len(queries)
    best_rows = np.full((n, k), -1, dtype=np.int64)
    best_scores = np.full((n, k), -np.inf, dtype=np.float32)
    for block in blocks:
        rows = np.arange(block.start, block.start + len(block.gbif_ids), dtype=np.int64)
        keep = gallery_mask[rows] if gallery_mask is not None else None
        for lo in range(0, n, query_block):
            hi = min(n, lo + query_block)
            scores = queries[lo:hi] @ block.vectors.T
            if keep is not None:
                scores[:, ~keep] = -np.inf
            if query_ids is not None:
                scores[query_ids[lo:hi, None] == block.gbif_ids[None, :]] = -np.inf
            best_rows[lo:hi], best_scores[lo:hi] = _merge(
                best_rows[lo:hi], best_scores[lo:hi], rows, scores, k)
    return Neighbours(best_rows, best_scores)


def _merge(best_rows: np.ndarray, best_scores: np.ndarray, rows: np.ndarray,
           scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the current best and a new block, ordered by (-score, row)."""
    block_rows, block_scores = _block_candidates(rows, scores, k)
    all_scores = np.concatenate([best_scores, block_scores], axis=1)
    all_rows = np.concatenate([best_rows, block_rows], axis=1)
    # -inf entries sort last whatever their row; among equal scores the lower row wins.
    tie_rows = np.where(np.isfinite(all_scores), all_rows, np.iinfo(np.int64).max)
    order = np.lexsort((tie_rows, -all_scores), axis=1)[:, :k]
    merged_scores = np.take_along_axis(all_scores, order, axis=1)
    merged_rows = np.where(np.isfinite(merged_scores),
                           np.take_along_axis(all_rows, order, axis=1), -1)
    return merged_rows, merged_scores


def _block_candidates(rows: np.ndarray, scores: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the block's rows that can still be in its top k: those scoring at
    least its k-th best score (ties included, so the row-number tie-break stays
    exact). Linear in the block, unlike sorting it; padded with -inf."""
    if scores.shape[1] <= k:
        return np.broadcast_to(rows, scores.shape), scores
    kth = np.partition(scores, -k, axis=1)[:, -k:-k + 1 or None]
    query, column = np.nonzero((scores >= kth) & np.isfinite(scores))  # row-major order
    counts = np.bincount(query, minlength=len(scores))
    slot = np.arange(len(query)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = max(1, int(counts.max(initial=0)))
    picked_rows = np.full((len(scores), width), -1, dtype=np.int64)
    picked = np.full((len(scores), width), -np.inf, dtype=np.float32)
    picked_rows[query, slot] = rows[column]
    picked[query, slot] = scores[query, column]
    return picked_rows, picked


# ---------------------------------------------------------------- the query picture

def run_fetch_config(manifest: dict, allow_private_networks: Optional[str] = None) -> FetchConfig:
    """The fetch settings the run used (from its manifest), so that a query or
    a thumbnail is fetched the way the pipeline fetched. `allow_private_networks`
    replaces the run's value when given: opening networks is the caller's call."""
    options = manifest.get("options") or {}
    kwargs = {name: options[name] for name in _FETCH_OPTIONS if options.get(name) is not None}
    kwargs["user_agent"] = options.get("user_agent") or DEFAULT_USER_AGENT
    kwargs["mirrors"] = parse_mirrors(options.get("mirror") or "")
    kwargs["allow_private_networks"] = (options.get("allow_private_networks") or ""
                                        if allow_private_networks is None
                                        else allow_private_networks)
    return FetchConfig(**kwargs)


def image_url(row: dict, config: FetchConfig) -> str:
    """The URL the pipeline fetched for a stored row (image source and mirrors applied)."""
    return mirrored(source_url(row, config.image_source), config.mirrors)


def read_query_image(source: str, config: FetchConfig) -> bytes:
    """A query picture's bytes: URLs through the pipeline's Fetcher, paths from disk."""
    if "://" not in source:
        try:
            with open(source, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise QueryError(f"cannot read {source}: {err.strerror or err}") from err
    fetcher = Fetcher(config)
    try:
        result = fetcher.fetch(mirrored(source, config.mirrors))
    finally:
        fetcher.close()
    if not result.ok:
        hint = (" (pass --allow_private_networks CIDRS to fetch from a private or "
                "loopback address)" if result.reason == "blocked_address" else "")
        raise QueryError(f"cannot fetch {source}: {result.reason}: {result.detail}{hint}")
    return result.content or b""


def snapshot_fingerprints(snapshot: Snapshot) -> set[str]:
    """The model fingerprints the snapshot's rows carry (one, normally)."""
    found: set[str] = set()
    for _, batch in iter_batches(snapshot.files, ["model_fingerprint"]):
        found.update(v for v in pc.unique(batch.column("model_fingerprint")).to_pylist() if v)
    return found


def _run_spec(snapshot: Snapshot):
    """The model's input options as the run recorded them (the legacy contract
    for snapshots made before specs were recorded)."""
    from pipeline.model_check import spec_of_manifest
    return spec_of_manifest(snapshot.manifest.get("model") or {})


def check_model(snapshot: Snapshot, model_uri: str) -> str:
    """The model's fingerprint; refuses a model whose vectors the rows are not from."""
    from transforms.embed.model_files import fingerprint, localize
    from transforms.embed.spec import embedder_fingerprint
    try:
        local = localize(model_uri)
    except Exception as err:
        raise QueryError(f"cannot use the model {model_uri}: {err}") from err
    if not os.path.exists(local) or (os.path.isdir(local) and not os.listdir(local)):
        raise QueryError(f"the model {model_uri} does not exist or is empty; pass "
                         "--model PATH with the model this snapshot was made with")
    resize = (snapshot.manifest.get("options") or {}).get("resize") or "squash"
    found = embedder_fingerprint(fingerprint(local), _run_spec(snapshot), resize)
    stored = snapshot_fingerprints(snapshot)
    if stored != {found}:
        raise QueryError(
            f"the model {model_uri} has fingerprint {found}, but the embeddings of "
            f"{snapshot.name} were made with {', '.join(sorted(stored)) or 'no model'}; "
            "similarities between vectors of different models mean nothing. Pass "
            "--model with the snapshot's model (its manifest names "
            f"{snapshot.manifest.get('model', {}).get('uri')}).")
    return found


def embed_image(content: bytes, snapshot: Snapshot, model_uri: str) -> np.ndarray:
    """Bytes → unit embedding, by the pipeline's decoder, resize mode and model."""
    from transforms.embed.decode import DecodeError, decode_image
    from transforms.embed.models import load
    from transforms.embed.precision import configure_tensorflow, cpu_supports_bfloat16
    options = snapshot.manifest.get("options") or {}
    spec = _run_spec(snapshot)
    try:
        pixels, _, _ = decode_image(content, options.get("resize") or "squash",
                                    spec.image_size,
                                    max_pixels=options.get("max_image_pixels") or 100_000_000)
    except DecodeError as err:
        raise QueryError(f"the query picture cannot be used: {err.reason}: {err.detail}") \
            from err
    precision = options.get("precision") or "float32"
    if precision == "bfloat16" and not cpu_supports_bfloat16():
        precision = "float32"
    if spec.format != "onnx":
        configure_tensorflow(0, precision)
    model = load(model_uri, spec.normalize,
                 spec.image_size if spec.size_from != "model" else 0)
    return normalize(model.embed(pixels[None]))[0]


# ---------------------------------------------------------------- the command

@dataclass
class QueryResult:
    """What `gbif-embed query` found: the query's description and its neighbours."""
    snapshot: Snapshot
    description: str                  # e.g. "image photo.jpg" or "gbifID 123 (first image)"
    query_row: Optional[dict]         # the stored row, for --gbif_id
    query_content: Optional[bytes]    # the picture's bytes, for --image
    neighbours: list[dict]            # RESULT_COLUMNS + rank, similarity, link
    excluded_gbif_id: Optional[str] = None  # the query's occurrence, as shown
    source: Optional[str] = None      # the --image path or URL


def stored_query(snapshot: Snapshot, gbif_id: Optional[int] = None,
                 core_id: Optional[str] = None) -> tuple[int, dict]:
    """The row of an occurrence's first image (smallest identifier: stable
    between runs), named by its gbifID or by its archive's core id."""
    wanted = occurrence_number(core_id if core_id is not None else str(gbif_id))
    matches: list[tuple[str, int]] = []
    for start, batch in iter_batches(snapshot.files,
                                     [*id_columns(snapshot.files), "identifier"]):
        if gbif_id is not None and "gbifID" in batch.schema.names:
            hits = np.flatnonzero(batch.column("gbifID").fill_null(-1)
                                  .to_numpy(zero_copy_only=False) == gbif_id)
        else:
            hits = np.flatnonzero(occurrence_ids(batch) == wanted)
        identifiers = batch.column("identifier")
        matches += [(identifiers[int(i)].as_py() or "", start + int(i)) for i in hits]
    if not matches:
        named = f"gbifID {gbif_id}" if core_id is None else f"core id {core_id}"
        raise QueryError(f"{named} has no embedding in {snapshot.name}")
    row = min(matches)[1]
    return row, rows_at(snapshot.files, [row])[0]


def occurrence_of(row: dict) -> str:
    """How a row's occurrence is shown: its gbifID where it has one, else its core id."""
    return str(row["gbifID"]) if row.get("gbifID") is not None else str(row.get("coreID"))


def query(output: str, *, image: Optional[str] = None, gbif_id: Optional[int] = None,
          core_id: Optional[str] = None, k: int = 10, model: Optional[str] = None,
          allow_private_networks: str = "") -> QueryResult:
    """The k stored images most similar to a picture or to an occurrence's image."""
    if sum(x is not None for x in (image, gbif_id, core_id)) != 1:
        raise QueryError("give exactly one of --image PATH_OR_URL, --gbif_id N and "
                         "--core_id ID")
    if k < 1:
        raise QueryError("--k must be at least 1")
    snapshot = open_snapshot(output)
    if image is not None:
        model_uri = model or (snapshot.manifest.get("model") or {}).get("uri")
        if not model_uri:
            raise QueryError("the snapshot's manifest names no model; pass --model PATH")
        check_model(snapshot, model_uri)
        content = read_query_image(image, run_fetch_config(snapshot.manifest,
                                                           allow_private_networks))
        vector, exclude, query_row = embed_image(content, snapshot, model_uri), None, None
        description = f"image {image}"
    else:
        row, query_row = stored_query(snapshot, gbif_id, core_id)
        exclude = occurrence_number(query_row.get("coreID") or str(query_row["gbifID"]))
        vector, content = vectors_at(snapshot.files, [row])[0], None
        named = f"gbifID {gbif_id}" if gbif_id is not None else f"core id {core_id}"
        description = f"{named} ({query_row['identifier']})"
    found = search(vector[None], iter_blocks(snapshot.files), k,
                   query_ids=None if exclude is None else np.array([exclude], np.int64))
    return QueryResult(snapshot, description, query_row, content,
                       neighbour_rows(snapshot, found.rows[0], found.scores[0]),
                       None if query_row is None else occurrence_of(query_row), image)


def neighbour_rows(snapshot: Snapshot, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Search results as rows to show: stored columns, rank, similarity, GBIF link."""
    valid = [(int(r), float(s)) for r, s in zip(rows, scores) if r >= 0]
    stored = rows_at(snapshot.files, [r for r, _ in valid])
    return [dict(row, rank=rank, similarity=score, link=occurrence_link(row))
            for rank, (row, (_, score)) in enumerate(zip(stored, valid), start=1)]


def occurrence_link(row) -> str:
    """GBIF's page of the row's occurrence; a publisher's id when GBIF has not
    indexed it (a dataset's own archive): that id when it is a web address."""
    gbif_id = row.get("gbifID") if isinstance(row, dict) else row
    if gbif_id is not None:
        return GBIF_OCCURRENCE_URL.format(gbif_id=gbif_id)
    own = (row.get("occurrenceID") or row.get("coreID") or "") if isinstance(row, dict) else ""
    return own if own.startswith(("http://", "https://")) else ""


def format_results(result: QueryResult) -> str:
    """The neighbours as a table for the terminal."""
    lines = [f"{len(result.neighbours)} nearest to {result.description} in "
             f"{result.snapshot.name} (cosine similarity)"]
    if result.excluded_gbif_id is not None:
        lines.append(f"(other images of occurrence {result.excluded_gbif_id} are left out)")
    width = max([len(_clip(r.get("scientificName") or "–")) for r in result.neighbours] + [14])
    ids = max([len(occurrence_of(r)) for r in result.neighbours] + [12])
    lines.append(f"{'#':>3}  {'similarity':>10}  {'occurrence':>{ids}}  "
                 f"{'scientificName':<{width}}  occurrence page")
    for row in result.neighbours:
        lines.append(f"{row['rank']:>3}  {row['similarity']:>10.4f}  "
                     f"{occurrence_of(row):>{ids}}  "
                     f"{_clip(row.get('scientificName') or '–'):<{width}}  {row['link'] or '–'}")
    return "\n".join(lines)


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
