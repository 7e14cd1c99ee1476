"""Refreshing a snapshot: reuse what the previous one already embedded.

GBIF re-publishes datasets weekly; re-embedding ~565,000 unchanged images
each time is waste. The export's image tasks are joined with the previous
snapshot's rows on their key (gbifID, identifier) with a CoGroupByKey, so
the comparison scales and runs the same on every runner. A key embedded
before with the same model is reused (its embedding bytes are copied, the
occurrence fields are taken fresh from the export, since taxonomy changes);
a new key or a previous failure is fetched; a key gone from the export is
dropped. With `revalidate`, reused keys are fetched conditionally instead
and re-embedded only when the host's bytes changed.
"""
from __future__ import annotations

import posixpath
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput

from transforms.common.records import TASK_FIELDS, key_of
from transforms.common.tally import TALLY, Tally, tally_outputs
from transforms.write.parts import parts_folder

REUSED = "reused"
# Columns of a reused row that describe the image and its embedding; the
# rest (occurrence and licence fields) come from the current export.
IMAGE_COLUMNS = ("image_sha256", "width", "height", "etag", "last_modified",
                 "model_fingerprint", "precision", "embedded_at", "embedding")


def snapshot_files(folder: str, prefix: str) -> list[str]:
    """The Parquet files of one kind in a snapshot folder, with their protocol."""
    fs, _, (root,) = fsspec.get_fs_token_paths(folder)
    fs.invalidate_cache()
    paths = sorted(fs.glob(posixpath.join(root, f"{prefix}-*.parquet")))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" else f"{protocol}://{p}" for p in paths]


class _ReadRows(beam.DoFn):
    """One Parquet file → its rows as dicts, one row group at a time."""

    def __init__(self, columns: Optional[list[str]] = None):
        self._columns = columns

    def process(self, path: str) -> Iterable[dict]:
        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=self._columns)
                embedding = None
                if "embedding" in table.column_names:
                    column = table.column("embedding").combine_chunks()
                    embedding = column.values.to_numpy().reshape(len(column), -1)
                    table = table.drop(["embedding"])
                for i, row in enumerate(table.to_pylist()):
                    if embedding is not None:
                        row["embedding"] = embedding[i].copy()
                    yield row


class ReadSnapshot(beam.PTransform):
    """A snapshot's rows of one kind, keyed by (gbifID, identifier)."""

    def __init__(self, folder: str, prefix: str, columns: Optional[list[str]] = None):
        super().__init__()
        self._folder = folder
        self._prefix = prefix
        self._columns = columns

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(snapshot_files(self._folder, self._prefix))
                | "Spread" >> beam.Reshuffle()
                | "Rows" >> beam.ParDo(_ReadRows(self._columns))
                | "Key" >> beam.Map(lambda row: (key_of(row), row)))


def reuse_row(task: dict, previous: dict) -> dict:
    """The previous embedding with today's occurrence fields."""
    row = {name: task.get(name) for name in TASK_FIELDS}
    row.update({name: previous.get(name) for name in IMAGE_COLUMNS})
    return row


class _Compare(beam.DoFn):
    """Decides per key: reuse, (re)fetch, or drop."""

    def __init__(self, model_fingerprint: str, revalidate: bool):
        self._fingerprint = model_fingerprint
        self._revalidate = revalidate

    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        _, grouped = keyed
        tasks = list(grouped["tasks"])
        previous = next(iter(grouped["previous"]), None)
        if not tasks:
            if previous is not None:
                self._tally.add("refresh.removed")
            return
        task = tasks[0]
        resumed = next((row for row in grouped.get("resumed", ())
                        if row.get("model_fingerprint") == self._fingerprint), None)
        if resumed is not None:  # finished by a run that died: neither fetched nor embedded
            self._tally.add("refresh.resumed")
            yield TaggedOutput(REUSED, reuse_row(task, resumed))
        elif previous is not None and previous.get("model_fingerprint") != self._fingerprint:
            self._tally.add("refresh.reembedded")  # rows of two models never mix
            yield task
        elif previous is None:
            self._tally.add("refresh.retried_failures" if list(grouped["failed"])
                            else "refresh.new")
            yield task
        elif self._revalidate:
            self._tally.add("refresh.revalidated")
            yield dict(task, revalidate=True, etag=previous.get("etag"),
                       last_modified=previous.get("last_modified"), previous=previous)
        else:
            self._tally.add("refresh.reused")
            yield TaggedOutput(REUSED, reuse_row(task, previous))

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


class CompareWithPrevious(beam.PTransform):
    """Tasks → (tasks to fetch, reused rows, tally), given the previous snapshot
    and the parts of runs that died since (`resume_folders`: their rows made
    with this model are taken as they are, so a rerun redoes only the rest)."""

    def __init__(self, previous_folder: Optional[str], model_fingerprint: str,
                 revalidate: bool, resume_folders: Sequence[str] = ()):
        super().__init__()
        self._folder = previous_folder
        self._fingerprint = model_fingerprint
        self._revalidate = revalidate
        self._resume = tuple(resume_folders)

    def expand(self, tasks):
        p = tasks.pipeline
        if self._folder is None and not self._resume:  # first run, --full, another model
            counted = tasks | "AllNew" >> beam.Map(lambda _: {"refresh.new": 1})
            return tasks, p | "NoReuse" >> beam.Create([]), counted
        grouped = {"tasks": tasks | "KeyTasks" >> beam.Map(lambda t: (key_of(t), t))}
        if self._folder is not None:
            grouped["previous"] = p | "PreviousEmbeddings" >> ReadSnapshot(
                self._folder, "embeddings")
            grouped["failed"] = p | "PreviousFailures" >> ReadSnapshot(
                self._folder, "failures", columns=["coreID", "gbifID", "identifier"])
        else:
            grouped["previous"] = p | "NoPrevious" >> beam.Create([])
            grouped["failed"] = p | "NoPreviousFailures" >> beam.Create([])
        if self._resume:
            grouped["resumed"] = ([p | f"Resume{i}" >> ReadSnapshot(parts_folder(folder),
                                                                   "embeddings")
                                   for i, folder in enumerate(self._resume)]
                                  | "AllResumed" >> beam.Flatten())
        compared = (grouped
                    | "ByKey" >> beam.CoGroupByKey()
                    | "Compare" >> beam.ParDo(_Compare(self._fingerprint, self._revalidate))
                    .with_outputs(REUSED, TALLY, main="fetch"))
        return compared.fetch, compared[REUSED], compared[TALLY]


class _SplitUnchanged(beam.DoFn):
    """After a conditional fetch: rows whose previous bytes are the same → reuse;
    the image goes on to be embedded with the rows that are new or changed."""

    def process(self, fetched: dict):
        keep = []
        for task in fetched["tasks"]:
            previous = task.get("previous")
            if previous is None:
                keep.append(task)
            elif previous.get("image_sha256") == fetched.get("image_sha256"):
                yield TaggedOutput(TALLY, {"refresh.unchanged_after_fetch": 1,
                                           "refresh.reused": 1})
                yield TaggedOutput(REUSED, reuse_row(task, previous))
            else:
                yield TaggedOutput(TALLY, {"refresh.reembedded": 1})
                keep.append({k: v for k, v in task.items() if k != "previous"})
        if keep:
            yield dict(fetched, tasks=keep)


class SplitUnchanged(beam.PTransform):
    """Fetched images (each with its rows) and 304 answers → (images to embed,
    reused rows, tally)."""

    def expand(self, pcolls):
        fetched, not_modified = pcolls
        split = fetched | "Split" >> beam.ParDo(_SplitUnchanged()).with_outputs(
            REUSED, TALLY, main="embed")
        kept = not_modified | "NotModified" >> beam.Map(
            lambda t: reuse_row(t, t["previous"]))
        counted = not_modified | "CountNotModified" >> beam.Map(
            lambda _: {"refresh.reused": 1})
        reused = (split[REUSED], kept) | "Reused" >> beam.Flatten()
        tally = (split[TALLY], counted) | "Tally" >> beam.Flatten()
        return split.embed, reused, tally
