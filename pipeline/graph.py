"""The pipeline graph: export → tasks → (reuse | fetch by host → decode → embed) → Parquet → snapshot.

Data flows one way; every stage sends what it could not do to the failures
output, so each image row ends as an embedding, a failure or a counted skip.
"""
from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam

from pipeline.options import GbifEmbedOptions, fetch_config
from transforms.embed.dedup import SkipKnownContent
from transforms.embed.decode import THUMBNAILS, DecodeImages
from transforms.embed.inference import Embed, HubImageEmbedder
from transforms.fetch.stage import FetchImages
from transforms.read.export import ReadExport
from transforms.common.records import FAILURES, NOT_MODIFIED
from transforms.compare.refresh import CompareWithPrevious, SplitUnchanged
from transforms.write.snapshot import PublishSnapshot, join
from transforms.common.tally import TALLY, MergeTallies
from transforms.write.parts import FAILURE_SCHEMA, THUMBNAIL_SCHEMA, WriteParquet, embedding_schema


def build(p: beam.Pipeline, opts: GbifEmbedOptions, *, snapshot: str, manifest: dict,
          model_fingerprint: str, inference_threads: int,
          previous_folder: Optional[str] = None, resume_folders: Sequence[str] = ()) -> None:
    folder = join(opts.output, snapshot)
    schemas = {"embeddings": embedding_schema(opts.embedding_dim), "failures": FAILURE_SCHEMA,
               "thumbnails": THUMBNAIL_SCHEMA}
    embedder = HubImageEmbedder(
        opts.model, batch_size=opts.batch_size, threads=inference_threads,
        precision=opts.precision,
        resource_hints={"min_ram": opts.inference_min_ram, "accelerator": opts.accelerator})

    tasks, read_tally = p | "ReadExport" >> ReadExport(opts.export, opts.max_images)
    to_fetch, reused, compare_tally = tasks | "CompareWithPrevious" >> CompareWithPrevious(
        previous_folder, model_fingerprint, opts.revalidate, resume_folders)
    fetched = to_fetch | "Fetch" >> FetchImages(fetch_config(opts), folder)
    changed, unchanged, split_tally = ((fetched.images, fetched[NOT_MODIFIED])
                                       | "SplitUnchanged" >> SplitUnchanged())
    new, known, known_tally = changed | "SkipKnownContent" >> SkipKnownContent(
        model_fingerprint, snapshot)
    decoded = (new
               | "Decode" >> beam.ParDo(DecodeImages(opts.resize, opts.max_image_pixels,
                                                     opts.decode_threads,
                                                     lookahead=2 * opts.batch_size,
                                                     run=snapshot))
               .with_outputs(FAILURES, TALLY, THUMBNAILS, main="pixels"))
    rows, embed_failures, embed_tally = decoded.pixels | "Embed" >> Embed(
        embedder, model_fingerprint, snapshot)

    failures = ((fetched.failures, decoded.failures, embed_failures)
                | "AllFailures" >> beam.Flatten())
    # Each input is written in the stage that makes it: on the local runner a
    # Flatten of PCollections from different stages holds every row in memory.
    every = (opts.checkpoint_rows, opts.checkpoint_seconds)
    written = (rows, known, reused, unchanged) | "WriteEmbeddings" >> WriteParquet(
        folder, "embeddings", schemas["embeddings"], *every)
    failed = failures | "WriteFailures" >> WriteParquet(folder, "failures", FAILURE_SCHEMA,
                                                        *every)
    thumbnails = decoded[THUMBNAILS] | "WriteThumbnails" >> WriteParquet(
        folder, "thumbnails", THUMBNAIL_SCHEMA, *every)
    tally = ((read_tally, compare_tally, fetched[TALLY], split_tally, known_tally,
              decoded[TALLY], embed_tally,
              failures | "CountFailures" >> beam.Map(
                  lambda f: {f"failed.{f['stage']}.{f['reason']}": 1}))
             | "AllTallies" >> beam.Flatten()
             | "MergeTallies" >> beam.CombineGlobally(MergeTallies()))
    written = (written, thumbnails) | "AllWritten" >> beam.Flatten()
    _ = (written, failed, tally) | "Publish" >> PublishSnapshot(
        opts.output, snapshot, manifest, schemas, opts.keep_snapshots)
