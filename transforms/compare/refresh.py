"""Refreshing a snapshot: reuse what the previous one already embedded.

GBIF re-publishes datasets weekly; re-embedding ~565,000 unchanged images
each time is waste. Which rows are reused is decided before the Beam graph
(`transforms/compare/planning.py`, with DuckDB over the snapshot's Parquet
files): a key (coreID, identifier) embedded before with the same model is
reused (its embedding bytes are copied, the occurrence fields are taken
fresh from the export, since taxonomy changes); a new key or a previous
failure is fetched; a key gone from the export is dropped. With
`revalidate`, reused keys are fetched conditionally instead, and this module
splits what came back: a 304 or the same bytes reuse the previous row,
changed bytes are embedded again.
"""
from __future__ import annotations

import posixpath

import apache_beam as beam
import fsspec
from apache_beam.pvalue import TaggedOutput

from transforms.common.records import TASK_FIELDS
from transforms.common.tally import TALLY

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


def reuse_row(task: dict, previous: dict) -> dict:
    """The previous embedding with today's occurrence fields."""
    row = {name: task.get(name) for name in TASK_FIELDS}
    row.update({name: previous.get(name) for name in IMAGE_COLUMNS})
    return row


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
