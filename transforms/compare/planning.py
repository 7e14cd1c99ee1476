"""Deciding what a run must do, on files, before the Beam graph is built.

A weekly refresh of a dataset that barely changed must cost in proportion to
the change, not to everything ever seen. So the launcher decides, with DuckDB
over Parquet (streamed and spilled to disk, never one Python object per
row), which of the export's image rows:

- were finished by a run that died (`resumed`) or embedded by the previous
  snapshot with this model (`reused`): their rows are written into the new
  snapshot's parts here, the embedding bytes copied column to column;
- have a content this model embedded before in any run (the store's
  embedding cache): written here too, no inference;
- have a picture in the image store: handed to Beam to embed from the copy;
- answered 404, 410 or "not a picture" lately (`--retry_failed_after`,
  doubling): a failure row written here, no request;
- must be fetched: handed to Beam.

Only the last two groups enter the Beam graph, as Parquet files of rows
(`transforms/compare/planned.py`, `transforms/store/lookup.py`), so an
unchanged refresh sends no request, runs no inference and moves no row
through Beam. A model change reads only the previous snapshot's keys and
model column, never its embeddings. Every index is read once: the previous
snapshot's keys, its failures' keys, the URL index (only the entries of URLs
that need work, none on an unchanged refresh), and the `image_sha256` column
of the store's pictures and of the model's cache. The counts go to the
manifest's tally exactly as the Beam stages' counts do, so every row stays
accounted for.

The same planning runs on every runner: on Dataflow or Flink the launcher
reads gs:// through fsspec (`register_filesystem`), which reads only the
columns it needs; the join is of keys (~100 bytes a row), which one machine
does in seconds for millions of rows, so a distributed join would add a
shuffle without saving anything.
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import fsspec
import pyarrow as pa

from transforms.common.records import TASK_FIELDS
from transforms.compare.refresh import IMAGE_COLUMNS, snapshot_files
from transforms.compare.staging import stage_export
from transforms.read.rows import LINE_CAP
from transforms.store.copies import COPY_KEY, COPY_PARAMETERS
from transforms.store.layout import COPY_METADATA, IMAGES, OK, URLS, ImageStore
from transforms.write.compact import part_files
from transforms.write.parts import FAILURE_SCHEMA, embedding_schema, parts_folder, \
    write_table_atomically

PLAN = "plan"  # the plan's files, under the snapshot's parts/ (removed at publishing)
# What a host says that does not change by asking again next week.
PERMANENT_FAILURES = ("http_404", "http_410", "not_an_image")
ROWS_PER_PART = 10_000  # rows written here per part (compaction reads one part at a time)
MEMORY_LIMIT = "1GB"  # DuckDB spills to disk beyond this


@dataclass
class Plan:
    """What the Beam graph must still do, and what planning already did."""
    folder: str
    fetch: list[str] = field(default_factory=list)       # task files to fetch
    revalidate: list[str] = field(default_factory=list)  # tasks with the previous row
    stored: list[str] = field(default_factory=list)      # (part, sha, task) files
    stored_parts: list[str] = field(default_factory=list)
    looked_up: bool = False
    tally: dict = field(default_factory=dict)
    seconds: float = 0.0


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _files(paths: Sequence[str]) -> str:
    return "[" + ", ".join(_q(p) for p in paths) + "]"


def _source(paths: Sequence[str], filename: bool = False) -> str:
    extra = ", filename=true" if filename else ""
    return f"read_parquet({_files(paths)}, union_by_name=true{extra})"


def _key(columns: set[str], alias: str = "") -> str:
    """SQL for `key_of`'s core id: coreID, else gbifID as text (older rows)."""
    a = f"{alias}." if alias else ""
    parts = []
    if "coreID" in columns:
        parts.append(f"nullif({a}coreID, '')")
    if "gbifID" in columns:
        parts.append(f"CAST({a}gbifID AS VARCHAR)")
    return f"coalesce({', '.join(parts + [repr('')])})"


class _Planner:
    def __init__(self, folder: str, fingerprint: str, scratch: str):
        import duckdb
        self.folder = folder
        self.out = posixpath.join(parts_folder(folder), PLAN)
        self.fingerprint = fingerprint
        self.con = duckdb.connect(config={
            "memory_limit": MEMORY_LIMIT, "threads": 2, "temp_directory": scratch,
            "preserve_insertion_order": False})
        self.con.execute("SET TimeZone = 'UTC'")
        self.tally: dict = {}
        self._registered: set[str] = set()

    def register(self, paths: Sequence[str]) -> None:
        """Lets DuckDB read gs:// (any fsspec protocol) through fsspec."""
        for path in paths:
            if "://" in path:
                protocol = path.split("://", 1)[0]
                if protocol not in self._registered:
                    self.con.register_filesystem(fsspec.filesystem(protocol))
                    self._registered.add(protocol)

    def columns(self, paths: Sequence[str]) -> set[str]:
        rows = self.con.execute(f"DESCRIBE SELECT * FROM {_source(paths)}").fetchall()
        return {row[0] for row in rows}

    def count(self, sql: str) -> int:
        return int(self.con.execute(sql).fetchone()[0] or 0)

    def add(self, key: str, n: int) -> None:
        if n:
            self.tally[key] = self.tally.get(key, 0) + n

    def write(self, sql: str, prefix: str, schema: Optional[pa.Schema], folder: str,
              rows_per_part: int = 0) -> list[tuple[str, int]]:
        """The query's rows → parts `<folder>/<prefix>-<id>.parquet` of the
        schema (None: the query's own), streamed a record batch at a time, so
        at most one part is held in memory."""
        rows_per_part = rows_per_part or ROWS_PER_PART
        reader = self.con.execute(sql).fetch_record_batch(min(8192, rows_per_part))
        written, pending, rows = [], [], 0

        def close():
            nonlocal pending, rows
            if pending:
                table = pa.Table.from_batches(pending)
                if schema is not None:
                    table = table.select(schema.names).cast(schema)
                path = posixpath.join(folder, f"{prefix}-{uuid.uuid4().hex[:16]}.parquet")
                write_table_atomically(path, table)
                written.append((path, table.num_rows))
            pending, rows = [], 0

        for batch in reader:
            if batch.num_rows:
                pending.append(batch)
                rows += batch.num_rows
            if rows >= rows_per_part:
                close()
        close()
        return written


def plan_run(*, export: str, folder: str, fingerprint: str, store: str,
             previous_folder: Optional[str] = None, resume_folders: Sequence[str] = (),
             revalidate: bool = False, use_cache: bool = True, look_up: bool = True,
             retry_failed_after: float = 28.0, max_images: int = 0,
             width: int = 256, line_cap: int = LINE_CAP,
             now: Optional[datetime.datetime] = None) -> Plan:
    """Decides every image row of `export` for a run writing into `folder`
    (a snapshot folder); writes what it can finish into the folder's parts
    and returns what the Beam graph must do."""
    started = time.monotonic()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    scratch = tempfile.mkdtemp(prefix="gbif-embed-plan-")
    try:
        planner = _Planner(folder, fingerprint, scratch)
        staged = stage_export(export, os.path.join(scratch, "export"),
                              parts_folder(folder), max_images, line_cap)
        planner.tally.update(staged.tally)
        plan = Plan(folder=planner.out)
        _tasks(planner, staged.media, staged.occurrences)
        previous = _previous(planner, previous_folder)
        _decide(planner, previous, resume_folders, revalidate)
        schema = embedding_schema(width)
        _write_reused(planner, previous, resume_folders, schema)
        plan.revalidate = _write_revalidate(planner, previous)
        image_store = ImageStore(store)
        image_store.record_copies(COPY_KEY, COPY_PARAMETERS)
        url_parts = image_store.parts(image_store.folder(URLS)) if look_up else []
        todo = planner.count("SELECT count(*) FROM decided WHERE decision IN "
                             "('new', 'retried', 'reembedded')")
        if url_parts:
            plan.looked_up = True
            planner.add("store.revalidated", planner.count(
                "SELECT count(*) FROM decided WHERE decision = 'revalidated'"))
        if url_parts and todo:
            cache_parts = _look_up(planner, image_store, url_parts, use_cache,
                                   retry_failed_after, now)
            _write_cached(planner, cache_parts, schema, now)
            _write_remembered(planner, retry_failed_after)
            plan.stored, plan.stored_parts = _write_stored(planner)
            fetch_sql = "SELECT * FROM looked WHERE route IN ('fetch', 'missing')"
        else:
            fetch_sql = ("SELECT * FROM decided WHERE decision IN "
                         "('new', 'retried', 'reembedded')")
        plan.fetch = [path for path, _ in planner.write(
            f"SELECT {', '.join(TASK_FIELDS)} FROM ({fetch_sql}) ORDER BY identifier",
            "fetch", TASK_SCHEMA, planner.out, rows_per_part=100_000)]
        planner.tally["time.read_s"] = planner.tally.get("time.read_s", 0) + (
            time.monotonic() - started)
        plan.tally = planner.tally
        plan.seconds = time.monotonic() - started
        planner.con.close()
        return plan
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tasks(planner: _Planner, media: str, occurrences: str) -> None:
    """Image tasks as `JoinOccurrences` makes them: each (coreID, identifier)
    once, with its occurrence's fields (the first occurrence row of its id)."""
    con = planner.con
    con.execute(f"""
        CREATE TEMP TABLE tasks AS
        WITH m AS (SELECT * FROM read_parquet({_q(media)})
                   QUALIFY row_number() OVER (PARTITION BY coreID, identifier ORDER BY seq) = 1),
             o AS (SELECT * FROM read_parquet({_q(occurrences)})
                   QUALIFY row_number() OVER (PARTITION BY coreID ORDER BY seq) = 1)
        SELECT m.coreID, coalesce(m.gbifID, o.gbifID) AS gbifID, m.identifier,
               o.occurrenceID, o.datasetKey, o.taxonKey, o.scientificName,
               coalesce(nullif(m.license, ''), o.license) AS license,
               coalesce(nullif(m.rightsHolder, ''), o.rightsHolder) AS rightsHolder,
               m.creator,
               coalesce(nullif(m.coreID, ''), CAST(coalesce(m.gbifID, o.gbifID) AS VARCHAR), '')
                   AS kc,
               o.seq IS NULL AS orphan
        FROM m LEFT JOIN o ON m.coreID IS NOT DISTINCT FROM o.coreID""")
    media_rows = planner.count(f"SELECT count(*) FROM read_parquet({_q(media)})")
    tasks = planner.count("SELECT count(*) FROM tasks")
    planner.add("skipped.duplicate_image", media_rows - tasks)
    planner.add("export.images_without_occurrence_row", planner.count(
        "SELECT count(DISTINCT coalesce(coreID, '')) FROM tasks WHERE orphan"))


def _read_fingerprint(folder: str) -> Optional[str]:
    try:
        with fsspec.open(posixpath.join(folder, "manifest.json"), "r") as handle:
            return ((json.load(handle).get("model") or {}).get("fingerprint")) or None
    except FileNotFoundError:
        return None


@dataclass
class _Previous:
    files: list[str]
    columns: set[str]
    same_model: bool


def _previous(planner: _Planner, folder: Optional[str]) -> Optional[_Previous]:
    """The previous snapshot's keys (and failures' keys) as tables; its
    embeddings are read later, and only when its model is this run's."""
    con = planner.con
    files = snapshot_files(folder, "embeddings") if folder else []
    failures = snapshot_files(folder, "failures") if folder else []
    planner.register(files + failures)
    if files:
        columns = planner.columns(files)
        fp = "model_fingerprint" if "model_fingerprint" in columns else "NULL"
        con.execute(f"""CREATE TEMP TABLE pk AS SELECT {_key(columns)} AS kc, identifier,
                        any_value({fp}) AS fp FROM {_source(files)} GROUP BY ALL""")
    else:
        con.execute("CREATE TEMP TABLE pk (kc VARCHAR, identifier VARCHAR, fp VARCHAR)")
    if failures:
        columns = planner.columns(failures)
        con.execute(f"""CREATE TEMP TABLE fk AS SELECT DISTINCT {_key(columns)} AS kc,
                        identifier FROM {_source(failures)}""")
    else:
        con.execute("CREATE TEMP TABLE fk (kc VARCHAR, identifier VARCHAR)")
    if not files:
        return None
    fingerprint = _read_fingerprint(folder)
    same = (fingerprint == planner.fingerprint if fingerprint else
            planner.count(f"SELECT count(*) FROM pk WHERE fp = {_q(planner.fingerprint)}") > 0)
    return _Previous(files, planner.columns(files), same)


def _resumed_files(resume_folders: Sequence[str]) -> list[str]:
    return [path for folder in resume_folders for path in part_files(folder, "embeddings")]


def _decide(planner: _Planner, previous: Optional[_Previous],
            resume_folders: Sequence[str], revalidate: bool) -> None:
    """Per task, as the Beam join did before planning: resumed, reembedded, new, retried,
    revalidated or reused; and how many previous rows left the export."""
    con = planner.con
    resumed = _resumed_files(resume_folders)
    planner.register(resumed)
    fp = _q(planner.fingerprint)
    if resumed:
        columns = planner.columns(resumed)
        con.execute(f"""CREATE TEMP TABLE rk AS SELECT DISTINCT {_key(columns)} AS kc, identifier
                        FROM {_source(resumed)} WHERE model_fingerprint = {fp}""")
    else:
        con.execute("CREATE TEMP TABLE rk (kc VARCHAR, identifier VARCHAR)")
    again = "'revalidated'" if revalidate else "'reused'"
    con.execute(f"""
        CREATE TEMP TABLE decided AS
        SELECT t.*, CASE
            WHEN rk.kc IS NOT NULL THEN 'resumed'
            WHEN pk.kc IS NOT NULL AND pk.fp IS DISTINCT FROM {fp} THEN 'reembedded'
            WHEN pk.kc IS NULL THEN CASE WHEN fk.kc IS NOT NULL THEN 'retried' ELSE 'new' END
            ELSE {again} END AS decision
        FROM tasks t
        LEFT JOIN rk ON t.kc = rk.kc AND t.identifier = rk.identifier
        LEFT JOIN pk ON t.kc = pk.kc AND t.identifier = pk.identifier
        LEFT JOIN fk ON t.kc = fk.kc AND t.identifier = fk.identifier""")
    names = {"resumed": "refresh.resumed", "reembedded": "refresh.reembedded",
             "retried": "refresh.retried_failures", "new": "refresh.new",
             "revalidated": "refresh.revalidated", "reused": "refresh.reused"}
    for decision, n in con.execute(
            "SELECT decision, count(*) FROM decided GROUP BY decision").fetchall():
        planner.add(names[decision], n)
    if previous is not None:
        planner.add("refresh.removed", planner.count(
            "SELECT count(*) FROM pk ANTI JOIN tasks t ON pk.kc = t.kc "
            "AND pk.identifier = t.identifier"))
    con.execute("DROP TABLE tasks")


def _image_select(columns: set[str], alias: str, prefix: str = "") -> str:
    return ", ".join(f"{alias}.{name} AS {prefix}{name}" if name in columns
                     else f"NULL AS {prefix}{name}" for name in IMAGE_COLUMNS)


def _task_select(alias: str = "d") -> str:
    return ", ".join(f"{alias}.{name}" for name in TASK_FIELDS)


def _write_reused(planner: _Planner, previous: Optional[_Previous],
                  resume_folders: Sequence[str], schema: pa.Schema) -> None:
    """Reused and resumed rows → the snapshot's parts: today's occurrence
    fields, the previous image columns and embedding bytes as they were."""
    parts = parts_folder(planner.folder)
    if previous is not None and previous.same_model:
        planner.write(f"""
            SELECT {_task_select()}, {_image_select(previous.columns, 'p')}
            FROM (SELECT * FROM decided WHERE decision = 'reused') d
            JOIN (SELECT *, {_key(previous.columns)} AS kc FROM {_source(previous.files)}) p
              ON d.kc = p.kc AND d.identifier = p.identifier""",
                      "embeddings-reused", schema, parts)
    resumed = _resumed_files(resume_folders)
    if resumed:
        columns = planner.columns(resumed)
        planner.write(f"""
            SELECT {_task_select()}, {_image_select(columns, 'p')}
            FROM (SELECT * FROM decided WHERE decision = 'resumed') d
            JOIN (SELECT *, {_key(columns)} AS kc FROM {_source(resumed)}
                  WHERE model_fingerprint = {_q(planner.fingerprint)}
                  QUALIFY row_number() OVER (PARTITION BY kc, identifier) = 1) p
              ON d.kc = p.kc AND d.identifier = p.identifier""",
                      "embeddings-resumed", schema, parts)


def _write_revalidate(planner: _Planner, previous: Optional[_Previous]) -> list[str]:
    """Tasks to ask the host again conditionally, each with its previous row
    (what a 304 or unchanged bytes reuse), in parts: a weekly `--revalidate`
    of a whole dataset never holds all its rows (embeddings included)."""
    if previous is None or not planner.count(
            "SELECT count(*) FROM decided WHERE decision = 'revalidated'"):
        return []
    sql = f"""
        SELECT {_task_select()}, {_image_select(previous.columns, 'p', 'prev_')}
        FROM (SELECT * FROM decided WHERE decision = 'revalidated') d
        JOIN (SELECT *, {_key(previous.columns)} AS kc FROM {_source(previous.files)}) p
          ON d.kc = p.kc AND d.identifier = p.identifier"""
    return [path for path, _ in planner.write(sql, "revalidate", None, planner.out)]


def _look_up(planner: _Planner, store: ImageStore, url_parts: list[str], use_cache: bool,
             retry_days: float, now: datetime.datetime) -> list[str]:
    """The store's answer for every task that needs work: its URL's latest
    entry (and how many permanent failures in a row it has had), and whether
    that content is in the model's embedding cache or among the pictures."""
    con = planner.con
    planner.register(url_parts)
    url_columns = planner.columns(url_parts)
    times = "failed_times" if "failed_times" in url_columns else "NULL"
    permanent = ", ".join(_q(reason) for reason in PERMANENT_FAILURES)
    con.execute("""
        CREATE TEMP TABLE todo AS SELECT * FROM decided
        WHERE decision IN ('new', 'retried', 'reembedded')""")
    con.execute(f"""
        CREATE TEMP TABLE urls AS
        WITH e AS (SELECT identifier, image_sha256, etag, last_modified, http_status, outcome,
                          fetched_at, {times} AS failed_times
                   FROM {_source(url_parts)}
                   WHERE identifier IN (SELECT identifier FROM todo)),
             w AS (SELECT *, max(CASE WHEN outcome = {_q(OK)} THEN fetched_at END)
                             OVER (PARTITION BY identifier) AS last_ok FROM e)
        SELECT identifier, image_sha256, etag, last_modified, http_status, outcome, fetched_at,
               sum(CASE WHEN outcome IN ({permanent})
                             AND (last_ok IS NULL OR fetched_at > last_ok)
                        THEN coalesce(failed_times, 1) ELSE 0 END)
                   OVER (PARTITION BY identifier) AS streak
        FROM w QUALIFY row_number() OVER (PARTITION BY identifier
                                          ORDER BY fetched_at DESC NULLS LAST) = 1""")
    con.execute("""
        CREATE TEMP TABLE known AS SELECT DISTINCT image_sha256 AS sha FROM urls
        WHERE outcome = 'ok' AND image_sha256 IS NOT NULL""")
    cache_parts = store.parts(store.cache_folder(planner.fingerprint)) if use_cache else []
    planner.register(cache_parts)
    if cache_parts:
        con.execute(f"""CREATE TEMP TABLE cached AS SELECT DISTINCT image_sha256 AS sha
                        FROM {_source(cache_parts)} WHERE image_sha256 IN (SELECT sha FROM known)""")
    else:
        con.execute("CREATE TEMP TABLE cached (sha VARCHAR)")
    image_parts = _current_copies(planner, store.parts(store.folder(IMAGES)))
    planner.register(image_parts)
    if image_parts:
        con.execute(f"""CREATE TEMP TABLE stored AS SELECT image_sha256 AS sha,
                        min(filename) AS part FROM {_source(image_parts, filename=True)}
                        WHERE image_sha256 IN (SELECT sha FROM known) GROUP BY 1""")
    else:
        con.execute("CREATE TEMP TABLE stored (sha VARCHAR, part VARCHAR)")
    if retry_days > 0:
        remembered = (f"u.outcome IN ({permanent}) AND epoch(u.fetched_at) + "
                      f"{float(retry_days) * 86400.0} * power(2, least(u.streak, 30) - 1) "
                      f"> {now.timestamp()}")
    else:
        remembered = "false"
    con.execute(f"""
        CREATE TEMP TABLE looked AS
        SELECT d.*, u.image_sha256 AS sha, u.etag, u.last_modified, u.http_status,
               u.outcome, u.fetched_at, u.streak, s.part,
               CASE WHEN u.outcome = 'ok' AND u.image_sha256 IS NOT NULL THEN
                        CASE WHEN c.sha IS NOT NULL THEN 'cached'
                             WHEN s.sha IS NOT NULL THEN 'stored' ELSE 'missing' END
                    WHEN {remembered} THEN 'remembered'
                    ELSE 'fetch' END AS route
        FROM todo d LEFT JOIN urls u ON d.identifier = u.identifier
        LEFT JOIN cached c ON u.image_sha256 = c.sha
        LEFT JOIN stored s ON u.image_sha256 = s.sha""")
    names = {"cached": "store.cached", "stored": "store.stored", "missing": "store.missing",
             "remembered": "store.remembered_failures", "fetch": "store.not_stored"}
    for route, n in con.execute("SELECT route, count(*) FROM looked GROUP BY route").fetchall():
        planner.add(names[route], n)
    planner.add("dedup.content_reused", planner.count(
        "SELECT count(DISTINCT sha) FROM looked WHERE route = 'cached'"))
    return cache_parts


def _current_copies(planner: _Planner, parts: list[str]) -> list[str]:
    """The parts of pictures whose copies were made as this run makes them
    (their Parquet metadata says how; parts written before it was recorded
    were made with the parameters of then, which are today's)."""
    if not parts:
        return []
    planner.register(parts)
    other = {row[0] for row in planner.con.execute(f"""
        SELECT file_name FROM parquet_kv_metadata({_files(parts)})
        WHERE decode(key) = {_q(COPY_METADATA)} AND decode(value) <> {_q(COPY_KEY)}
        """).fetchall()}
    planner.add("store.parts_of_other_copy_parameters", len(other))
    return [part for part in parts if part not in other and part.split("://")[-1] not in other]


def _write_cached(planner: _Planner, parts: list[str], schema: pa.Schema,
                  now: datetime.datetime) -> None:
    """Rows whose content this model embedded before (in the cache's `parts`):
    the cache's embedding, each URL's own validators, no inference."""
    if not parts or not planner.count("SELECT count(*) FROM looked WHERE route = 'cached'"):
        return
    columns = planner.columns(parts)
    precision = "c.precision" if "precision" in columns else "NULL"
    planner.write(f"""
        SELECT {_task_select()}, d.sha AS image_sha256, c.width, c.height, d.etag,
               d.last_modified, {_q(planner.fingerprint)} AS model_fingerprint,
               {precision} AS precision, TIMESTAMPTZ {_q(now.isoformat())} AS embedded_at,
               c.embedding
        FROM (SELECT * FROM looked WHERE route = 'cached') d
        JOIN (SELECT * FROM {_source(parts)}
              WHERE image_sha256 IN (SELECT sha FROM looked WHERE route = 'cached')
              QUALIFY row_number() OVER (PARTITION BY image_sha256) = 1) c
          ON d.sha = c.image_sha256""", "embeddings-cached", schema,
                  parts_folder(planner.folder))


def _write_remembered(planner: _Planner, retry_days: float) -> None:
    """A failure row for each task whose URL failed for good lately: the
    reason it gave, and when it will be asked again."""
    n = planner.count("SELECT count(*) FROM looked WHERE route = 'remembered'")
    if not n:
        return
    planner.write(f"""
        SELECT nullif(d.kc, '') AS coreID, d.gbifID, d.identifier, 'fetch' AS stage,
               d.outcome AS reason, d.http_status, 0 AS attempts,
               'answered ' || d.outcome || ' on ' || strftime(d.fetched_at, '%Y-%m-%d')
               || ' (' || CAST(CAST(d.streak AS BIGINT) AS VARCHAR) || ' time(s) in a row); not asked again before '
               || strftime(d.fetched_at + to_seconds(CAST({float(retry_days) * 86400.0}
                   * power(2, least(d.streak, 30) - 1) AS BIGINT)), '%Y-%m-%d')
               || ' (--retry_failed_after)' AS detail
        FROM looked d WHERE route = 'remembered'""", "failures-remembered", FAILURE_SCHEMA,
                  parts_folder(planner.folder))
    for reason, count in planner.con.execute(
            "SELECT outcome, count(*) FROM looked WHERE route = 'remembered' "
            "GROUP BY 1").fetchall():
        planner.add(f"failed.fetch.{reason}", count)


TASK_SCHEMA = pa.schema([("coreID", pa.string()), ("gbifID", pa.int64()),
                         ("identifier", pa.string()), ("occurrenceID", pa.string()),
                         ("datasetKey", pa.string()), ("taxonKey", pa.int64()),
                         ("scientificName", pa.string()), ("license", pa.string()),
                         ("rightsHolder", pa.string()), ("creator", pa.string())])
STORED_SCHEMA = pa.schema([("part", pa.string()), ("image_sha256", pa.string()),
                           ("coreID", pa.string()), ("gbifID", pa.int64()),
                           ("identifier", pa.string()), ("occurrenceID", pa.string()),
                           ("datasetKey", pa.string()), ("taxonKey", pa.int64()),
                           ("scientificName", pa.string()), ("license", pa.string()),
                           ("rightsHolder", pa.string()), ("creator", pa.string()),
                           ("etag", pa.string()), ("last_modified", pa.string()),
                           ("http_status", pa.int32())])


def _write_stored(planner: _Planner) -> tuple[list[str], list[str]]:
    """Tasks to embed from the store's copies, sorted by the part that holds
    the copy, so that a reader takes one part's tasks with a filter."""
    if not planner.count("SELECT count(*) FROM looked WHERE route = 'stored'"):
        return [], []
    written = planner.write(f"""
        SELECT d.part, d.sha AS image_sha256, {_task_select()}, d.etag, d.last_modified,
               d.http_status
        FROM looked d WHERE route = 'stored' ORDER BY d.part, d.sha""",
                            "stored", STORED_SCHEMA, planner.out, rows_per_part=200_000)
    parts = [row[0] for row in planner.con.execute(
        "SELECT DISTINCT part FROM looked WHERE route = 'stored' ORDER BY 1").fetchall()]
    return [path for path, _ in written], parts
