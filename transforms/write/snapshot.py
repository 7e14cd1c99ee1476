"""Publishing a snapshot: manifest first, then the LATEST pointer.

A run writes into a new snapshot folder that nothing points at: its writers
close small parts into `parts/` as the run goes. Only after every row of the
run is written does this step, inside the pipeline (so it behaves the same on
every runner), compact the parts into the snapshot's files (each image once),
write `manifest.json`, and then switch `OUTPUT/LATEST` to the new folder. A
run that dies before that leaves LATEST and the previous snapshot untouched,
and its parts for the next run to resume from.
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
import time
import uuid
from typing import Optional

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from transforms.write.compact import compact, remove_parts
from transforms.compare.resume import still_resumable

LATEST = "LATEST"
MANIFEST = "manifest.json"


def new_snapshot_name(now: Optional[datetime.datetime] = None) -> str:
    """Sortable and unique: runs started in the same second do not collide."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"snapshot-{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{uuid.uuid4().hex[:4]}"


def join(output: str, *parts: str) -> str:
    return posixpath.join(output.rstrip("/"), *parts)


def read_latest(output: str) -> Optional[str]:
    """The current snapshot's folder name, or None when there is none yet."""
    fs, _, (path,) = fsspec.get_fs_token_paths(join(output, LATEST))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        name = handle.read().strip()
    return name or None


def read_manifest(output: str, snapshot: Optional[str] = None) -> dict:
    snapshot = snapshot or read_latest(output)
    if snapshot is None:
        raise FileNotFoundError(f"{output} holds no snapshot (no {LATEST} file)")
    with fsspec.open(join(output, snapshot, MANIFEST), "r") as handle:
        return json.load(handle)


def write_atomically(path: str, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, local)
        return
    with fs.open(local, "w") as handle:  # object stores publish on close
        handle.write(text)


def summarize(tally: dict, embeddings: list, failures: list) -> dict:
    """The manifest's counts: every image row is embedded, failed or skipped."""
    skipped = {k.split(".", 1)[1]: v for k, v in tally.items() if k.startswith("skipped.")}
    failed_by_reason: dict = {}
    for key, value in tally.items():
        if key.startswith("failed."):
            failed_by_reason[key.split(".", 1)[1]] = value
    embedded = sum(rows for _, rows in embeddings)
    failed = sum(rows for _, rows in failures)
    return {
        "export_rows": tally.get("export.rows", 0),
        "embedded": embedded,
        "failed": failed,
        "skipped": sum(skipped.values()),
        "accounted": embedded + failed + sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "failed_by_reason": dict(sorted(failed_by_reason.items())),
        "reused": tally.get("refresh.reused", 0),
        "resumed": tally.get("refresh.resumed", 0),
        "new": tally.get("refresh.new", 0),
        "reembedded": tally.get("refresh.reembedded", 0),
        "removed": tally.get("refresh.removed", 0),
        "retried_failures": tally.get("refresh.retried_failures", 0),
        # What fetching each distinct URL once and embedding each distinct
        # content once saved: rows that took another row's fetch or embedding.
        "distinct_urls_fetched": tally.get("fetch.distinct_urls", 0),
        "rows_sharing_a_fetch": tally.get("dedup.rows_sharing_a_fetch", 0),
        "contents_reused": tally.get("dedup.content_reused", 0),
        "inferences": tally.get("embed.inferred", 0),
        # What the image store answered: rows whose picture came from the store
        # (no request), rows whose embedding came from the model's cache (no
        # inference either), and rows the store had lost (fetched again).
        "from_store": tally.get("store.stored", 0),
        "from_embedding_cache": tally.get("store.cached", 0),
        "store_missing": tally.get("store.missing", 0),
        "stored_bytes": tally.get("fetch.stored_bytes", 0),
        # Images inferred in this run, by the precision they were computed in.
        "inferences_by_precision": {k.split(".", 2)[2]: v for k, v in sorted(tally.items())
                                    if k.startswith("embed.precision.")},
    }


class _Publish(beam.DoFn):
    def __init__(self, output: str, snapshot: str, manifest: dict, schemas: dict,
                 keep_snapshots: int = 0):
        self._output = output
        self._snapshot = snapshot
        self._manifest = manifest
        self._schemas = schemas
        self._keep = keep_snapshots

    def process(self, _, embeddings, failures, tally):
        # The side inputs only make this step wait for the writers: the files
        # are what the parts folder holds, retried bundles' parts included.
        folder = join(self._output, self._snapshot)
        published = _read_json(join(folder, MANIFEST))
        if published is not None:  # an earlier attempt of this step got that far
            yield self._point_at(folder, published)
            return
        publishing = time.monotonic()
        _remove_compacted(folder)  # what an earlier attempt began: compacting is redone
        seen: set = set()
        files = {prefix: compact(folder, prefix, self._schemas[prefix], seen)
                 for prefix in ("embeddings", "failures")}
        if "thumbnails" in self._schemas:  # keyed apart: one per image, not per row
            files["thumbnails"] = compact(folder, "thumbnails", self._schemas["thumbnails"])
        for prefix, written in files.items():
            if not written and prefix != "thumbnails":  # readers globbing `<prefix>-*.parquet` find the schema
                path = join(folder, f"{prefix}-empty.parquet")
                with fsspec.open(path, "wb") as handle:
                    pq.write_table(self._schemas[prefix].empty_table(), handle)
                written.append((path, 0))
        finished = datetime.datetime.now(datetime.timezone.utc)
        manifest = dict(self._manifest)
        launched = datetime.datetime.fromisoformat(manifest["launched_at"])
        seconds = (finished - launched).total_seconds()
        counts = summarize(tally, files["embeddings"], files["failures"])
        processed = (counts["embedded"] - counts["reused"] - counts["resumed"] +
                     counts["failed"])
        manifest.update({
            "finished_at": finished.isoformat(),
            "counts": counts,
            "files": {prefix: [{"path": posixpath.basename(p), "rows": n}
                               for p, n in sorted(written)]
                      for prefix, written in files.items()},
            "fetch": {k: v for k, v in tally.items() if k.startswith("fetch.")},
            "timings": {"seconds": round(seconds, 3),
                        "publish_s": round(time.monotonic() - publishing, 3),
                        "images_per_second": round(processed / seconds, 3) if seconds else None},
            "tally": tally,
        })
        write_atomically(join(folder, MANIFEST), json.dumps(manifest, indent=2, default=str))
        yield self._point_at(folder, manifest)

    def _point_at(self, folder: str, manifest: dict) -> dict:
        """After the manifest: LATEST, pruning, and the parts' removal, each
        safe to do twice, so a retried step finishes what a failed one began."""
        write_atomically(join(self._output, LATEST), self._snapshot + "\n")
        if self._keep > 0:
            prune(self._output, self._snapshot, self._keep)
        remove_parts(folder)
        return manifest


def _read_json(path: str) -> Optional[dict]:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    fs.invalidate_cache()
    if not fs.exists(local):
        return None
    with fs.open(local, "r") as handle:
        return json.load(handle)


def _remove_compacted(folder: str) -> None:
    """Compacted files a failed attempt of publishing left (parts stay)."""
    fs, _, (root,) = fsspec.get_fs_token_paths(folder)
    for prefix in ("embeddings", "failures", "thumbnails"):
        for path in fs.glob(posixpath.join(root, f"{prefix}-*.parquet")):
            fs.rm(path)


def prune(output: str, current: str, keep: int) -> list[str]:
    """Deletes snapshots older than the `keep` newest complete ones, and
    folders of runs that died before publishing, unless a later run could
    still resume them (`transforms/compare/resume.py`: another model's, say). Newer
    folders may belong to runs still going, so they are left alone."""
    fs, _, (root,) = fsspec.get_fs_token_paths(output)
    fs.invalidate_cache()
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    older = [n for n in names if n.startswith("snapshot-") and n < current]
    complete = [n for n in older if fs.exists(posixpath.join(root, n, MANIFEST))]
    kept = set(complete[len(complete) - (keep - 1):]) if keep > 1 else set()
    kept |= still_resumable(output)
    removed = [n for n in older if n not in kept]
    for name in removed:
        fs.rm(posixpath.join(root, name), recursive=True)
    return removed


class PublishSnapshot(beam.PTransform):
    """Runs once, after both writers finished: the side inputs wait for them."""

    def __init__(self, output: str, snapshot: str, manifest: dict, schemas: dict,
                 keep_snapshots: int = 0):
        super().__init__()
        self._args = (output, snapshot, manifest, schemas, keep_snapshots)

    def expand(self, written):
        embeddings, failures, tally = written
        return (embeddings.pipeline
                | "Once" >> beam.Create([None])
                | "Publish" >> beam.ParDo(
                    _Publish(*self._args),
                    beam.pvalue.AsList(embeddings),
                    beam.pvalue.AsList(failures),
                    beam.pvalue.AsSingleton(tally)))
