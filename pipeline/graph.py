"""The pipeline graph: export → tasks → reuse | store | fetch → embed → Parquet → snapshot.

Data flows one way; every stage sends what it could not do to the failures
output, so each image row ends as an embedding, a failure or a counted skip.
Fetching fills the image store and embedding reads copies from it: what the
store (or the previous snapshot) already answers is never fetched again, and
what a model embedded once is never embedded again.

On the local runner a stage starts only when the one before has finished, so
there the fetched copies are embedded in the fetching stage (fetching and
inference overlap). On distributed runners fetched copies cross a shuffle
keyed by content first, so that embedding spreads over every worker whatever
the export's hosts, each content is embedded once for the whole job, and
resource hints move the copies (tens of kB), not pixels; and a host shard is
fetched in work items of about `--fetch_work_item_seconds` each, so that a
failure redoes minutes of fetching (transforms/fetch/work_items.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam

from pipeline.model_check import RunModel
from pipeline.options import GbifEmbedOptions, fetch_config
from transforms.common.lease import LeaseRef
from transforms.common.records import NOT_MODIFIED
from transforms.common.tally import MergeTallies
from transforms.compare.planned import ReadPlannedTasks
from transforms.compare.planning import Plan
from transforms.compare.refresh import SplitUnchanged
from transforms.embed.dedup import SkipKnownContent
from transforms.embed.inference import ImageEmbedder
from transforms.embed.stage import ByContent, EmbedImages
from transforms.fetch.stage import FetchImages
from transforms.store.layout import ImageStore, cache_schema
from transforms.store.lookup import ReadPlannedStored
from transforms.write.parts import FAILURE_SCHEMA, THUMBNAIL_SCHEMA, WriteParquet, embedding_schema
from transforms.common.files import join
from transforms.write.snapshot import PublishSnapshot
from transforms.write.thumbnails import KeepThumbnails


def build(p: beam.Pipeline, opts: GbifEmbedOptions, *, snapshot: str, manifest: dict,
          model: RunModel, precision: str, store: str, inference_threads: int,
          distributed: bool = False, local_processes: int = 1,
          previous_folder: Optional[str] = None, resume_folders: Sequence[str] = (),
          plan: Optional[Plan] = None, leases: Sequence[LeaseRef] = ()) -> None:
    """`plan`: what planning left to do (transforms/compare/planning.py);
    `previous_folder` and `resume_folders` were planning's inputs; `precision`:
    the job's, decided at launch (pipeline/precision_choice.py); `leases`: the
    output's and the store's, which a distributed job's fetch and embed
    workers renew while they run (transforms/common/lease.py)."""
    folder = join(opts.output, snapshot)
    every = (opts.checkpoint_rows, opts.checkpoint_seconds)
    schemas = {"embeddings": embedding_schema(model.spec.width), "failures": FAILURE_SCHEMA,
               "thumbnails": THUMBNAIL_SCHEMA}
    cache_folder = ImageStore(store).cache_folder(model.fingerprint)

    def embed_stage() -> EmbedImages:
        stage = EmbedImages(
            ImageEmbedder(opts.model, model.spec, batch_size=opts.batch_size,
                          threads=inference_threads, precision=precision),
            model.fingerprint, snapshot, resize=opts.resize, size=model.spec.image_size,
            max_pixels=opts.max_image_pixels, decode_threads=opts.decode_threads,
            batch_size=opts.batch_size, leases=tuple(leases))
        hints = {k: v for k, v in (("min_ram", opts.inference_min_ram),
                                   ("accelerator", opts.accelerator)) if v}
        return stage.with_resource_hints(**hints) if hints and distributed else stage

    # What to do was decided before the graph (transforms/compare/planning.py):
    # only rows that need a request or an inference enter it.
    to_fetch = p | "PlannedTasks" >> ReadPlannedTasks(plan.fetch + plan.revalidate,
                                                      spread=distributed)
    plan_tally = p | "PlanTally" >> beam.Create([plan.tally])
    fetched = to_fetch | "Fetch" >> FetchImages(
        fetch_config(opts, local_processes), store, snapshot, every,
        work_item_seconds=opts.fetch_work_item_seconds if distributed else None,
        leases=leases)
    changed, unchanged, split_tally = ((fetched.images, fetched[NOT_MODIFIED])
                                       | "SplitUnchanged" >> SplitUnchanged())
    if distributed:
        new, known, known_tally = changed | "ByContent" >> ByContent(), *(
            p | f"No{name}" >> beam.Create([]) for name in ("Known", "KnownTally"))
    else:
        new, known, known_tally = changed | "SkipKnownContent" >> SkipKnownContent(
            model.fingerprint, snapshot)
    fresh = new | "EmbedFetched" >> embed_stage()
    write = {"embeddings": [fresh.rows, known, unchanged],
             "failures": [fetched.failures, fresh.failures],
             "thumbnails": [fresh.thumbnails], "cache": [fresh.cache], "tally": [fresh.tally]}
    if plan.stored_parts:  # pictures the store already has
        pictures, lost_pictures, pictures_tally = p | "ReadStore" >> ReadPlannedStored(
            plan.stored, plan.stored_parts, spread=distributed)
        from_store = pictures | "EmbedStored" >> embed_stage()
        write["embeddings"] += [from_store.rows]
        write["failures"] += [from_store.failures, lost_pictures]
        write["thumbnails"] += [from_store.thumbnails]
        write["cache"] += [from_store.cache]
        write["tally"] += [from_store.tally, pictures_tally]

    # Thumbnails for report.html: at most THUMBS_PER_JOB for the whole job,
    # whatever the number of worker processes that decoded.
    write["thumbnails"] = [tuple(write["thumbnails"]) | "KeepThumbnails" >> KeepThumbnails()]
    # Each input is written in the stage that makes it: on the local runner a
    # Flatten of PCollections from different stages holds every row in memory.
    written = {kind: tuple(write[kind]) | f"Write{kind.title()}" >> WriteParquet(
                   folder, kind, schemas[kind], *every, leases=leases)
               for kind in ("embeddings", "failures", "thumbnails")}
    cache_written = tuple(write["cache"]) | "WriteEmbeddingCache" >> WriteParquet(
        cache_folder, snapshot, cache_schema(model.spec.width), *every, in_parts=False,
        leases=leases)
    failure_counts = [rows | f"CountFailures{i}" >> beam.Map(
                          lambda f: {f"failed.{f['stage']}.{f['reason']}": 1})
                      for i, rows in enumerate(write["failures"])]
    tally = ((plan_tally, fetched.tally, split_tally, known_tally,
              *write["tally"], *failure_counts)
             | "AllTallies" >> beam.Flatten()
             | "MergeTallies" >> beam.CombineGlobally(MergeTallies()))
    done = ((written["embeddings"], written["thumbnails"], cache_written)
            | "AllWritten" >> beam.Flatten())
    _ = (done, written["failures"], tally) | "Publish" >> PublishSnapshot(
        opts.output, snapshot, manifest, schemas, opts.keep_snapshots, leases=leases)
