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
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from transforms.common import lease
from transforms.common.files import join, write_atomically
from transforms.common.lease import LeaseRef
from transforms.write.compact import compact, part_files, remove_parts
from transforms.compare.resume import still_resumable

LATEST = "LATEST"
MANIFEST = "manifest.json"
INCOMPLETE = "INCOMPLETE.json"  # a snapshot publishing refused: the counts that differ


def new_snapshot_name(now: Optional[datetime.datetime] = None) -> str:
    """Sortable and unique: runs started in the same second do not collide."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"snapshot-{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{uuid.uuid4().hex[:4]}"


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
                 keep_snapshots: int = 0, leases: Sequence[LeaseRef] = ()):
        self._output = output
        self._snapshot = snapshot
        self._manifest = manifest
        self._schemas = schemas
        self._keep = keep_snapshots
        self._leases = tuple(leases)  # a distributed job's: renewed while this is set up

    def setup(self):
        lease.keep_alive(self._leases)

    def teardown(self):
        lease.let_go(self._leases)

    def process(self, _, embeddings, failures, tally):
        # A job whose output another run took over never moves its LATEST.
        lease.check(self._leases)
        # The side inputs only make this step wait for the writers: the files
        # are what the parts folder holds, retried bundles' parts included.
        yield publish(self._output, self._snapshot, self._manifest, self._schemas, tally,
                      self._keep)



def publish(output: str, snapshot: str, manifest: dict, schemas: dict, tally: dict,
            keep_snapshots: int = 0) -> dict:
    """Compacts the run's parts, checks that the snapshot is whole, writes its
    manifest and only then moves LATEST. A snapshot that is not whole (rows
    unaccounted for, a file that cannot be read back) is not published: the
    previous LATEST stays, `INCOMPLETE.json` says which counts differ, the
    parts stay for a rerun to resume from, and the result says `incomplete`."""
    folder = join(output, snapshot)
    published = _read_json(join(folder, MANIFEST))
    if published is not None:  # an earlier attempt of this step got that far
        return _point_at(output, snapshot, keep_snapshots, published)
    publishing = time.monotonic()
    _remove_compacted(folder)  # what an earlier attempt began: compacting is redone
    _drop_a_part_for_tests(folder)
    seen: set = set()
    try:
        files = {prefix: compact(folder, prefix, schemas[prefix], seen)
                 for prefix in ("embeddings", "failures")}
        if "thumbnails" in schemas:  # keyed apart: one per image, not per row
            files["thumbnails"] = compact(folder, "thumbnails", schemas["thumbnails"])
    except (OSError, ValueError) as err:  # a part that cannot be read (pyarrow's errors
        # are ValueErrors or OSErrors): nothing is published
        return _incomplete(output, snapshot, summarize(tally, [], []), {
            "unreadable": f"{type(err).__name__}: {err}"[:1000]})
    for prefix, written in files.items():
        if not written and prefix != "thumbnails":  # readers globbing `<prefix>-*.parquet` find the schema
            path = join(folder, f"{prefix}-empty.parquet")
            with fsspec.open(path, "wb") as handle:
                pq.write_table(schemas[prefix].empty_table(), handle)
            written.append((path, 0))
    counts = summarize(tally, files["embeddings"], files["failures"])
    differences = _not_whole(counts, files)
    if differences:
        return _incomplete(output, snapshot, counts, differences)
    finished = datetime.datetime.now(datetime.timezone.utc)
    manifest = dict(manifest)
    launched = datetime.datetime.fromisoformat(manifest["launched_at"])
    seconds = (finished - launched).total_seconds()
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
    _remove(join(folder, INCOMPLETE))  # what an earlier attempt of this step found
    write_atomically(join(folder, MANIFEST), json.dumps(manifest, indent=2, default=str))
    return _point_at(output, snapshot, keep_snapshots, manifest)


def _remove(path: str) -> None:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if fs.exists(local):
        fs.rm(local)


def _drop_a_part_for_tests(folder: str) -> None:
    """Tests only (tests/write/test_whole_snapshots.py): with
    GBIF_EMBED_TEST_DROP_PART_BEFORE_PUBLISH=<prefix>, one part of that kind is
    deleted here, as a bug or a storage lifecycle rule could."""
    prefix = os.environ.get("GBIF_EMBED_TEST_DROP_PART_BEFORE_PUBLISH")
    if prefix:
        parts = part_files(folder, prefix)
        if parts:
            _remove(parts[0])


def _not_whole(counts: dict, files: dict) -> dict:
    """What keeps a snapshot from being whole: embedded + failed + skipped
    differing from the export's image rows, and files whose rows, read back
    from their footers, differ from what was written (or cannot be read)."""
    differences: dict = {}
    if counts["accounted"] != counts["export_rows"]:
        differences["rows"] = {
            "export_rows": counts["export_rows"], "embedded": counts["embedded"],
            "failed": counts["failed"], "skipped": counts["skipped"],
            "accounted": counts["accounted"],
            "unaccounted": counts["export_rows"] - counts["accounted"]}
    for prefix, written in files.items():
        for path, rows in written:
            try:
                with fsspec.open(path, "rb") as handle:
                    found = pq.ParquetFile(handle).metadata.num_rows
            except Exception as err:
                differences.setdefault("unreadable_files", []).append(
                    {"path": posixpath.basename(path), "error": f"{type(err).__name__}: {err}"})
                continue
            if found != rows:
                differences.setdefault("files", []).append(
                    {"path": posixpath.basename(path), "counted": rows, "read": found})
    return differences


def _incomplete(output: str, snapshot: str, counts: dict, differences: dict) -> dict:
    """Marks the snapshot incomplete (LATEST is not moved) and says why."""
    folder = join(output, snapshot)
    previous = read_latest(output)
    parts = []
    if "rows" in differences:
        d = differences["rows"]
        parts.append(f"embedded {d['embedded']:,} + failed {d['failed']:,} + skipped "
                     f"{d['skipped']:,} = {d['accounted']:,}, but the export has "
                     f"{d['export_rows']:,} image rows ({d['unaccounted']:,} unaccounted)")
    for entry in differences.get("files", []):
        parts.append(f"{entry['path']} holds {entry['read']:,} rows, not {entry['counted']:,}")
    for entry in differences.get("unreadable_files", []):
        parts.append(f"{entry['path']} cannot be read ({entry['error']})")
    if "unreadable" in differences:
        parts.append(f"a part cannot be read ({differences['unreadable']})")
    message = (f"the snapshot {snapshot} is incomplete and was not published: "
               f"{'; '.join(parts)}. LATEST still names {previous or 'no snapshot'}; "
               f"{join(folder, INCOMPLETE)} has the counts. Run the same command again: "
               f"it resumes from this run's parts and the image store, and publishes only a "
               f"whole snapshot")
    _remove_compacted(folder)  # the parts stay; half a snapshot's files would mislead
    write_atomically(join(folder, INCOMPLETE), json.dumps(
        {"snapshot": snapshot, "message": message, "counts": counts,
         "differences": differences}, indent=2, default=str))
    return {"snapshot": snapshot, "incomplete": message, "counts": counts}


def read_incomplete(output: str, snapshot: str) -> Optional[dict]:
    """What publishing found wrong with a snapshot it did not publish, or None."""
    return _read_json(join(output, snapshot, INCOMPLETE))


def _point_at(output: str, snapshot: str, keep: int, manifest: dict) -> dict:
    """After the manifest: LATEST, pruning, and the parts' removal, each
    safe to do twice, so a retried step finishes what a failed one began."""
    write_atomically(join(output, LATEST), snapshot + "\n")
    if keep > 0:
        prune(output, snapshot, keep)
    remove_parts(join(output, snapshot))
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
                 keep_snapshots: int = 0, leases: Sequence[LeaseRef] = ()):
        super().__init__()
        self._args = (output, snapshot, manifest, schemas, keep_snapshots, tuple(leases))

    def expand(self, written):
        embeddings, failures, tally = written
        return (embeddings.pipeline
                | "Once" >> beam.Create([None])
                | "Publish" >> beam.ParDo(
                    _Publish(*self._args),
                    beam.pvalue.AsList(embeddings),
                    beam.pvalue.AsList(failures),
                    beam.pvalue.AsSingleton(tally)))
