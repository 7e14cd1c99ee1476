"""Keeping the image store lean: a compact URL index, and pruning.

Every fetch appends a URL entry, so without care the index grows with every
run, and so would every lookup that reads it. `compact_url_index` rewrites
the index as one current entry per URL (the latest; for a URL failing for
good, `failed_times` keeps how many times in a row it has, which sets when it
is asked again: `--retry_failed_after` days, doubled each time). The parts it
read are removed only after the compacted part is durable: a crash in
between leaves entries twice, which readers resolve (latest wins).

`prune` removes what no kept snapshot uses: copies of contents that no
snapshot's row names, URL entries that point at them, embedding caches of
models no kept snapshot was made with (and cached rows of contents no
snapshot names), entries of URLs that failed and that no snapshot's failure
rows name any more, and temporary files left by writers that died. It runs
with DuckDB over the parts' `image_sha256` columns; a part is rewritten only
when it holds something to remove. Runs are kept out meanwhile by the output
folder's lease (`pipeline/tools/store.py` takes it).
"""
from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import fsspec
import pyarrow.parquet as pq

from transforms.compare.planning import PERMANENT_FAILURES, _q, _source
from transforms.compare.refresh import snapshot_files
from transforms.compare.resume import MANIFEST, still_resumable
from transforms.store.layout import EMBEDDINGS, IMAGES, OK, URL_SCHEMA, URLS, ImageStore, \
    model_key
from transforms.write.compact import part_files
from transforms.write.parts import write_table_atomically

STRAY_AGE_S = 3600.0  # a temporary file this old belongs to no living writer
COMPACT_AFTER_PARTS = 16  # a run compacts the URL index when it has more parts than this


def _connect():
    import duckdb
    con = duckdb.connect(config={"memory_limit": "1GB", "threads": 2,
                                 "preserve_insertion_order": False})
    con.execute("SET TimeZone = 'UTC'")
    return con


def _register(con, paths: Sequence[str]) -> None:
    for protocol in {p.split("://", 1)[0] for p in paths if "://" in p}:
        con.register_filesystem(fsspec.filesystem(protocol))


def _fs(path: str):
    fs, _, (root,) = fsspec.get_fs_token_paths(path)
    return fs, root


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        fs, root = _fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _size(path: str) -> int:
    fs, root = _fs(path)
    try:
        return int(fs.du(root)) if fs.isdir(root) else int(fs.size(root))
    except FileNotFoundError:
        return 0


def compact_url_index(store: str) -> dict:
    """The URL index → one entry per URL; returns {"parts_before",
    "entries_before", "entries_after"}."""
    image_store = ImageStore(store)
    parts = image_store.parts(image_store.folder(URLS))
    if not parts:
        return {"parts_before": 0, "entries_before": 0, "entries_after": 0}
    con = _connect()
    _register(con, parts)
    before = int(con.execute(f"SELECT count(*) FROM {_source(parts)}").fetchone()[0])
    after = _compact(con, store, parts, "TRUE")
    con.close()
    return {"parts_before": len(parts), "entries_before": before, "entries_after": after}


def _compact(con, store: str, parts: list[str], keep_entry: str) -> int:
    """`parts` of the URL index → one part of the latest entry of each URL that
    `keep_entry` (SQL over the tables of `con`) accepts, with its
    `failed_times`; the parts are removed once it is written. Returns its rows."""
    columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {_source(parts)}").fetchall()}
    times = "failed_times" if "failed_times" in columns else "NULL::INTEGER"
    permanent = ", ".join(_q(r) for r in PERMANENT_FAILURES)
    table = con.execute(f"""
        WITH e AS (SELECT identifier, fetched_from, image_sha256, etag, last_modified,
                          http_status, outcome, fetched_at, {times} AS failed_times
                   FROM {_source(parts)}),
             w AS (SELECT *, max(CASE WHEN outcome = {_q(OK)} THEN fetched_at END)
                             OVER (PARTITION BY identifier) AS last_ok FROM e),
             latest AS (
                SELECT identifier, fetched_from, image_sha256, etag, last_modified, http_status,
                       outcome, fetched_at,
                       CAST(sum(CASE WHEN outcome IN ({permanent})
                                      AND (last_ok IS NULL OR fetched_at > last_ok)
                                 THEN coalesce(failed_times, 1) ELSE 0 END)
                            OVER (PARTITION BY identifier) AS INTEGER) AS failed_times
                FROM w QUALIFY row_number() OVER (PARTITION BY identifier
                                                  ORDER BY fetched_at DESC NULLS LAST) = 1)
        SELECT * FROM latest WHERE {keep_entry} ORDER BY identifier""").fetch_arrow_table()
    table = table.select(URL_SCHEMA.names).cast(URL_SCHEMA)
    # Written first, the old parts removed after: a crash leaves entries twice, never none.
    if table.num_rows:
        write_table_atomically(posixpath.join(ImageStore(store).folder(URLS),
                                              f"compacted-{uuid.uuid4().hex[:16]}.parquet"),
                               table)
    _remove(parts)
    return table.num_rows


def maybe_compact_url_index(store: str) -> Optional[dict]:
    """After a run: compacts the URL index once it has grown past a few parts."""
    image_store = ImageStore(store)
    if len(image_store.parts(image_store.folder(URLS))) <= COMPACT_AFTER_PARTS:
        return None
    return compact_url_index(store)


@dataclass
class PruneReport:
    """What pruning removed (or, in a dry run, would remove)."""
    dry_run: bool
    kept_snapshots: list[str] = field(default_factory=list)
    kept_models: list[str] = field(default_factory=list)
    copies: int = 0
    copy_bytes: int = 0
    url_entries: int = 0
    cache_folders: list[str] = field(default_factory=list)
    cache_folder_bytes: int = 0
    cached_rows: int = 0
    strays: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        return [
            f"kept snapshots: {len(self.kept_snapshots)} "
            f"({', '.join(self.kept_snapshots) or 'none'}); models: "
            f"{', '.join(self.kept_models) or 'none'}",
            f"{verb} {self.copies} copies ({self.copy_bytes / 1e6:.1f} MB of parts rewritten "
            f"or removed) that no kept snapshot uses",
            f"{verb} {self.url_entries} URL index entries (their copies gone, or failures "
            f"no snapshot names any more)",
            f"{verb} {len(self.cache_folders)} embedding caches of models no kept snapshot "
            f"uses ({self.cache_folder_bytes / 1e6:.1f} MB)"
            + "".join(f"\n  {p}" for p in self.cache_folders),
            f"{verb} {self.cached_rows} cached embeddings of contents no kept snapshot uses",
            f"{verb} {len(self.strays)} stray temporary files"
            + "".join(f"\n  {p}" for p in self.strays),
        ]


def _kept(outputs: Sequence[str]) -> tuple[list[str], list[str], list[str], set[str]]:
    """Embedding files, failure files and folder names of every kept snapshot
    (complete ones, and runs that died that a later run could resume), and
    their models' cache keys."""
    embeddings, failures, names, models = [], [], [], set()
    for output in outputs:
        fs, root = _fs(output)
        fs.invalidate_cache()
        if not fs.exists(root):
            continue
        resumable = still_resumable(output)
        for path in sorted(fs.ls(root, detail=False)):
            name = posixpath.basename(path.rstrip("/"))
            if not name.startswith("snapshot-"):
                continue
            folder = posixpath.join(output.rstrip("/"), name)
            if fs.exists(posixpath.join(path, MANIFEST)):
                with fs.open(posixpath.join(path, MANIFEST), "r") as handle:
                    fingerprint = ((json.load(handle).get("model") or {}).get("fingerprint"))
                if fingerprint:
                    models.add(model_key(fingerprint))
                embeddings += snapshot_files(folder, "embeddings")
                failures += snapshot_files(folder, "failures")
                names.append(name)
            elif name in resumable:
                embeddings += part_files(folder, "embeddings")
                failures += part_files(folder, "failures")
                names.append(name)
    return embeddings, failures, names, models


def _strays(roots: Sequence[str], now: float) -> list[str]:
    """Temporary files of atomic writes (`.NAME.tmp-*`, `NAME.tmp-*`) older
    than `STRAY_AGE_S`."""
    found, seen = [], set()
    for root_path in roots:
        fs, root = _fs(root_path)
        if not fs.exists(root):
            continue
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        for path in fs.find(root):
            if ".tmp-" not in posixpath.basename(path):
                continue
            try:
                modified = fs.modified(path).timestamp()
            except (NotImplementedError, FileNotFoundError, AttributeError):
                continue
            if now - modified >= STRAY_AGE_S and path not in seen:
                seen.add(path)
                found.append(path if protocol == "file" else f"{protocol}://{path}")
    return found


def prune(outputs: Sequence[str], store: str, dry_run: bool = False,
          now: Optional[float] = None) -> PruneReport:
    """Removes from `store` what no kept snapshot of `outputs` uses (every
    output the store serves must be named), and stray temporary files."""
    now = time.time() if now is None else now
    image_store = ImageStore(store)
    embeddings, failures, names, models = _kept(outputs)
    report = PruneReport(dry_run, names, sorted(models))
    con = _connect()
    _register(con, [*embeddings, *failures, store])
    if embeddings:
        con.execute(f"""CREATE TEMP TABLE used AS SELECT DISTINCT image_sha256 AS sha
                        FROM {_source(embeddings)} WHERE image_sha256 IS NOT NULL""")
    else:
        con.execute("CREATE TEMP TABLE used (sha VARCHAR)")
    if failures:
        con.execute(f"""CREATE TEMP TABLE failing AS SELECT DISTINCT identifier
                        FROM {_source(failures)} WHERE identifier IS NOT NULL""")
    else:
        con.execute("CREATE TEMP TABLE failing (identifier VARCHAR)")

    # Copies.
    image_parts = image_store.parts(image_store.folder(IMAGES))
    if image_parts:
        counts = con.execute(f"""
            SELECT filename, count(*) FILTER (WHERE image_sha256 NOT IN (SELECT sha FROM used))
            FROM {_source(image_parts, filename=True)} GROUP BY filename""").fetchall()
        for part, unused in counts:
            if not unused:
                continue
            report.copies += int(unused)
            report.copy_bytes += _size(part)
            if not dry_run:
                _keep_rows(con, part, "image_sha256 IN (SELECT sha FROM used)", row_groups=64)

    # URL index: entries whose copy is gone, failures no snapshot names.
    url_parts = image_store.parts(image_store.folder(URLS))
    keep_entry = (f"(outcome = {_q(OK)} AND image_sha256 IN (SELECT sha FROM used)) OR "
                  f"(outcome <> {_q(OK)} AND identifier IN (SELECT identifier FROM failing))")
    if url_parts:
        report.url_entries = int(con.execute(f"""
            SELECT count(*) FROM (SELECT identifier, outcome, image_sha256 FROM {_source(url_parts)}
                                  QUALIFY row_number() OVER (PARTITION BY identifier
                                          ORDER BY fetched_at DESC NULLS LAST) = 1)
            WHERE NOT ({keep_entry})""").fetchone()[0])

    # Embedding caches.
    caches = image_store.folder(EMBEDDINGS)
    fs, root = _fs(caches)
    if fs.exists(root):
        for path in sorted(fs.ls(root, detail=False)):
            key = posixpath.basename(path.rstrip("/"))
            folder = posixpath.join(caches, key)
            if key not in models:
                report.cache_folders.append(folder)
                report.cache_folder_bytes += _size(folder)
                continue
            parts = image_store.parts(folder)
            if not parts:
                continue
            _register(con, parts)
            for part, unused in con.execute(f"""
                    SELECT filename, count(*) FILTER (WHERE image_sha256 NOT IN (SELECT sha FROM used))
                    FROM {_source(parts, filename=True)} GROUP BY filename""").fetchall():
                if unused:
                    report.cached_rows += int(unused)
                    if not dry_run:
                        _keep_rows(con, part, "image_sha256 IN (SELECT sha FROM used)")
    report.strays = _strays([store, *outputs], now)
    if not dry_run:
        if url_parts:
            _compact(con, store, url_parts, keep_entry)
        _remove(report.cache_folders)
        _remove(report.strays)
    con.close()
    return report


def _keep_rows(con, part: str, keep: str, row_groups: int = 0) -> None:
    """Rewrites a part with only the rows `keep` accepts (removes it when none)."""
    table = con.execute(f"SELECT * FROM read_parquet({_q(part)}) WHERE {keep}").fetch_arrow_table()
    with fsspec.open(part, "rb") as handle:
        schema = pq.read_schema(handle)
    if table.num_rows:
        table = table.select(schema.names).cast(schema)
        target = posixpath.join(posixpath.dirname(part),
                                f"pruned-{uuid.uuid4().hex[:16]}.parquet")
        if row_groups:
            from transforms.write.parts import write_table_grouped
            write_table_grouped(target, table, row_groups)
        else:
            write_table_atomically(target, table)
    _remove([part])

